"""GRPO on CPU, rlhpc against TRL's GRPOTrainer: the same tiny model, prompts, group size, response length
and optimizer steps, in one run on this machine. Prints samples/s and peak RSS of each side and the ratios.

    .venv/bin/pip install trl datasets      # TRL is not a dependency of rlhpc
    .venv/bin/python benchmarks/grpo_cpu_vs_trl.py --rollouts 20

Each side runs in its own process; its peak RSS is the largest sum, over time, of the resident memory of
that process and all its descendants (for rlhpc: Ray's GCS, raylet and the worker actors included). A sum of
RSS counts the pages processes share (the torch and Python libraries every rlhpc process maps) once per
process, so the peak PSS (each shared page divided among its sharers) is printed beside it.
Samples/s counts generated samples over the training loop's wall time (model loading and start-up
excluded, reported separately).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def workload(args: argparse.Namespace) -> dict:
    return {"prompts_per_rollout": args.prompts, "group": args.group, "response_len": args.response_len,
            "steps_per_rollout": args.steps, "rollouts": args.rollouts, "lr": 3e-3, "threads": args.threads,
            "rlhpc_set": args.rlhpc_set}


def run_rlhpc(model: Path, w: dict, out: Path) -> dict:
    from rl.loop import Driver
    from rlhpc.config import load_config

    cfg = load_config(ROOT / "configs/tiny_cpu.toml", [
        f"ckpt.hf_checkpoint='{model}'", f"run.output_dir='{out}'", f"rollout.num_rollout={w['rollouts']}",
        f"rollout.rollout_batch_size={w['prompts_per_rollout']}", f"rollout.n_samples_per_prompt={w['group']}",
        f"rollout.num_steps_per_rollout={w['steps_per_rollout']}",
        f"rollout.rollout_max_response_len={w['response_len']}", f"optimizer.lr={w['lr']}",
        "eval.eval_interval=100000", "eval.skip_eval_before_train=true", "run.use_tensorboard=false",
        # TRL runs in one process with no reference model (beta = 0): the same placement and work here.
        "perf.colocate=true", "grpo.use_kl_loss=false", f"perf.cpu_threads={w['threads']}",
        # TRL forwards each optimizer step's samples as one batch: the same micro-batch here.
        "perf.use_dynamic_batch_size=false",
        f"perf.micro_batch_size={w['prompts_per_rollout'] * w['group'] // w['steps_per_rollout']}",
        f"ckpt.save_interval={10 * w['rollouts']}", *w["rlhpc_set"]])
    t0 = time.perf_counter()
    result = Driver(cfg, out).run()
    total = time.perf_counter() - t0
    rows = result["rows"]
    loop_s = sum(r["time_rollout_s"] + r["time_train_s"] + r["time_sync_s"] for r in rows)
    samples = len(rows) * w["prompts_per_rollout"] * w["group"]
    return {"samples": samples, "loop_s": loop_s, "total_s": total,
            "final_reward": sum(r["reward_mean"] for r in rows[-5:]) / len(rows[-5:])}


def run_trl(model: Path, w: dict, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(w["threads"])
    rows = [json.loads(line) for line in (ROOT / "data/arith/train.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "label": r["label"]} for r in rows])

    def exact(completions, label, **_):
        return [float(c.strip() == lab) for c, lab in zip(completions, label)]

    n_samples = w["prompts_per_rollout"] * w["group"]
    config = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=n_samples // w["steps_per_rollout"],
        steps_per_generation=w["steps_per_rollout"], num_generations=w["group"],
        max_completion_length=w["response_len"], max_steps=w["rollouts"] * w["steps_per_rollout"],
        learning_rate=w["lr"], lr_scheduler_type="constant", weight_decay=0.0, adam_beta2=0.98, beta=0.0,
        epsilon=0.2, epsilon_high=0.28, temperature=1.0, logging_steps=w["steps_per_rollout"], report_to=[],
        save_strategy="no", use_cpu=True, bf16=False, seed=1234, disable_tqdm=True, dataloader_num_workers=0)
    tokenizer = AutoTokenizer.from_pretrained(model)
    policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    rewards: list[float] = []

    class Rewards(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                rewards.append(logs["reward"])

    t0 = time.perf_counter()
    trainer = GRPOTrainer(model=policy, reward_funcs=exact, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Rewards()])
    t1 = time.perf_counter()
    trainer.train()
    t2 = time.perf_counter()
    return {"samples": w["rollouts"] * n_samples, "loop_s": t2 - t1, "total_s": t2 - t0,
            "final_reward": sum(rewards[-5:]) / max(1, len(rewards[-5:]))}


def measure(side: str, model: Path, w: dict) -> dict:
    """Run one side in a child process, sampling the resident memory of its process tree."""
    import psutil

    with tempfile.TemporaryDirectory() as tmp:
        result_file = Path(tmp) / "result.json"
        child = subprocess.Popen([sys.executable, __file__, "--side", side, "--model", str(model),
                                  "--workload", json.dumps(w), "--result", str(result_file)],
                                 env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                                      "TRANSFORMERS_VERBOSITY": "error"})
        root, peak, peak_pss = psutil.Process(child.pid), 0, 0
        for tick in itertools.count():
            if child.poll() is not None:
                break
            try:
                procs = [p for p in (root, *root.children(recursive=True)) if p.is_running()]
                peak = max(peak, sum(p.memory_info().rss for p in procs))
                if tick % 10 == 0:  # reading every process's page map costs CPU the side being measured needs
                    peak_pss = max(peak_pss, sum(p.memory_full_info().pss for p in procs))
            except psutil.Error:
                pass
            time.sleep(0.1)
        if child.returncode != 0:
            raise SystemExit(f"{side} failed with exit code {child.returncode}")
        result = json.loads(result_file.read_text())
    result["peak_rss_mib"], result["peak_pss_mib"] = peak / 2**20, peak_pss / 2**20
    result["samples_per_s"] = result["samples"] / result["loop_s"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rollouts", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--group", type=int, default=16)
    parser.add_argument("--response-len", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch threads of each side (rlhpc: of its training worker, which hosts the engine)")
    parser.add_argument("--rlhpc-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for rlhpc's side, e.g. grpo.use_rollout_logprobs=true")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side; the ratios' median is printed")
    parser.add_argument("--side", choices=["rlhpc", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:  # a child: run one side and write its figures
        w = json.loads(args.workload)
        with tempfile.TemporaryDirectory() as out:
            result = (run_rlhpc if args.side == "rlhpc" else run_trl)(args.model, w, Path(out))
        args.result.write_text(json.dumps(result))
        return

    from rl.tiny_model import build_tiny_model

    w = workload(args)
    print(f"workload: {json.dumps(w)}")
    print(f"{'':12}{'samples/s':>12}{'peak RSS MiB':>14}{'peak PSS MiB':>14}{'loop s':>9}{'total s':>9}"
          f"{'reward (last 5)':>17}")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_model(Path(tmp) / "tiny-qwen3")
        for k in range(args.repeats):  # the sides take turns, so that a slow spell of the machine hits both
            results = {side: measure(side, model, w) for side in ("trl", "rlhpc")}
            for side, r in results.items():
                print(f"{side:6} #{k + 1:<4}{r['samples_per_s']:12.1f}{r['peak_rss_mib']:14.0f}"
                      f"{r['peak_pss_mib']:14.0f}{r['loop_s']:9.1f}{r['total_s']:9.1f}{r['final_reward']:17.3f}")
            rl, trl = results["rlhpc"], results["trl"]
            ratios.append([rl[key] / trl[key] for key in ("samples_per_s", "peak_rss_mib", "peak_pss_mib")])
    speed, rss, pss = (statistics.median(column) for column in zip(*ratios))
    print(f"rlhpc / TRL (median of {args.repeats}): samples/s ×{speed:.2f}, peak RSS ×{rss:.2f}, peak PSS ×{pss:.2f}"
          f"  (samples/s ratios: {', '.join(f'{r[0]:.2f}' for r in ratios)})")


if __name__ == "__main__":
    main()
