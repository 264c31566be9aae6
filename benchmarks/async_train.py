"""Async against sync training on the local cluster: samples per second of the same run, both ways.

    sudo .venv/bin/rlhpc cluster up --nodes 2 --cpus-per-node 2
    SLURM_CONF=/tmp/rlhpc-cluster/slurm.conf .venv/bin/python benchmarks/async_train.py

The tiny run (configs/tiny_cpu.toml with responses of up to `--response-len` tokens: 8 makes generation cost
about what training does) on two nodes, the training worker and the rollout engine in separate processes; once
synchronous, once with `rollout.async_train` (the next rollout generates while this one trains). Throughput is
the samples of rollouts 1..N−1 over the time between the first and the last rollout's end, so start-up is left
out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rl.tiny_model import build_tiny_model  # noqa: E402

RLHPC = str(Path(sys.executable).with_name("rlhpc"))


def one(model_dir: Path, mode: str, rollouts: int, response_len: int) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"async-{mode}-", dir=ROOT / "runs"))
    sets = [f"ckpt.hf_checkpoint='{model_dir}'", f"run.output_dir='{run_dir}'", f"rollout.num_rollout={rollouts}",
            f"rollout.rollout_max_response_len={response_len}", "rollout.n_samples_per_prompt=8",
            "eval.eval_interval=1000",
            "eval.skip_eval_before_train=true", "run.use_tensorboard=false",
            *(["rollout.async_train=true", "rollout.async_buffer_size=1"] if mode == "async" else [])]
    subprocess.run([RLHPC, "submit", str(ROOT / "configs" / "tiny_cpu.toml"), "--nodes", "2", "--cpus-per-task", "2",
                    "--wait", *[a for s in sets for a in ("--set", s)]], check=True, capture_output=True)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    samples = sum(16 * 8 for _ in rows[1:])
    return {"mode": mode, "samples_per_s": samples / (rows[-1]["timestamp"] - rows[0]["timestamp"]),
            "staleness_max": max(r["staleness"] for r in rows),
            "rollout_s": sum(r["time_rollout_s"] for r in rows) / len(rows),
            "train_s": sum(r["time_train_s"] for r in rows) / len(rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rollouts", type=int, default=12)
    ap.add_argument("--response-len", type=int, default=8, help="rollout_max_response_len")
    args = ap.parse_args()
    if "SLURM_CONF" not in os.environ:
        sys.exit("set SLURM_CONF to the local cluster's slurm.conf (see the docstring)")
    (ROOT / "runs").mkdir(exist_ok=True)
    model_dir = build_tiny_model(Path(tempfile.mkdtemp(prefix="async-model-", dir=ROOT / "runs")) / "tiny-qwen3")
    results = [one(model_dir, mode, args.rollouts, args.response_len) for mode in ("sync", "async")]
    print(json.dumps(results), file=sys.stderr)
    print("| mode | samples/s | generation per rollout (s) | training per rollout (s) | max staleness |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['samples_per_s']:.1f} | {r['rollout_s']:.2f} | {r['train_s']:.2f} | "
              f"{r['staleness_max']} |")
    print(f"async / sync: ×{results[1]['samples_per_s'] / results[0]['samples_per_s']:.2f}")


if __name__ == "__main__":
    main()
