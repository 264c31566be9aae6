"""Checkpoint save and load of a real-size training state against the disk's own bandwidth, in one run.

    .venv/bin/python benchmarks/checkpoint.py [--folder DIR] [--shape 0.6b]

The state is what the torch backend holds for a Qwen3-shaped model (random weights built here from its config):
fp32 weights and AdamW's two moments. It is saved as the loop saves it (`rl.checkpoint.write`: the backend's
torch.distributed.checkpoint files, then the manifest, fsync, rename, `latest`) and loaded as a resumed run
loads it (`rl.checkpoint.latest`, which checks the files against the manifest while the backend's `load` reads
them), and as `ckpt.async_save` writes it (the time training is blocked against the whole save). Beside it, on
the same folder: a sequential write of the same tensors' bytes with fsync, and a read of them. Before each read
the files' pages are dropped from the page cache (`posix_fadvise(DONTNEED)`), so reads come from the disk.
That probe runs first as well (`disk_first`, not used in the ratios): on a VM whose freed memory goes back to the
hypervisor (free page reporting), the first GBs a process writes land in page-cache memory the host must hand out
again, at a fraction of the disk's speed whoever writes them; run first, the probe pays that, not the save.
Printed: GB/s of each, the ratios (goal ≥ 0.7), where the time of a save and a load goes, and the blocked
fraction of an asynchronous save (goal ≤ 0.1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.shapes import QWEN3, build_model  # noqa: E402
from rl import checkpoint  # noqa: E402
from rlhpc.config import load_config  # noqa: E402

BLOCK = 64 << 20


def drop_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def disk(folder: Path, tensors: list[torch.Tensor]) -> dict[str, float]:
    """The same bytes written plainly, one file, fsync at the end; then read back from the disk. The state's own
    bytes, not a repeated block: storage that compresses or deduplicates would take a repeated block faster."""
    path = folder / "disk-probe.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        for t in tensors:
            f.write(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        os.fsync(f.fileno())
    write_s = time.perf_counter() - start
    drop_cache([path])
    buffer = bytearray(BLOCK)
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass
    read_s = time.perf_counter() - start
    size = path.stat().st_size
    path.unlink()
    return {"write_gb_s": size / write_s / 1e9, "read_gb_s": size / read_s / 1e9}


def training_state(shape: str, work: Path):
    from rl.train.torch_backend import TorchBackend

    model_dir = work / "model"
    build_model(model_dir, shape)
    cfg = load_config(ROOT / "configs" / "tiny_cpu.toml", [f"ckpt.hf_checkpoint='{model_dir}'",
                                                           "grpo.use_kl_loss=false"])
    backend = TorchBackend(cfg, init_from=model_dir, total_steps=10)
    for p in backend.model.parameters():  # AdamW's moments exist after a first step
        p.grad = torch.zeros_like(p)
    backend.optimizer.step()
    backend.optimizer.zero_grad(set_to_none=True)
    return backend


def background_save(backend, root: Path) -> dict[str, float]:
    """The same state saved as `ckpt.async_save` saves it (`rl.checkpoint.BackgroundWriter`, sealed by
    `InBackground`), after one save that allocates the host buffers a run keeps from then on. Training is blocked
    until the copy is taken (`staged`) if its next step follows at once (in the loop a rollout's generation
    comes first); the save call itself returns before."""
    writer = checkpoint.BackgroundWriter()
    first = checkpoint.InBackground(root, 2, lambda tmp: backend.save(tmp, writer), writer.wait, keep_last=1)
    first.result()
    start = time.perf_counter()
    saving = checkpoint.InBackground(root, 3, lambda tmp: backend.save(tmp, writer), writer.wait, keep_last=1)
    returned = time.perf_counter()
    writer.staged()
    staged = time.perf_counter()
    saving.result()
    sealed = time.perf_counter()
    return {"call_s": returned - start, "blocked_s": staged - start, "until_sealed_s": sealed - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--folder", type=Path, default=None, help="where to write (default: a temporary folder)")
    p.add_argument("--shape", choices=QWEN3, default="0.6b")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rlhpc-ckpt-", dir=args.folder))
    try:
        backend = training_state(args.shape, work)
        state = [p for p in backend.model.parameters()] + [
            v for st in backend.optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        first = disk(work, state)
        root = work / "checkpoints"
        start = time.perf_counter()
        tmp = checkpoint.begin(root, 1)
        backend.save(tmp)
        written = time.perf_counter()
        folder = checkpoint.commit(root, tmp, 1)
        sealed = time.perf_counter()
        nbytes = sum(p.stat().st_size for p in files(folder))
        drop_cache(files(folder))
        start_load = time.perf_counter()
        assert checkpoint.latest(root, load=backend.load) == folder
        loaded = time.perf_counter()
        async_figures = background_save(backend, root)
        d = disk(work, state)
        save_s, load_s = sealed - start, loaded - start_load
        print(json.dumps({
            "shape": args.shape, "parameters": sum(p.numel() for p in backend.model.parameters()),
            "checkpoint_gb": nbytes / 1e9, "disk_first": first, "disk": d,
            "save": {"seconds": save_s, "gb_s": nbytes / save_s / 1e9,
                     "of_disk": nbytes / save_s / 1e9 / d["write_gb_s"], "write_s": written - start,
                     "seal_s": sealed - written},
            "load": {"seconds": load_s, "gb_s": nbytes / load_s / 1e9,
                     "of_disk": nbytes / load_s / 1e9 / d["read_gb_s"]},
            "async_save": {**async_figures, "blocked_of_sync": async_figures["blocked_s"] / save_s},
        }, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
