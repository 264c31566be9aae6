"""Weight sync from trainer to engine on CPU at a real size: a Qwen3-0.6B-shaped model (random weights, built
locally from a transformers `Qwen3Config`), bf16, in buckets of `rollout.update_weight_buffer_size` bytes.

    .venv/bin/python benchmarks/weight_sync.py [--repeats 3] [--bucket-mb 512] [--threads 1]

Measured, each `--repeats` times, in one run:
- memcpy: a plain copy of the same bytes into tensors allocated and touched beforehand, in the trainer's
  process (the floor);
- colocated: `TrainWorker.sync_engine`, the engine (`TorchEngine`) in the trainer's process;
- decoupled, broadcast: `EnginePool.sync_weights` without fault tolerance, the trainer's rank 0 broadcasting
  each bucket over the weight-update group (gloo) to an engine actor;
- decoupled, object store: the same with fault tolerance, the buckets through Ray's object store.

The trainer is rlhpc's `TrainWorker` with a stand-in backend whose `named_weights` are the model's parameters
(what the torch backend yields unsharded), so that no optimizer or reference model takes memory: about 1.2 GB
per copy of the weights, under 6 GB in all (trainer, engine, object store).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.shapes import build_model  # noqa: E402
from rl.config import RolloutConfig  # noqa: E402
from rl.rollout.pool import EnginePool  # noqa: E402
from rl.rollout.torch_engine import TorchEngine  # noqa: E402
from rl.train.worker import TrainWorker  # noqa: E402


class Weights:
    """The stand-in backend: the model's parameters as the torch backend yields them."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def named_weights(self):
        for name, p in self.model.named_parameters():
            yield name, p.detach()


class Trainer(TrainWorker):
    """rlhpc's training worker (rank 0, alone), its backend the stand-in, optionally hosting an engine."""

    def __init__(self, model_dir: str, bucket_bytes: int, threads: int, host_engine: bool):
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.rank, self.bucket_bytes, self.backend_device, self.update_group = 0, bucket_bytes, "cpu", None
        # what TrainWorker's __init__ sets and its weight-sending methods read: no offload, no background
        # checkpoint writer, no critic, an engine of one process (no group of ranks)
        self.offload, self.writers, self.critic, self.engine_group = False, [], None, None
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        with torch.no_grad():  # the engine must receive something else than what it loaded
            for p in model.parameters():
                p.mul_(0.5)
        self.backend = Weights(model)
        self.engine = TorchEngine(model_dir, dtype=torch.bfloat16, threads=threads) if host_engine else None

    def memcpy(self) -> float:
        """Seconds to copy the weights' bytes into tensors allocated and touched beforehand (no page faults
        timed: the floor)."""
        pairs = list(self.backend.named_weights())
        into = [torch.zeros_like(t) for _, t in pairs]
        start = time.perf_counter()
        for (_, t), dst in zip(pairs, into):
            dst.copy_(t)
        return time.perf_counter() - start

    def matches(self) -> bool:
        """Whether the hosted engine holds the trainer's weights."""
        mine = dict(self.backend.named_weights())
        return all(torch.equal(p, mine[n]) for n, p in self.engine.model.named_parameters())


def engine_matches(engine, trainer) -> bool:
    import ray

    theirs = ray.get(engine.__ray_call__.remote(lambda e: {n: p.detach() for n, p in e.model.named_parameters()}))
    mine = ray.get(trainer.__ray_call__.remote(lambda t: dict(t.backend.named_weights())))
    return all(torch.equal(theirs[n], mine[n]) for n in theirs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bucket-mb", type=int, default=RolloutConfig.model_fields["update_weight_buffer_size"].default
                        // 2**20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    import ray

    bucket = args.bucket_mb * 2**20
    with tempfile.TemporaryDirectory() as tmp:
        nbytes = build_model(Path(tmp) / "model", "0.6b")
        model_dir = str(Path(tmp) / "model")
        print(f"model: {nbytes / 1e9:.3f} GB of bf16 weights; buckets of {args.bucket_mb} MiB", flush=True)
        ray.init(num_cpus=2, object_store_memory=3 * 2**30, include_dashboard=False, configure_logging=False,
                 log_to_driver=False, runtime_env={"env_vars": {"TRANSFORMERS_VERBOSITY": "error"}})
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        results: dict[str, list[float]] = {}
        trainer = EnginePool.actor_class(Trainer).options(num_cpus=0).remote(model_dir, bucket, args.threads, True)
        for _ in range(args.repeats):
            results.setdefault("memcpy (same process)", []).append(ray.get(trainer.memcpy.remote()))
            results.setdefault("colocated (in-process)", []).append(ray.get(trainer.sync_engine.remote(1)))
        assert ray.get(trainer.matches.remote())
        ray.kill(trainer)

        for label, fault_tolerant in (("decoupled, broadcast (gloo)", False), ("decoupled, object store", True)):
            trainer = EnginePool.actor_class(Trainer).options(num_cpus=0).remote(model_dir, bucket, args.threads,
                                                                                 False)
            engine_cls = EnginePool.actor_class(TorchEngine)
            pool = EnginePool(lambda slot, engine_cls=engine_cls: engine_cls.options(num_cpus=0).remote(
                model_dir, dtype=torch.bfloat16, threads=args.threads), 1,
                RolloutConfig.model_construct(use_fault_tolerance=fault_tolerant, update_weight_buffer_size=bucket))
            pool.sync_weights([trainer], 0)  # the group joined, both sides warm
            for version in range(1, args.repeats + 1):
                start = time.perf_counter()
                pool.sync_weights([trainer], version)
                results.setdefault(label, []).append(time.perf_counter() - start)
            assert engine_matches(pool.engines[0], trainer)
            pool.kill()
            ray.kill(trainer)
        ray.shutdown()
    print(f"{'path':<30} {'seconds (each run)':<28} {'median s':>9} {'GB/s':>7}")
    for label, times in results.items():
        median = statistics.median(times)
        print(f"{label:<30} {', '.join(f'{t:.3f}' for t in times):<28} {median:>9.3f} {nbytes / 1e9 / median:>7.2f}")


if __name__ == "__main__":
    main()
