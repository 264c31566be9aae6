"""Training tokens/s per GPU and model FLOPs utilisation of a Qwen3-4B-shaped model (random weights built from
its config) with the Megatron backend beside the torch backend on one GPU, and rollout tokens/s of the torch
engine and, where SGLang is installed, of the SGLang engine.

    .venv/bin/pip install -e '.[megatron]'   # plus transformer-engine where available
    .venv/bin/python benchmarks/gpu_throughput.py [--layers 36] [--seq-len 2048] [--steps 5]

MFU = achieved model FLOPs / peak dense bf16 FLOPs (989 TFLOP/s on an H100 SXM). Model FLOPs per trained token:
6·N (N the non-embedding parameters, forward and backward) + 6·V·h (the output layer) + 12·L·h·s (attention
scores and values over a sequence of s tokens). `--layers` below 36 keeps the torch backend's full fp32 Adam
state within one GPU's memory; tokens/s per layer is what carries over.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rl.batch import TrainSample  # noqa: E402
from rl.config import RLConfig  # noqa: E402
from rlhpc.config import load_config  # noqa: E402

PEAK_BF16 = 989e12
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, tie_word_embeddings=True,
                rms_norm_eps=1e-6)


def model_folder(layers: int) -> Path:
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config

    folder = Path(tempfile.mkdtemp(prefix="qwen3-4b-shape-"))
    config = Qwen3Config(**QWEN3_4B, num_hidden_layers=layers, pad_token_id=0, eos_token_id=1)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                            eos_token="t1", pad_token="t0").save_pretrained(folder)
    return folder


def flops_per_token(layers: int, seq_len: int) -> float:
    h, f, v = QWEN3_4B["hidden_size"], QWEN3_4B["intermediate_size"], QWEN3_4B["vocab_size"]
    q, kv = QWEN3_4B["num_attention_heads"] * 128, QWEN3_4B["num_key_value_heads"] * 128
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * f
    return 6 * layers * per_layer + 6 * v * h + 12 * layers * h * seq_len


def samples(n: int, seq_len: int) -> list[TrainSample]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        response = seq_len // 2
        tokens = [rng.randrange(2, QWEN3_4B["vocab_size"]) for _ in range(seq_len)]
        out.append(TrainSample(tokens, response, [1] * response, reward=1.0, rollout_log_probs=[-1.0] * response,
                               advantages=[rng.uniform(-1, 1)] * response))
    return out


def train_config(backend_name: str, folder: Path, max_tokens: int) -> RLConfig:
    return load_config(ROOT / "configs" / "tiny_cpu.toml", [
        f"ckpt.hf_checkpoint='{folder}'", f"perf.train_backend={backend_name}", "perf.use_dynamic_batch_size=true",
        f"perf.max_tokens_per_gpu={max_tokens}", "perf.bf16=true", "optimizer.lr=1e-6",
        # No reference model: its forward would run uncounted by the MFU's FLOPs.
        "grpo.use_kl_loss=false"])


def train_rate(backend_name: str, folder: Path, args) -> dict:
    cfg = train_config(backend_name, folder, args.max_tokens)
    if backend_name == "megatron":
        import torch.distributed as dist

        from rl.megatron.backend import MegatronBackend as Backend

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
        if not dist.is_initialized():
            dist.init_process_group("nccl", rank=0, world_size=1)
    else:
        from rl.train.torch_backend import TorchBackend as Backend
    backend = Backend(cfg, init_from=folder, total_steps=args.steps + 1, device="cuda")
    batch = samples(args.batch, args.seq_len)
    sizes = {"num_samples": len(batch), "num_tokens": sum(sum(s.loss_mask) for s in batch)}
    backend.train_step(batch, **sizes)  # warm-up: kernels chosen, buffers allocated
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        backend.train_step(batch, **sizes)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / args.steps
    tokens = args.batch * args.seq_len
    result = {"backend": backend_name, "tokens_per_s": tokens / seconds,
              "mfu": tokens / seconds * flops_per_token(args.layers, args.seq_len) / PEAK_BF16,
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    del backend
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return result


def rollout_rate(engine_name: str, folder: Path, args) -> dict:
    from rl.config import RolloutConfig, SglangConfig
    from rl.rollout.engine import SamplingParams

    if engine_name == "sglang":
        from rl.rollout.sglang_engine import SglangEngine

        engine = SglangEngine(str(folder), options=SglangConfig(sglang_mem_fraction_static=0.6),
                              update_weight_buffer_size=RolloutConfig.model_fields["update_weight_buffer_size"].default)
    else:
        from rl.rollout.torch_engine import TorchEngine

        engine = TorchEngine(folder, device="cuda", dtype=torch.bfloat16)
    prompts = [[random.Random(i).randrange(2, 1000) for _ in range(64)] for i in range(args.rollout_batch)]
    params = SamplingParams(max_new_tokens=args.response_len, temperature=1.0)
    start = time.perf_counter()
    out = engine.generate(prompts, params, seeds=list(range(len(prompts))))
    seconds = time.perf_counter() - start
    return {"engine": engine_name, "tokens_per_s": sum(len(g.output_ids) for g in out) / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=9216)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rollout-batch", type=int, default=64)
    p.add_argument("--response-len", type=int, default=256)
    p.add_argument("--backends", default="megatron,torch")
    args = p.parse_args()
    folder = model_folder(args.layers)
    results = {"device": torch.cuda.get_device_name(), "args": vars(args), "train": [], "rollout": []}
    for name in args.backends.split(","):
        try:
            results["train"].append(train_rate(name, folder, args))
        except torch.OutOfMemoryError as e:
            results["train"].append({"backend": name, "error": f"out of memory: {e}"[:200]})
        print(json.dumps(results["train"][-1]), flush=True)
    engines = ["torch"] + (["sglang"] if _has("sglang") else [])
    for name in engines:
        results["rollout"].append(rollout_rate(name, folder, args))
        print(json.dumps(results["rollout"][-1]), flush=True)
    print(json.dumps(results, indent=2))


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    main()
