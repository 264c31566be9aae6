"""Checkpoint integrity: a save killed at any point, a damaged folder, a full disk. None of them ever makes a
broken checkpoint the one loaded, and each leaves the previous one whole and latest."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

from rl import checkpoint

SAVE_TWO = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import torch
    from rl import checkpoint

    root, die_in = Path(sys.argv[1]), sys.argv[2]
    state = {"w": torch.arange(4096, dtype=torch.float32)}

    def fill(folder):
        checkpoint.save_model_state(state, folder)

    checkpoint.write(root, 1, fill)
    state["w"] += 1

    def kill_in(name):  # SIGKILL this process (as `kill -9` of the job would) when `name` runs
        original = getattr(checkpoint, name)
        def killed(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        setattr(checkpoint, name, killed if name == die_in else original)

    if die_in == "fill":
        def fill(folder):
            checkpoint.save_model_state(state, folder)
            os.kill(os.getpid(), signal.SIGKILL)
    else:
        kill_in(die_in)
    checkpoint.write(root, 2, fill)
""")


@pytest.mark.parametrize("die_in", ["fill", "_fsync", "_replace_latest"],
                         ids=["while-writing", "while-sealing", "before-recording-latest"])
def test_a_save_killed_at_any_point_leaves_the_previous_checkpoint(tmp_path: Path, die_in: str) -> None:
    root = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, "-c", SAVE_TWO, str(root), die_in], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    folder = checkpoint.latest(root)
    assert folder.name == "iter_0000001"
    state = {"w": torch.zeros(4096)}
    checkpoint.load_model_state(state, folder)
    assert torch.equal(state["w"], torch.arange(4096, dtype=torch.float32))
    # the next save of iteration 2 goes through over whatever the killed one left
    checkpoint.write(root, 2, lambda f: checkpoint.save_model_state({"w": state["w"] + 1}, f))
    assert checkpoint.latest(root).name == "iter_0000002"


def test_a_folder_that_does_not_match_its_manifest_is_skipped_with_a_warning(tmp_path: Path, caplog) -> None:
    for it in (1, 2):
        checkpoint.write(tmp_path, it, lambda f, it=it: checkpoint.save_model_state({"w": torch.ones(64) * it}, f))
    damaged = next((checkpoint.iteration_dir(tmp_path, 2) / "model").glob("*.distcp"))
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    damaged.write_bytes(bytes(data))
    assert checkpoint.latest(tmp_path).name == "iter_0000001"
    assert "skipping checkpoint" in caplog.text and "iter_0000002" in caplog.text and "does not match" in caplog.text


@pytest.fixture
def small_disk(tmp_path: Path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_ends_the_save_with_an_error_and_keeps_the_previous_latest(small_disk: Path) -> None:
    checkpoint.write(small_disk, 1, lambda f: checkpoint.save_model_state({"w": torch.ones(1024)}, f))
    with pytest.raises(checkpoint.CheckpointError) as e:  # 2 MB does not fit in what is left of 1 MB
        checkpoint.write(small_disk, 2, lambda f: checkpoint.save_model_state({"w": torch.ones(512 * 1024)}, f))
    assert "saving checkpoint 2" in str(e.value) and "the latest checkpoint is still iter_0000001" in str(e.value)
    assert "no space left on device" in str(e.value)
    assert checkpoint.latest(small_disk).name == "iter_0000001"
    assert sorted(p.name for p in small_disk.iterdir()) == ["iter_0000001", checkpoint.LATEST]  # no leftovers


def test_keep_last_prunes_by_when_a_checkpoint_was_written(tmp_path: Path) -> None:
    """A run resumed from checkpoint 4 while an abandoned 8 is still there: the 5 it writes next is the one to
    keep, and latest stays on it (pruning by number deleted 5 and made 8 the latest)."""
    root = tmp_path / "ckpt"
    for iteration in (4, 8):
        checkpoint.write(root, iteration, lambda f: (f / "w").write_text("x"))
    (root / checkpoint.LATEST).write_text("4\n")  # 8 failed to load or was set aside: the run resumed from 4
    checkpoint.write(root, 5, lambda f: (f / "w").write_text("y"), keep_last=1)
    assert checkpoint.complete_iterations(root) == [5] and checkpoint.latest(root).name == "iter_0000005"
    for iteration in (9, 6):  # 9 is written before 6: keep_last=2 keeps 6 and the 9 before it
        checkpoint.write(root, iteration, lambda f: (f / "w").write_text("z"), keep_last=2)
    assert checkpoint.complete_iterations(root) == [6, 9] and checkpoint.latest(root).name == "iter_0000006"


def test_a_load_runs_while_the_files_are_checked_and_a_damaged_folder_gives_way(tmp_path):
    """`latest(root, load=...)` loads each candidate while checking it: the newest that checks out is what was
    loaded last; a load that fails on a folder that checks out is raised, not hidden by an older checkpoint."""
    for i in (1, 2):
        checkpoint.write(tmp_path, i, lambda d, i=i: (d / "weights.bin").write_bytes(bytes([i]) * 4096))
    loaded = []
    assert checkpoint.latest(tmp_path, load=lambda f: loaded.append(f.name)) == checkpoint.iteration_dir(tmp_path, 2)
    assert loaded == ["iter_0000002"]

    (checkpoint.iteration_dir(tmp_path, 2) / "weights.bin").write_bytes(b"\0" * 4096)  # damaged, same size
    loaded.clear()
    assert checkpoint.latest(tmp_path, load=lambda f: loaded.append(f.name)) == checkpoint.iteration_dir(tmp_path, 1)
    assert loaded == ["iter_0000002", "iter_0000001"]

    def broken(folder):
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        checkpoint.latest(tmp_path, load=broken)


def test_a_background_save_writes_the_state_as_it_was_when_begun(tmp_path, monkeypatch):
    """`ckpt.async_save`: training changes its tensors once the copy is taken; the checkpoint holds the state of
    when the save began, and becomes the latest only once sealed, by checksums computed as the files were
    written."""
    import threading

    # large enough that copying it takes a while: the sealing thread waits for the write meanwhile, as the
    # driver's does, and the copy must still be waited for
    state = {"w": torch.arange(1 << 23, dtype=torch.float32), "step": 3}
    writer, release = checkpoint.BackgroundWriter(), threading.Event()

    def written():
        writer.wait()
        release.wait(30)

    read = files_hashed_at_seal(monkeypatch)
    saving = checkpoint.InBackground(tmp_path, 1, lambda tmp: checkpoint.save_model_state(state, tmp, writer), written)
    writer.staged()
    state["w"] += 1  # the next optimizer step
    assert checkpoint.latest(tmp_path) is None  # written, perhaps, but not sealed
    release.set()
    saving.result()
    assert read == [".metadata"]  # DCP's data files were hashed as they were written
    assert saving.result() == checkpoint.latest(tmp_path) == checkpoint.iteration_dir(tmp_path, 1)
    loaded = {"w": torch.zeros(1 << 23), "step": 0}
    checkpoint.load_model_state(loaded, saving.result())
    assert torch.equal(loaded["w"], torch.arange(1 << 23, dtype=torch.float32)) and loaded["step"] == 3
    assert manifest_is_the_files(saving.result())
    # written without torch.save's zip CRC (in DCP's writer thread; the caller's setting is left as it was)
    archives = [zipfile.ZipFile(f) for f in (saving.result() / "model").glob("*.distcp") if f.stat().st_size]
    assert archives and {record.CRC for archive in archives for record in archive.infolist()} == {0}
    assert torch.serialization.get_crc32_options()


def test_a_background_save_that_fails_leaves_the_previous_checkpoint_latest(tmp_path):
    checkpoint.write(tmp_path, 1, lambda tmp: (tmp / "f").write_text("1"))

    def lost_worker():
        raise RuntimeError("The actor died unexpectedly before finishing this task.")

    saving = checkpoint.InBackground(tmp_path, 2, lambda tmp: (tmp / "f").write_text("2"), lost_worker)
    with pytest.raises(checkpoint.CheckpointError, match="actor died.*the latest checkpoint is still iter_0000001"):
        saving.result()
    assert checkpoint.latest(tmp_path).name == "iter_0000001" and not list(tmp_path.glob(".iter_*"))


def test_training_waits_for_the_copy_even_while_the_sealing_thread_waits_for_the_write():
    """The driver's sealing thread calls `wait` as soon as a save begins; a training step arriving meanwhile must
    still find the copy not taken and wait for it (it once found nothing to wait for)."""
    import threading
    from concurrent.futures import Future
    from types import SimpleNamespace

    writer = checkpoint.BackgroundWriter()
    copy, write = Future(), Future()
    begun: Future = Future()
    begun.set_result(SimpleNamespace(staging_completion=copy, upload_completion=write))
    writer._saves.append(begun)  # a save begun
    sealing = threading.Thread(target=writer.wait, daemon=True)
    sealing.start()
    step_may_run = threading.Event()
    threading.Thread(target=lambda: (writer.staged(), step_may_run.set()), daemon=True).start()
    try:
        assert not step_may_run.wait(0.3)
        copy.set_result(None)
        assert step_may_run.wait(5)
    finally:
        for future in (copy, write):
            if not future.done():
                future.set_result(None)
    sealing.join(5)
    assert not sealing.is_alive() and writer._saves == []


def test_checkpoints_sealed_with_sha256_still_verify_and_damage_is_found_either_way(tmp_path):
    import hashlib
    import json

    folder = checkpoint.write(tmp_path, 1, lambda tmp: (tmp / "w.bin").write_bytes(b"\x01" * 4096))
    manifest = json.loads((folder / checkpoint.MANIFEST).read_text())
    assert set(manifest["files"]["w.bin"]) == {"size", checkpoint.DIGEST}
    assert checkpoint.verify(folder) is None
    # as sealed before xxh3
    manifest["files"]["w.bin"] = {"size": 4096, "sha256": hashlib.sha256(b"\x01" * 4096).hexdigest()}
    (folder / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    assert checkpoint.verify(folder) is None
    (folder / "w.bin").write_bytes(b"\x02" * 4096)
    assert checkpoint.verify(folder) == "w.bin does not match its manifest"
    checkpoint.write(tmp_path, 2, lambda tmp: (tmp / "w.bin").write_bytes(b"\x01" * 4096))
    (checkpoint.iteration_dir(tmp_path, 2) / "w.bin").write_bytes(b"\x03" * 4096)
    assert checkpoint.verify(checkpoint.iteration_dir(tmp_path, 2)) == "w.bin does not match its manifest"


def files_hashed_at_seal(monkeypatch) -> list[str]:
    """The names of the files that `checkpoint` reads to hash them from now on (in any thread)."""
    read: list[str] = []
    digest = checkpoint._digest

    def reading(path: Path, *args) -> str:
        read.append(path.name)
        return digest(path, *args)

    monkeypatch.setattr(checkpoint, "_digest", reading)
    return read


def manifest_is_the_files(folder: Path) -> bool:
    """The manifest lists every file of `folder` as hashing it now finds it, no sidecar is left, and it verifies."""
    listed = json.loads((folder / checkpoint.MANIFEST).read_text())["files"]
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != checkpoint.MANIFEST]
    found = {str(p.relative_to(folder)): {"size": p.stat().st_size, checkpoint.DIGEST: checkpoint._digest(p)}
             for p in files}
    sidecars = [p for p in files if p.name.endswith(checkpoint.SIDECAR)]
    return listed == found and not sidecars and checkpoint.verify(folder) is None


def test_sealing_reads_back_no_file_that_dcp_wrote(tmp_path, monkeypatch):
    """A synchronous save: the checksums of DCP's data files come from the sidecars its writer threads left,
    which the sealed folder no longer holds; the files of other writers (and DCP's index) are hashed."""
    tmp = checkpoint.begin(tmp_path, 1)
    checkpoint.save_model_state({"w": torch.arange(1 << 16, dtype=torch.float32), "b": torch.ones(3), "step": 2}, tmp)
    (tmp / "rng.pt").write_bytes(b"\x01" * 100)
    assert len(list(tmp.rglob("*.distcp"))) == len(list(tmp.rglob("*" + checkpoint.SIDECAR))) > 1
    read = files_hashed_at_seal(monkeypatch)
    folder = checkpoint.commit(tmp_path, tmp, 1)
    assert sorted(read) == [".metadata", "rng.pt"]
    monkeypatch.undo()
    assert manifest_is_the_files(folder)


def test_a_data_file_torn_after_its_writer_closed_it_fails_the_save(tmp_path):
    """A data file that no longer has the size its writer closed it with was torn since: the save fails and the
    checkpoint before stays the latest. A file changed in place at its size keeps its writer's checksum: that
    folder is sealed but does not verify, so `latest` passes over it."""
    def saved(truncate: bool):
        def fill(tmp: Path) -> None:
            checkpoint.save_model_state({"w": torch.arange(1 << 16, dtype=torch.float32)}, tmp)
            data = max(tmp.rglob("*.distcp"), key=lambda p: p.stat().st_size)
            if truncate:
                os.truncate(data, data.stat().st_size // 2)
            else:
                data.write_bytes(b"\0" * data.stat().st_size)
        return fill

    checkpoint.write(tmp_path, 1, lambda tmp: checkpoint.save_model_state({"w": torch.ones(4)}, tmp))
    with pytest.raises(checkpoint.CheckpointError, match=r"distcp holds \d+ bytes where its writer wrote \d+; "
                                                         "the latest checkpoint is still iter_0000001"):
        checkpoint.write(tmp_path, 2, saved(truncate=True))
    assert checkpoint.latest(tmp_path).name == "iter_0000001" and not list(tmp_path.glob(".iter_*"))

    folder = checkpoint.write(tmp_path, 3, saved(truncate=False))
    assert checkpoint.verify(folder).endswith("does not match its manifest")
    assert checkpoint.latest(tmp_path).name == "iter_0000001"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the injected failure
def test_a_write_that_fails_in_any_writer_thread_fails_the_save(tmp_path, monkeypatch):
    """DCP's writer threads other than the caller's die alone on an error, and DCP would write an index without
    their files' items; the save must fail instead, the checkpoint before staying the latest. So must a save
    whose data file was left without its writer's checksum."""
    import errno
    import threading

    state = {name: torch.full((1 << 12,), float(k)) for k, name in enumerate("abcd")}
    checkpoint.write(tmp_path, 1, lambda tmp: checkpoint.save_model_state(state, tmp))
    real_write = checkpoint._HashingStream.write

    def full_in_other_threads(self, data):
        if threading.current_thread() is not threading.main_thread():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(checkpoint._HashingStream, "write", full_in_other_threads)
    with pytest.raises(checkpoint.CheckpointError, match="a writer thread failed.*No space left on device.*the "
                                                         "latest checkpoint is still iter_0000001"):
        checkpoint.write(tmp_path, 2, lambda tmp: checkpoint.save_model_state(state, tmp))
    monkeypatch.undo()

    def without_a_checksum(tmp: Path) -> None:
        checkpoint.save_model_state(state, tmp)
        next(tmp.rglob("*.distcp" + checkpoint.SIDECAR)).unlink()

    with pytest.raises(checkpoint.CheckpointError, match="not written whole.*still iter_0000001"):
        checkpoint.write(tmp_path, 3, without_a_checksum)
    assert checkpoint.latest(tmp_path).name == "iter_0000001" and not list(tmp_path.glob(".iter_*"))


def test_a_data_file_gets_a_sidecar_only_when_written_front_to_back_and_closed(tmp_path):
    fs = checkpoint.storage_writer(tmp_path).fs
    whole, seeked, truncated, failed = (tmp_path / f"__0_{i}.distcp" for i in range(4))
    with fs.create_stream(whole, "wb") as f:
        f.writelines([b"ab", b"cd"])
        assert f.tell() == 4
    with fs.create_stream(seeked, "wb") as f:
        f.write(b"abcd")
        f.seek(0)
        f.write(b"x")
    with fs.create_stream(truncated, "wb") as f:
        f.write(b"abcd")
        f.truncate(2)
    with pytest.raises(RuntimeError), fs.create_stream(failed, "wb") as f:
        f.write(b"ab")
        raise RuntimeError("the rank's save failed")
    sidecar = json.loads(checkpoint._sidecar(whole).read_text())
    assert sidecar == {"size": 4, checkpoint.DIGEST: checkpoint._digest(whole)}
    assert sorted(p.name for p in tmp_path.glob("*" + checkpoint.SIDECAR)) == [whole.name + checkpoint.SIDECAR]
