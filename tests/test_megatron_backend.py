"""The Megatron-core backend run for real: megatron-core's GPTModel, DDP, optimizer, pipeline schedule and
torch_dist checkpoints, one process per rank, with rlhpc's `TrainWorker` and `MegatronBackend` — on the host over
gloo (the suite), or on GPUs over NCCL where there are enough of them (`benchmarks/gpu_smoke.py`).

Each layout (tensor parallel 1, tensor parallel 2, pipeline parallel 2 with the tiny Qwen3's tied embeddings,
data parallel 2 with the distributed optimizer, each rank training on its share of the batch) runs twice in
fresh processes: the first run scores, trains a step, saves, trains a second step; the second run loads that
checkpoint, as a requeued job does, and must hold the same weights and optimizer state bitwise and take the same
second step bitwise (the first run pauses training memory, as a colocated rollout does, before it).
The layouts of several ranks save with `ckpt.async_save`: the second step runs while the checkpoint is written.
`rlhpc export` of the sealed checkpoint gives the saved weights. Log-probs and the first step's loss terms are
compared with the torch backend's on the same weights (float32).

On the host: stand-ins, each for one megatron-core call that demands CUDA (`tests/megatron_cpu.py` says why each is
harmless): `tensor_parallel.model_parallel_cuda_manual_seed`, `CudaRNGStatesTracker.fork`,
`torch.cuda.current_device`, `device="cuda"` in tensor factories, the fp32-gradient type assertion of
`clip_grad_by_total_norm_fp32`, `Tensor.cuda()` on the tied embedding of pipeline stages,
`torch.cuda.synchronize` in the torch_dist writer, and `Tensor.pin_memory()` where the distributed optimizer's
buffers move to the host.

What cannot run on the host at all: sequence parallelism (Megatron's torch norm refuses it, only Transformer
Engine's norms take it, and TE needs CUDA), packed THD micro-batches and context parallelism (TE's attention),
bf16. Those run in `tests/test_megatron_gpu.py`.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

from conftest import MINIMAL
from rl import checkpoint
from rl.batch import split_for_ranks
from rl.ports import free_port
from rlhpc.config import load_config
from test_torch_backend import make_samples

pytestmark = pytest.mark.skipif(importlib.util.find_spec("megatron") is None,
                                reason="megatron-core is not installed (pip install rlhpc[megatron])")

LAYOUTS = {
    "tp1": (1, []),
    "tp2": (2, ["perf.tensor_model_parallel_size=2"]),
    "pp2": (2, ["perf.pipeline_model_parallel_size=2"]),
    "dp2": (2, ["perf.use_distributed_optimizer=true"]),
}
SETTINGS = ["perf.train_backend=megatron", "perf.bf16=false", "optimizer.lr=1e-2", "grpo.entropy_coef=0.01",
            "grpo.use_kl_loss=true", "grpo.kl_loss_coef=0.1", "perf.cpu_threads=1"]
ASYNC_SAVE = {"tp2", "pp2", "dp2"}
"""Layouts whose first run saves with `ckpt.async_save`: the checkpoint, written while the next step runs, must
still hold the state of the moment the save began. The one-rank layout keeps Megatron's synchronous save."""
TOLERANCE = 2e-5
"""float32 on both sides; Megatron's attention and fused QKV sum in another order than transformers'."""


def _sizes(samples) -> dict[str, int]:
    return {"num_samples": len(samples), "num_tokens": sum(sum(s.loss_mask) for s in samples)}


def _optimizer_state(backend) -> list[dict]:
    """A copy: the optimizer's own state dict holds its live tensors, which the next step changes."""
    import copy

    chained = getattr(backend.optimizer, "chained_optimizers", [backend.optimizer])
    return [copy.deepcopy(o.optimizer.state_dict()["state"]) for o in chained]


def _weights(backend) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu", copy=True) for name, t in backend.named_weights()}


def _worker(rank: int, world: int, port: int, cuda: bool, config: str, overrides: list[str], model: str):
    if cuda:  # one GPU per rank, as Ray gives each training actor
        import os

        os.environ["CUDA_VISIBLE_DEVICES"] = str(rank)
    else:
        import megatron_cpu

        megatron_cpu.install()
    from rl.train.worker import TrainWorker

    cfg = load_config(config, [*SETTINGS, *overrides])
    return TrainWorker(cfg, rank=rank, world_size=world, master_addr="127.0.0.1", master_port=port,
                       init_from=model, total_steps=4, threads=1, host_engine=False)


def _rank(rank: int, world: int, port: int, cuda: bool, out: str, config: str, overrides: list[str], model: str,
          ckpt: str, resume: bool) -> None:
    worker = _worker(rank, world, port, cuda, config, overrides, model)
    backend = worker.backend
    samples = make_samples()
    # As the driver hands them out: each data-parallel rank trains on its share, with the batch's global sizes.
    mine = [samples[i] for i in split_for_ranks(len(samples), backend.dp_size)[backend.dp_rank]]
    result: dict = {"reports": backend.reports}
    if not resume:
        result["log_probs"] = backend.compute_log_probs(samples)
        result["first"] = backend.train_step(mine, **_sizes(samples))
        if not backend.cfg.perf.use_distributed_optimizer:  # whose main parameters are flat shards, all 1-D
            result["no_decay"] = sorted({g["weight_decay"] for g in backend.optimizer.param_groups
                                         if all(p.dim() == 1 for p in g["params"]) and g["params"]})
        # A colocated run's order: training memory leaves for the engines' sync (gradient buffers freed, then
        # the weights), the checkpoint is saved from there, and the memory comes back for the next step, which
        # must be the resumed run's, which never paused.
        backend.offload(weights=False)
        backend.offload(weights=True)
        worker.save(ckpt)  # with ckpt.async_save only begun: written while the next step changes the weights
        worker._staged()  # as the worker's `to_training` waits before training memory comes back
        backend.reload()
    else:
        worker.load(ckpt)
    result["step"] = backend.step
    result["weights_at_save"] = _weights(backend)
    result["optimizer_at_save"] = _optimizer_state(backend)
    result["second"] = backend.train_step(mine, **_sizes(samples))
    result["weights_after"] = _weights(backend)
    worker.saved()
    torch.save(result, f"{out}.{rank}")


def _run(target, world: int, out: str, *args) -> list[dict]:
    """`target(rank, world, port, cuda, out, *args)` in one fresh process per rank; what each saved to `out`.rank."""
    import torch.multiprocessing as mp

    port = free_port("127.0.0.1")
    mp.spawn(target, args=(world, port, torch.cuda.is_available(), out, *args), nprocs=world)
    return [torch.load(f"{out}.{r}", weights_only=True) for r in range(world)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_megatron_trains_saves_and_resumes_in_a_fresh_process(layout, write_config, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from rl.export import export_hf
    from rl.train.torch_backend import TorchBackend

    world, overrides = LAYOUTS[layout]
    if torch.cuda.is_available() and torch.cuda.device_count() < world:
        pytest.skip(f"{layout} needs {world} GPUs")
    overrides = [*overrides, *(["ckpt.async_save=true"] if layout in ASYNC_SAVE else [])]
    config = str(write_config(MINIMAL))
    root = tmp_path / "checkpoints"
    tmp = checkpoint.begin(root, 1)
    first = _run(_rank, world, str(tmp_path / "first"), config, overrides, str(tiny_model_dir), str(tmp), False)
    sealed = checkpoint.commit(root, tmp, 1)
    resumed = _run(_rank, world, str(tmp_path / "resumed"), config, overrides, str(tiny_model_dir), str(sealed), True)

    samples = make_samples()
    reference = TorchBackend(load_config(config, [s for s in SETTINGS if "megatron" not in s]),
                             init_from=tiny_model_dir, total_steps=4,
                             device="cuda" if torch.cuda.is_available() else "cpu")
    expected_log_probs = reference.compute_log_probs(samples)
    expected = reference.train_step(samples, **_sizes(samples))
    # The last pipeline stage's tensor-parallel rank 0 of each data-parallel rank holds its share's losses.
    reporters = [r for r in first if r["reports"]]
    reporter = reporters[0]
    for ours, theirs in zip(reporter["log_probs"], expected_log_probs, strict=True):
        assert torch.allclose(torch.tensor(ours), torch.tensor(theirs), atol=TOLERANCE), (ours, theirs)
    # The entropy bonus, the KL term and the clipped objective, summed over the micro-batches and the shares.
    for name in ("pg_loss", "entropy", "kl", "loss"):
        assert sum(r["first"][name] for r in reporters) == pytest.approx(expected[name], abs=TOLERANCE), name
    assert reporter["first"]["grad_norm"] == pytest.approx(expected["grad_norm"], rel=1e-4)
    # Norms, biases and q/k norms take no weight decay (Megatron's wd_mult = 0 for 1-D parameters).
    assert all(r["no_decay"] == [0.0] for r in first if "no_decay" in r)

    head = first[0]  # every rank gathers the whole policy by Hugging Face name
    assert head["weights_at_save"].keys() == AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict().keys()
    for rank, other in enumerate(first[1:], 1):
        _assert_same(other["weights_at_save"], head["weights_at_save"], f"rank {rank}'s whole policy")
    for rank, (a, b) in enumerate(zip(first, resumed, strict=True)):
        assert b["step"] == a["step"] == 1
        assert a["optimizer_at_save"] and any(a["optimizer_at_save"][0].values()), "no optimizer state to compare"
        _assert_same(a["optimizer_at_save"], b["optimizer_at_save"], f"rank {rank} optimizer state")
        _assert_same(a["weights_at_save"], b["weights_at_save"], f"rank {rank} weights")
        assert a["second"] == b["second"]
        _assert_same(a["weights_after"], b["weights_after"], f"rank {rank} weights after the next step")
    # `rlhpc export` of the run: the latest checkpoint's torch_dist weights as a Hugging Face folder.
    assert export_hf(root, tiny_model_dir, tmp_path / "hf") == sealed
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).state_dict()
    _assert_same({k: exported[k] for k in head["weights_at_save"]}, head["weights_at_save"], "exported weights")
    assert head["weights_after"] and any(not torch.equal(head["weights_after"][k], head["weights_at_save"][k])
                                         for k in head["weights_at_save"])


def _nonfinite_rank(rank: int, world: int, port: int, cuda: bool, out: str, config: str, overrides: list[str],
                    model: str) -> None:
    backend = _worker(rank, world, port, cuda, config, overrides, model).backend
    samples = make_samples()
    poisoned = [dataclasses.replace(samples[0], advantages=[float("nan")] * samples[0].response_length),
                *samples[1:]]
    before = [p.detach().clone() for p in backend.model.parameters()]
    skipped = backend.train_step(poisoned, **_sizes(samples))
    result = {"skipped": skipped["skipped_steps"], "step": backend.step,
              "unchanged": all(torch.equal(a, b) for a, b in zip(before, backend.model.parameters()))}
    taken = backend.train_step(samples, **_sizes(samples))
    result |= {"taken": taken["skipped_steps"], "grad_norm": taken["grad_norm"], "steps": backend.step,
               "finite": all(bool(p.isfinite().all()) for p in backend.model.parameters())}
    torch.save(result, f"{out}.{rank}")


@pytest.mark.parametrize("layout", ["tp1", "pp2"])
def test_megatron_skips_a_non_finite_step_on_every_rank(layout, write_config, tiny_model_dir, tmp_path):
    """Without a loss scaler (fp32 here, bf16 on GPUs) Megatron's optimizer would apply a NaN gradient: the
    backend skips the step on every rank (with pipeline stages only the last one sees the loss), counts it,
    and keeps the schedule's position; the next finite step is taken."""
    world, overrides = LAYOUTS[layout]
    if torch.cuda.is_available() and torch.cuda.device_count() < world:
        pytest.skip(f"{layout} needs {world} GPUs")
    ranks = _run(_nonfinite_rank, world, str(tmp_path / "out"), str(write_config(MINIMAL)), overrides,
                 str(tiny_model_dir))
    for r in ranks:
        assert r["skipped"] == 1.0 and r["step"] == 0 and r["unchanged"], r
        assert r["taken"] == 0.0 and r["steps"] == 1 and r["finite"] and r["grad_norm"] > 0, r


def _assert_same(a, b, what: str) -> None:
    """Bitwise equality of nested dicts / lists of tensors and numbers, with the first difference named."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            _assert_same(a[k], b[k], f"{what}[{k!r}]")
    elif isinstance(a, list):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{what}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), what
    else:
        assert a == b, what


def test_sequence_parallel_without_transformer_engine_is_refused(write_config):
    from rl.megatron.model import check_layer_spec

    cfg = load_config(write_config(MINIMAL), ["perf.train_backend=megatron", "perf.tensor_model_parallel_size=2",
                                               "perf.sequence_parallel=true"])
    with pytest.raises(ValueError, match="perf.sequence_parallel"):
        check_layer_spec(cfg.perf, te=False)
    check_layer_spec(cfg.perf, te=True)

