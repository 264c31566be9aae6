"""The GPU throughput benchmark's setting, checked on the host: its MFU counts the FLOPs of the policy's forward
and backward, so no other forward may run in the timed steps."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from rl.train.torch_backend import TorchBackend

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_throughput.py"


def test_the_throughput_benchmark_trains_without_a_reference_model(tiny_model_dir):
    spec = importlib.util.spec_from_file_location("gpu_throughput", BENCHMARK)
    assert spec is not None and spec.loader is not None
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    for backend in ("torch", "megatron"):  # both build a reference model on the same rule
        cfg = benchmark.train_config(backend, tiny_model_dir, max_tokens=4096)
        assert not cfg.grpo.use_kl_loss and not cfg.grpo.kl_coef
    torch_cfg = benchmark.train_config("torch", tiny_model_dir, max_tokens=4096)
    assert TorchBackend(torch_cfg, init_from=str(tiny_model_dir), total_steps=2).ref is None
