"""The one-shot GPU check of the Megatron path, for a bare single-GPU machine with no network: Python, a CUDA
torch and transformers preinstalled there, rlhpc's other pure-Python dependencies carried in `.gpu-wheels/`
(`make gpu-wheels` fills it here, ≤ 64 MiB). No Ray: nothing below starts one.

    make gpu-wheels                                    # on a machine with the package registry
    python3 benchmarks/gpu_smoke.py [--minutes 8]      # on the GPU machine, in the checkout

In order, each step's output and timing printed as it ends, all within `--minutes`:
1. the wheels unpacked into `.gpu-site/`, first on the path (no resolver: the machine's torch stays);
2. `pytest -m gpu` on the Megatron tests, and `tests/test_megatron_backend.py` on CUDA: a training step, save,
   load in fresh processes (weights and Adam state bitwise), log-probs equal to the Hugging Face model's;
3. `benchmarks/gpu_throughput.py --backends megatron`: tokens/s and MFU of a Qwen3-4B-shaped model.
Record what it prints in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".gpu-wheels"
SITE = ROOT / ".gpu-site"


def step(name: str, argv: list[str], env: dict[str, str], deadline: float) -> bool:
    left = deadline - time.monotonic()
    print(f"\n=== {name} ({left:.0f} s left)\n$ {' '.join(argv)}", flush=True)
    if left < 10:
        print("skipped: no time left", flush=True)
        return False
    start = time.monotonic()
    try:
        rc = subprocess.run(argv, cwd=ROOT, env=env, timeout=left).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    print(f"=== {name}: exit {rc} after {time.monotonic() - start:.0f} s", flush=True)
    return rc == 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=8.0)
    p.add_argument("--layers", type=int, default=36, help="of the Qwen3-4B-shaped model (36 is the real depth)")
    args = p.parse_args()
    deadline = time.monotonic() + 60 * args.minutes
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SITE), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    wheels = sorted(str(w) for w in WHEELS.glob("*.whl"))
    if not wheels:
        print(f"no wheels in {WHEELS}: run `make gpu-wheels` where the package registry is reachable", flush=True)
        return 2
    # A wheel is a zip of what goes into site-packages: unpacked as it is, with no resolver that could reach
    # for the machine's torch, and no need for pip to be there.
    for wheel in wheels:
        zipfile.ZipFile(wheel).extractall(SITE)
    print(f"unpacked {len(wheels)} wheels into {SITE}", flush=True)
    pytest = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-o", "addopts="]
    ok = step("Megatron tests on the GPU", [*pytest, "tests/test_megatron_gpu.py", "tests/test_megatron_layout.py",
                                            "tests/test_megatron_backend.py"], env, deadline)
    ok &= step("MFU of a Qwen3-4B-shaped model", [sys.executable, "benchmarks/gpu_throughput.py", "--backends",
                                                  "megatron", "--layers", str(args.layers), "--steps", "3"],
               env, deadline)
    print("\nall steps passed" if ok else "\nsome step failed: see above", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
