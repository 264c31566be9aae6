"""Checkpoint folders that are either complete or ignored.

A checkpoint is written into a temporary folder beside the others, its files listed with sizes and
checksums in `manifest.json`, made durable (fsync), renamed to `iter_NNNNNNN` (N = rollouts completed),
and only then recorded in `latest_checkpointed_iteration.txt` (Megatron's convention), itself replaced
atomically. A folder whose manifest does not match its files is never loaded. The checksums of DCP's data files
(`storage_writer`) are computed by the ranks' writer threads as they write them, so that sealing does not read
back what other nodes wrote; other files are hashed when sealed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

LATEST = "latest_checkpointed_iteration.txt"
MANIFEST = "manifest.json"
FULL_DISK_BYTES = 16 << 20
DIGEST = "xxh3_128"
"""The manifest's checksum: it finds torn and damaged files (the manifest is no signature: whoever can write the
files can write it too), and at ~7 GB/s a core it no longer slows a load the way sha256 (~0.7) did."""
DATA_SUFFIX = ".distcp"
"""DCP's data files (torch's `filesystem.DEFAULT_SUFFIX`), each hashed by its writer (`storage_writer`)."""
SIDECAR = ".xxh3"
"""Suffix of the file that `storage_writer` leaves beside each data file it wrote whole (its size and checksum,
as a manifest entry), which `commit` takes instead of reading the file, and removes."""
log = logging.getLogger(__name__)


@contextmanager
def _single_process_is_fine():
    # One process without a process group is a valid way to run; DCP warns about it every time.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _io_threads() -> int:
    return max(2, min(8, os.cpu_count() or 1))


def storage_writer(path: Path, thread_count: int | None = None) -> Any:
    """DCP's file writer into `path`, writing the same files (DCP's reader reads them) without torch.save's
    CRC-32 of every record: torch.load never checks it (the manifest's checksum is what finds damage), and
    computing it halved the speed of writing a file at disk speed here (0.77 against 1.46 GB/s). Several writer
    threads by default, each its own file: one thread serializes and writes in turn. Each data file's checksum
    is computed as it is written and left in its sidecar for `commit`."""
    from torch import serialization
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, FileSystem

    assert DEFAULT_SUFFIX == DATA_SUFFIX, DEFAULT_SUFFIX

    class WithoutZipCrc(FileSystem):
        def __init__(self) -> None:
            super().__init__()
            self.failures: list[BaseException] = []
            """What each writer thread raised while writing a file."""

        # torch's setting is per thread: it is set in each of DCP's writer threads, around the file it writes
        @contextmanager
        def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
            with super().create_stream(path, mode) as stream:
                computed = serialization.get_crc32_options()
                serialization.set_crc32_options(False)
                try:
                    # Data files only: DCP's index is written under another name and renamed (it is small).
                    if mode == "wb" and Path(path).name.endswith(DATA_SUFFIX):
                        with _hashed_as_written(Path(path), stream) as hashing:
                            yield hashing
                    else:
                        yield stream
                except BaseException as e:
                    self.failures.append(e)
                    raise
                finally:
                    serialization.set_crc32_options(computed)

    fs = WithoutZipCrc()

    class Checked(FileSystemWriter):
        def write_data(self, plan: Any, planner: Any) -> Any:
            written = super().write_data(plan, planner)
            # DCP's writer threads other than the caller's die alone on an error (torch 2.13
            # `FileSystemWriter._write_data`): their files' results are missing, and DCP would go on to write
            # an index without them, a checkpoint that loads with a KeyError.
            if (lost := len(plan.items) - len(written.value())) > 0:
                cause = f": {fs.failures[0]!r}" if fs.failures else ""
                raise OSError(f"a writer thread failed, {lost} of {len(plan.items)} items not written{cause}")
            return written

    writer = Checked(Path(path), thread_count=thread_count or _io_threads())
    writer.fs = fs
    return writer


class _HashingStream:
    """A file opened for writing whose bytes are hashed (xxh3-128) as they go out. `digest()` is the file's
    checksum once it was written front to back and closed; None if it was seeked or truncated (its bytes may no
    longer be those hashed), or not closed by this proxy. Everything else is the file's own."""

    def __init__(self, stream: Any):
        import xxhash

        self._stream = stream
        self._hash = xxhash.xxh3_128()
        self.size = 0
        self._sequential = True
        self._whole = False

    def write(self, data: Any) -> int | None:
        written = self._stream.write(data)
        if written:  # only what went out: a raw file may take part of it (None: none of it)
            self._hash.update(memoryview(data).cast("B")[:written])
            self.size += written
        return written

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def seek(self, *args: Any) -> int:
        self._sequential = False
        return self._stream.seek(*args)

    def truncate(self, *args: Any) -> int:
        self._sequential = False
        return self._stream.truncate(*args)

    def close(self) -> None:
        if self._stream.closed:
            return
        self._stream.flush()
        # the position is where the hashed bytes end: nothing wrote around this proxy
        self._whole = self._sequential and self._stream.tell() == self.size
        self._stream.close()

    def digest(self) -> str | None:
        return self._hash.hexdigest() if self._whole else None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR)


@contextmanager
def _hashed_as_written(path: Path, stream: Any) -> Iterator[_HashingStream]:
    """`stream`, which writes `path` from its start, hashing what it writes; once closed whole, the sidecar is
    written, before the writer's thread goes on (the driver reads it once every rank's save has returned). A
    write that raises leaves none, nor does one that left the file other than it hashed it."""
    sidecar = _sidecar(path)
    sidecar.unlink(missing_ok=True)  # what an earlier write of the same file left
    hashing = _HashingStream(stream)
    yield hashing
    hashing.close()  # DCP closes its files itself
    if (digest := hashing.digest()) is not None:
        sidecar.write_text(json.dumps({"size": hashing.size, DIGEST: digest}))


def save_model_state(state: dict[str, Any], folder: Path, writer: BackgroundWriter | None = None) -> None:
    """Write a training state with torch.distributed.checkpoint into folder/model (every rank calls this); with
    `writer`, in the background."""
    (writer or Synchronous()).save(state, storage_writer(Path(folder) / "model"))


class Synchronous:
    """`BackgroundWriter.save` of a synchronous save: the state is written when it returns."""

    def save(self, state: dict[str, Any], storage: Any, planner: Any = None) -> None:
        import torch.distributed.checkpoint as dcp

        with _single_process_is_fine():
            dcp.save(state, storage_writer=storage, planner=planner)


class BackgroundWriter:
    """One rank's asynchronous saves (`ckpt.async_save`) with torch.distributed.checkpoint's `async_save`: the
    state is copied into host buffers, kept from one save to the next, by one thread, then written by another,
    while training goes on. Training may change its tensors again once `staged()` returns (waited for before its
    next optimizer step, so that the step's forward and backward and, in the loop, a rollout's generation before
    it overlap the copy). The writes' collectives run over `group`, a process group of their own, so that they
    never interleave with training's on the same group.

    `async_save` itself is called from a thread of the writer's: it returns once its stager's thread has begun,
    and that thread's walk of the state in Python kept the caller waiting for the GIL (0.44 s of a 0.56 s call,
    for 7.8 GB of state on 2 cores)."""

    def __init__(self, group: Any = None):
        import torch
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        if not torch.distributed.is_initialized():
            # as `_single_process_is_fine`, for the writing thread, which a `catch_warnings` here would not cover
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        cuda = torch.cuda.is_available()
        # Pinned buffers and non-blocking copies only make sense from a GPU; shared memory is for the
        # process-based writer, not used here.
        self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                    use_async_staging=True, use_non_blocking_copy=cuda))
        self._group = group
        self._begin = ThreadPoolExecutor(1, thread_name_prefix="checkpoint-begin")
        self._saves: list[Future[Any]] = []
        """Saves begun (each `async_save`'s response, once it has returned) and not yet waited for; `wait` (in a
        thread of its own) and `staged` both read it."""
        self._lock = threading.Lock()

    def save(self, state: dict[str, Any], storage: Any, planner: Any = None) -> None:
        """Start saving `state` into `storage` (planned by `planner`, DCP's default if None); a save still
        writing is waited for first."""
        import torch
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        self.wait()
        if torch.cuda.is_initialized():
            # DCP's stager copies on a stream of its own, which does not wait for the compute stream's pending
            # writes (the last optimizer step's kernels may still be running): they must be done first.
            torch.cuda.current_stream().synchronize()
        response = self._begin.submit(dcp.async_save, state, storage_writer=storage, planner=planner,
                                      async_stager=self._stager, process_group=self._group,
                                      no_dist=not dist.is_initialized())
        with self._lock:
            self._saves.append(response)

    def staged(self) -> None:
        """Return once every save's copy of the state is taken (raising what the copy raised)."""
        with self._lock:
            saves = list(self._saves)
        for save in saves:
            save.result().staging_completion.result()

    def wait(self) -> None:
        """Return once every save is written (raising what the write raised). Each stays listed until written,
        so that `staged`, called meanwhile, still waits for its copy."""
        with self._lock:
            saves = list(self._saves)
        try:
            for save in saves:
                save.result().upload_completion.result()
        finally:
            with self._lock:
                self._saves = [s for s in self._saves if s not in saves]


def load_model_state(state: dict[str, Any], folder: Path) -> None:
    """Fill `state` in place from folder/model; only its keys are read."""
    import torch.distributed.checkpoint as dcp

    with _single_process_is_fine():
        dcp.load(state, storage_reader=_index_reader(Path(folder) / "model"))


class _IndexUnpickler(pickle.Unpickler):
    """Reads DCP's index (`.metadata`), which torch unpickles with no restriction, admitting only what an index
    is made of: DCP's metadata classes, torch sizes, dtypes and layouts, paths. A run folder may be writable by
    others, and an index naming any other callable would run it as whoever loads the checkpoint."""

    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "Path"),
               ("pathlib", "PosixPath"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    METADATA = "torch.distributed.checkpoint.metadata"

    def find_class(self, module: str, name: str) -> Any:
        import torch

        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in self.ALLOWED or module == self.METADATA or dtype:
            found = super().find_class(module, name)
            # of the metadata module, only the classes it defines (not what it imports, dataclass() say)
            if module != self.METADATA or getattr(found, "__module__", None) == module:
                return found
        raise pickle.UnpicklingError(f"checkpoint index names {module}.{name}, which no checkpoint index holds")


def _index_reader(path: Path) -> Any:
    """DCP's file reader, with its index read by `_IndexUnpickler` (the tensors are read as weights only)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class IndexReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
            with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as f:
                metadata = _IndexUnpickler(f).load()
            if not isinstance(metadata, Metadata):
                raise pickle.UnpicklingError(f"{path}: the checkpoint index holds no DCP metadata")
            if metadata.storage_meta is None:  # as torch's reader does
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return IndexReader(path)


def rng_file(folder: Path, rank: int) -> Path:
    return Path(folder) / "rng" / f"rank{rank}.pt"


def save_rng(folder: Path, rank: int) -> None:
    """This process's random state (torch on CPU and CUDA, Python's `random`) as folder/rng/rank<k>.pt: one
    file per rank, since each rank draws its own dropout masks, so that they continue after a resume exactly
    as they would have."""
    import random

    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    path = rng_file(folder, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


def load_rng(folder: Path, rank: int) -> bool:
    """Restore what `save_rng` wrote for this rank; False where the checkpoint has none for it (it was written
    by fewer ranks), which leaves this process's random state as it was."""
    import random

    import torch

    path = rng_file(folder, rank)
    if not path.exists():
        return False
    # Tensors and Python's state (a tuple of ints) only: a run folder may be writable by others, and its
    # manifest's checksums with it, so nothing in the file may name code to run.
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    return True


def iteration_dir(root: Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


class CheckpointError(OSError):
    """A save that failed; the message names the checkpoint that stays the latest."""


def write(root: Path, iteration: int, fill: Callable[[Path], None], keep_last: int | None = None) -> Path:
    """Save checkpoint `iteration`: `fill(folder)` writes its files into a temporary folder, then `commit`. On
    any failure (a full disk, a worker that died) the temporary folder is removed and CheckpointError raised;
    the previous checkpoint stays whole and latest."""
    tmp = begin(root, iteration)
    return _sealed(root, tmp, iteration, lambda: fill(tmp), keep_last)


class InBackground:
    """A checkpoint written while the run goes on (`ckpt.async_save`): `start(folder)` begins every rank's
    writing into the temporary folder and returns; a thread then waits for `written()` (every rank done) and
    seals the folder as `write` does. Until it is sealed, `latest` does not see it."""

    def __init__(self, root: Path, iteration: int, start: Callable[[Path], None], written: Callable[[], None],
                 keep_last: int | None = None):
        self.folder = iteration_dir(root, iteration)
        tmp = begin(root, iteration)
        try:
            start(tmp)
        except BaseException as e:
            _fail(root, tmp, iteration, e)
        pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self._sealed = pool.submit(_sealed, root, tmp, iteration, written, keep_last)
        pool.shutdown(wait=False)

    def result(self) -> Path:
        """The sealed folder, once it is; CheckpointError as `write` raises it."""
        return self._sealed.result()


def _sealed(root: Path, tmp: Path, iteration: int, fill: Callable[[], None], keep_last: int | None) -> Path:
    """`fill()`, then `commit`; on failure the temporary folder is removed and CheckpointError raised."""
    try:
        fill()
        return commit(root, tmp, iteration, keep_last)
    except BaseException as e:  # torch's CheckpointException is a BaseException
        _fail(root, tmp, iteration, e)


def _fail(root: Path, tmp: Path, iteration: int, e: BaseException) -> NoReturn:
    """Remove a failed save's temporary folder and raise CheckpointError naming the cause and the checkpoint that
    stays the latest (an interruption is raised as itself)."""
    # Writers report a full disk in their own words (torch: "unexpected pos ..."): look at the disk itself.
    free = shutil.disk_usage(root).free
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(e, (KeyboardInterrupt, SystemExit)):
        raise e
    stands = sealed_latest(root)
    if free < FULL_DISK_BYTES:
        cause = f"no space left on device ({free} bytes free)"
    else:
        cause = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[-1]
    raise CheckpointError(f"saving checkpoint {iteration} into {root} failed: {cause}; the latest checkpoint is "
                          f"still {stands.name if stands else 'none'}") from e


def begin(root: Path, iteration: int) -> Path:
    """A fresh temporary folder to write the checkpoint of `iteration` into."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".iter_{iteration:07d}.tmp"
    if tmp.exists():  # left by a save that died
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _digest(path: Path, algorithm: str = DIGEST) -> str:
    """The file's checksum: xxh3-128 (checkpoints sealed before it carry sha256, still checked as such)."""
    if algorithm == "sha256":
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    import xxhash

    digest, buffer = xxhash.xxh3_128(), bytearray(8 << 20)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _digest_all(paths: list[Path], algorithms: list[str] | None = None) -> list[str]:
    """`_digest` of each file, several at once: the hashes let go of the GIL while they hash, so the files of a
    checkpoint are hashed at the disk's or the cores' pace rather than one file's."""
    with ThreadPoolExecutor(_io_threads()) as pool:
        return list(pool.map(_digest, paths, algorithms or [DIGEST] * len(paths)))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _entries(tmp: Path) -> dict[str, dict[str, Any]]:
    """The manifest's entry of each file in `tmp`: the checksum its writer left in a sidecar, the others' read
    from the disk. The sidecars are removed. A file whose size is no longer the one its writer closed it with was
    torn since (a file system that lost a write), and a data file with no sidecar was not written whole (every
    one is written by `storage_writer`): CheckpointError, so that the save fails and the previous checkpoint
    stays the latest, rather than a torn one sealed as whole."""
    sidecars = [p for p in tmp.rglob("*" + SIDECAR) if p.is_file()]
    written = {p.with_name(p.name.removesuffix(SIDECAR)): _sidecar_entry(p) for p in sidecars}
    for p in sidecars:
        p.unlink()
    sizes = {p: p.stat().st_size for p in _files(tmp)}
    for p, size in sizes.items():
        entry = written.get(p)
        if p.name.endswith(DATA_SUFFIX) and entry is None:
            raise CheckpointError(f"{p.relative_to(tmp)} was not written whole (its writer left no checksum)")
        if entry and entry["size"] != size:
            raise CheckpointError(f"{p.relative_to(tmp)} holds {size} bytes where its writer wrote {entry['size']}")
    digests = {p: entry[DIGEST] for p, entry in written.items() if entry}
    unknown = [p for p in sizes if p not in digests]
    digests.update(zip(unknown, _digest_all(unknown)))
    return {str(p.relative_to(tmp)): {"size": size, DIGEST: digests[p]} for p, size in sizes.items()}


def _sidecar_entry(path: Path) -> dict[str, Any] | None:
    """A sidecar's entry; None if it cannot be read as one (a writer that died while writing it)."""
    try:
        entry = json.loads(path.read_text())
        return {"size": int(entry["size"]), DIGEST: str(entry[DIGEST])}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def commit(root: Path, tmp: Path, iteration: int, keep_last: int | None = None) -> Path:
    """Seal the temporary folder: manifest, fsync, rename, then record it as the latest."""
    root, tmp = Path(root), Path(tmp)
    manifest = _entries(tmp)
    (tmp / MANIFEST).write_text(json.dumps({"iteration": iteration, "written_ns": time.time_ns(), "files": manifest},
                                           indent=1))
    for p in [*tmp.rglob("*"), tmp]:
        _fsync(p)
    final = iteration_dir(root, iteration)
    if final.exists():  # the same iteration saved again (a resumed run redoing it)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    _replace_latest(root, iteration)
    if keep_last:
        # By when they were written, not by number: after a resume from an older checkpoint the folders of
        # higher numbers are the abandoned ones, and the one just written is always kept.
        others = sorted((i for i in complete_iterations(root) if i != iteration),
                        key=lambda i: (_written_ns(iteration_dir(root, i)), i))
        for old in others[:max(len(others) - (keep_last - 1), 0)]:
            shutil.rmtree(iteration_dir(root, old), ignore_errors=True)
    return final


def _written_ns(folder: Path) -> int:
    """When a sealed checkpoint was written: its manifest says (its files' times change when a run folder is
    copied); the manifest's mtime for those sealed before it did."""
    try:
        return int(json.loads((folder / MANIFEST).read_text())["written_ns"])
    except (OSError, ValueError, KeyError, TypeError):
        return (folder / MANIFEST).stat().st_mtime_ns if (folder / MANIFEST).exists() else 0


def _replace_latest(root: Path, iteration: int) -> None:
    latest_tmp = root / f".{LATEST}.tmp"
    latest_tmp.write_text(f"{iteration}\n")
    _fsync(latest_tmp)
    os.replace(latest_tmp, root / LATEST)
    _fsync(root)


def verify(folder: Path) -> str | None:
    """None if the folder's files match its manifest, else what is wrong."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError):
        return "no readable manifest"
    present = {str(p.relative_to(folder)) for p in _files(Path(folder))}
    if missing := sorted(set(manifest) - present):
        return f"missing {missing[0]}"
    paths = {name: Path(folder) / name for name in manifest}
    if wrong := [n for n, path in paths.items() if path.stat().st_size != manifest[n]["size"]]:
        return f"{wrong[0]} does not match its manifest"
    algorithms = [DIGEST if DIGEST in meta else "sha256" for meta in manifest.values()]
    for (name, meta), algorithm, digest in zip(manifest.items(), algorithms,
                                                _digest_all(list(paths.values()), algorithms)):
        if digest != meta.get(algorithm):
            return f"{name} does not match its manifest"
    return None


def complete_iterations(root: Path) -> list[int]:
    """Iterations with a sealed folder (a manifest), oldest first; contents not checked."""
    found = []
    for p in Path(root).glob("iter_*"):
        if p.is_dir() and (p / MANIFEST).exists() and p.name[5:].isdigit():
            found.append(int(p.name[5:]))
    return sorted(found)


def _recorded_first(root: Path) -> list[int]:
    """Sealed iterations newest first, the one recorded as latest ahead of them."""
    candidates = complete_iterations(root)[::-1]
    try:
        recorded = int((root / LATEST).read_text().strip())
        candidates = [recorded] + [c for c in candidates if c != recorded]
    except (OSError, ValueError):
        pass
    return candidates


def sealed_latest(root: Path) -> Path | None:
    """What `latest` would most likely load, without reading the files (for status displays)."""
    for iteration in _recorded_first(Path(root)) if Path(root).is_dir() else []:
        if (folder := iteration_dir(root, iteration)).is_dir():
            return folder
    return None


def latest(root: Path | None, load: Callable[[Path], object] | None = None) -> Path | None:
    """The newest checkpoint that verifies: the recorded latest, else the newest sealed folder that
    checks out (a warning names each one skipped). None when there is none. With `load`, each candidate is
    loaded by `load(folder)` while its files are checked, so that the disk is read once rather than twice (the
    second reader finds the pages in the cache); what a folder that fails the check loaded is replaced by the
    next candidate's load."""
    if root is None or not Path(root).is_dir():
        return None
    root = Path(root)
    for iteration in _recorded_first(root):
        folder = iteration_dir(root, iteration)
        problem = _verify_while(folder, load) if folder.is_dir() else "folder missing"
        if problem is None:
            return folder
        log.warning("skipping checkpoint %s: %s", folder, problem)
    return None


def _verify_while(folder: Path, load: Callable[[Path], object] | None) -> str | None:
    """`verify(folder)`, with `load(folder)` running meanwhile. A load that fails on a folder that verifies is
    not the checkpoint's fault: it is raised, rather than an older checkpoint silently taken."""
    if load is None:
        return verify(folder)
    with ThreadPoolExecutor(1) as pool:
        check = pool.submit(verify, folder)
        try:
            load(folder)
        except Exception:
            if (problem := check.result()) is not None:
                return problem
            raise
        return check.result()
