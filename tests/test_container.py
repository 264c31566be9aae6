"""`[slurm.container]` (issue #23): each node's task of the batch script runs inside a container image, through
pyxis (srun's --container-* options) or Apptainer (`apptainer exec` around the task's command).

The rendered scripts are checked argument by argument: the srun line as shlex reads it, and the words bash
itself hands to srun when it runs the script (a stand-in srun records them with its environment).

Neither runtime can be installed on this project's machines, so no run here goes through the real one. What was
tried: `apt-cache policy apptainer singularity-container enroot` on Debian 12 finds no candidate for any of them
(none is in Debian 12's archive), PyPI ships neither binary, and building them is out of reach: Apptainer is a Go
program whose modules come from the Go proxy, which these machines do not reach; pyxis is a SPANK plugin compiled
against Slurm's headers that runs images through enroot, itself absent. What the real runtimes do with the words
written here is taken from their own sources and documentation (pyxis `args.c`: --container-env keeps the host's
value over the image's, mounts are `SRC:DST[:FLAGS]` separated by commas; Apptainer: APPTAINERENV_<NAME> wins over
the host's and the image's values, --bind, --pwd, --no-home, --nv). `test_no_real_runtime_is_installable_here` turns
red the day one of them becomes installable, so that a real run replaces the stand-in.

What does run: `test_a_rendered_apptainer_script_runs_on_the_local_cluster` sends the rendered Apptainer script
to the local Slurm cluster, with a stand-in `apptainer` (below) that gives the words rlhpc writes their
Apptainer meaning in bubblewrap (Debian's `bubblewrap`, installed by `make system-deps`): a new mount namespace
whose root is an image folder, --contain's private /tmp and /dev, binds, APPTAINERENV_. The 2-node run then
shows that rlhpc's entry, Ray and Slurm's client work inside a container that holds only the image and the
mounts rlhpc writes (the run folder) or the config lists, and that the batch script's environment reaches the
processes inside.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import MINIMAL
from rlhpc.cli import app
from rlhpc.config import ConfigError, load_config

runner = CliRunner()
PY = shlex.quote(sys.executable)
NCCL_ENV = '[slurm.env]\nNCCL_IB_HCA = "mlx5_0:1,mlx5_1:1"\nNCCL_DEBUG = "INFO"\n'
PYXIS = ('[slurm.container]\nruntime = "pyxis"\nimage = "slimerl/slime:latest"\n'
         'mounts = ["/data", "/models:/models:ro"]\n')
APPTAINER = ('[slurm.container]\nruntime = "apptainer"\nimage = "/images/slime.sif"\n'
             'mounts = ["/data", "/models:/models:ro"]\npython = "python3"\nworkdir = "/data"\n'
             'options = ["--writable-tmpfs"]\n')


def rendered(write_config, tmp_path: Path, text: str) -> tuple[Path, str]:
    run_dir = tmp_path / "run"
    config = write_config(MINIMAL + f'[run]\noutput_dir = "{run_dir}"\n' + text)
    script = tmp_path / "run.sbatch"
    result = runner.invoke(app, ["render", str(config), "-o", str(script)], terminal_width=400)
    assert result.exit_code == 0, result.output
    return run_dir, script.read_text()


def srun_words(script: str) -> list[str]:
    """The step's srun command line, as the shell reads it (continuation lines joined, up to the `&`)."""
    text = script.replace("\\\n", " ")
    [line] = [line for line in text.splitlines() if line.startswith("srun ")]
    words = shlex.split(line)
    assert words[-1] == "&"
    return words[:-1]


STEP = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--unbuffered"]


def logs(run_dir: Path) -> list[str]:
    return ["--output", f"{run_dir}/jobs/%j/%j_%t_log.out", "--error", f"{run_dir}/jobs/%j/%j_%t_log.err"]


def test_pyxis_is_srun_options_before_the_entry(write_config, tmp_path):
    run_dir, script = rendered(write_config, tmp_path, "[slurm]\ngpus_per_node = 8\n" + NCCL_ENV + PYXIS)
    assert srun_words(script) == [
        *STEP, *logs(run_dir),
        "--container-image=slimerl/slime:latest",
        f"--container-mounts=/data,/models:/models:ro,{run_dir}",  # the run folder at its own path, always
        f"--container-workdir={run_dir}",
        "--no-container-mount-home",
        "--container-env=NCCL_DEBUG,NCCL_IB_HCA",  # the host's values win over the image's
        sys.executable, "-u", "-m", "rlhpc.job", str(run_dir)]
    assert "APPTAINERENV_" not in script and "apptainer" not in script


def test_apptainer_wraps_the_entry(write_config, tmp_path):
    run_dir, script = rendered(write_config, tmp_path, "[slurm]\ngpus_per_node = 8\n" + NCCL_ENV + APPTAINER)
    assert srun_words(script) == [
        *STEP, *logs(run_dir),
        "apptainer", "exec", "--nv", "--bind=/data", "--bind=/models:/models:ro", f"--bind={run_dir}",
        "--pwd=/data", "--no-home", "--writable-tmpfs", "/images/slime.sif",
        "python3", "-u", "-m", "rlhpc.job", str(run_dir)]  # the image's interpreter
    assert "--container-" not in script
    for name in ("NCCL_DEBUG", "NCCL_IB_HCA"):  # what wins over the image's own environment
        assert f'export APPTAINERENV_{name}="${name}"\n' in script


def test_apptainer_without_gpus_or_options(write_config, tmp_path):
    run_dir, script = rendered(write_config, tmp_path, '[slurm.container]\nruntime = "apptainer"\n'
                                                       'image = "docker://slimerl/slime:latest"\nmount_home = true\n')
    assert srun_words(script)[len(STEP) + 4:] == [
        "apptainer", "exec", f"--bind={run_dir}", f"--pwd={run_dir}", "docker://slimerl/slime:latest",
        sys.executable, "-u", "-m", "rlhpc.job", str(run_dir)]  # no --nv without GPUs; home left to the site


def test_no_container_leaves_the_step_as_it_was(write_config, tmp_path):
    run_dir, script = rendered(write_config, tmp_path, NCCL_ENV)
    assert srun_words(script) == [*STEP, *logs(run_dir), sys.executable, "-u", "-m", "rlhpc.job", str(run_dir)]
    assert "--container-" not in script and "apptainer" not in script.lower()


def run_with_fake_srun(script: str, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """Run the batch script with bash, `srun` a stand-in that records its words and environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text('#!/bin/sh\nprintf "%s\\0" "$@" > "$RECORD.args"\nenv -0 > "$RECORD.env"\n')
    srun.chmod(srun.stat().st_mode | stat.S_IXUSR)
    path = tmp_path / "job.sh"
    path.write_text(script)
    record = tmp_path / "srun"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7", "RECORD": str(record)}
    done = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    words = Path(f"{record}.args").read_text().split("\0")[:-1]
    environ = dict(item.split("=", 1) for item in Path(f"{record}.env").read_text().split("\0") if "=" in item)
    return words, environ


def test_bash_hands_srun_these_words_and_the_environment(write_config, tmp_path):
    run_dir, script = rendered(write_config, tmp_path, "[slurm]\ngpus_per_node = 8\n" + NCCL_ENV + APPTAINER)
    words, environ = run_with_fake_srun(script, tmp_path)
    assert ["srun", *words] == srun_words(script)
    # srun passes its environment to the task, Apptainer the APPTAINERENV_ ones into the container over the image's
    assert environ["NCCL_IB_HCA"] == environ["APPTAINERENV_NCCL_IB_HCA"] == "mlx5_0:1,mlx5_1:1"
    assert environ["NCCL_DEBUG"] == environ["APPTAINERENV_NCCL_DEBUG"] == "INFO"


def test_bash_hands_srun_the_pyxis_options(write_config, tmp_path):
    run_dir, script = rendered(write_config, tmp_path, NCCL_ENV + PYXIS)
    words, environ = run_with_fake_srun(script, tmp_path)
    assert ["srun", *words] == srun_words(script)
    assert "--container-env=NCCL_DEBUG,NCCL_IB_HCA" in words and environ["NCCL_IB_HCA"] == "mlx5_0:1,mlx5_1:1"


def test_submit_sends_the_same_container_with_submitits_entry(write_config, tmp_path):
    from rlhpc.submit import sbatch_script

    cfg = load_config(write_config(MINIMAL + f'[run]\noutput_dir = "{tmp_path / "run"}"\n' + APPTAINER))
    script = sbatch_script(cfg, tmp_path / "run")
    words = srun_words(script)
    assert words[words.index("/images/slime.sif") + 1:] == [
        "python3", "-u", "-m", "submitit.core._submit", f"{tmp_path / 'run'}/jobs/%j"]
    assert 'export APPTAINERENV_SUBMITIT_EXECUTOR="$SUBMITIT_EXECUTOR"' in script  # what the entry needs, too
    pyxis = sbatch_script(load_config(write_config(MINIMAL + f'[run]\noutput_dir = "{tmp_path / "r2"}"\n' + PYXIS,
                                                   "pyxis.toml")), tmp_path / "r2")
    assert "--container-env=SUBMITIT_EXECUTOR" in srun_words(pyxis)


@pytest.mark.parametrize("table, field, words", [
    ('runtime = "docker"\nimage = "x"\n', "slurm.container.runtime", "pyxis"),
    ('runtime = "pyxis"\n', "slurm.container.image", "required"),
    ('runtime = "pyxis"\nimage = "x\\ntouch /tmp/pwned"\n', "slurm.container.image", "control character"),
    ('runtime = "pyxis"\nimage = "--container-remap-root"\n', "slurm.container.image", "option"),
    ('runtime = "pyxis"\nimage = "x"\nmounts = ["data:/data"]\n', "slurm.container.mounts", "absolute"),
    ('runtime = "pyxis"\nimage = "x"\nmounts = ["/a,/b"]\n', "slurm.container.mounts", "comma"),
    ('runtime = "apptainer"\nimage = "x"\nmounts = ["/a:/b:ro:x"]\n', "slurm.container.mounts", "SRC[:DST[:FLAGS]]"),
    ('runtime = "apptainer"\nimage = "x"\nworkdir = "work"\n', "slurm.container.workdir", "absolute"),
    ('runtime = "apptainer"\nimage = "x"\noptions = ["writable-tmpfs"]\n', "slurm.container.options", "option"),
    ('runtime = "apptainer"\nimage = "x"\nnv = true\n', "slurm.container.nv", ""),
])
def test_bad_values_name_their_field(write_config, table, field, words):
    with pytest.raises(ConfigError) as e:
        load_config(write_config(MINIMAL + "[slurm.container]\n" + table))
    assert field in str(e.value) and words in str(e.value)


def test_no_real_runtime_is_installable_here():
    """The stand-in below stays only while neither runtime can be installed (see the module's docstring)."""
    if shutil.which("apt-cache") is None:
        pytest.skip("not Debian")
    policy = subprocess.run(["apt-cache", "policy", "apptainer", "singularity-container", "enroot"],
                            capture_output=True, text=True)
    candidates = [line.split(":", 1)[1].strip() for line in policy.stdout.splitlines() if "Candidate:" in line]
    installable = [c for c in candidates if c != "(none)"] + [c for c in ("apptainer", "enroot") if shutil.which(c)]
    assert not installable, ("a container runtime can be installed here now: run the rendered script through it "
                             f"on the local cluster instead of the stand-in\n{policy.stdout}")


APPTAINER_STANDIN = r"""#!/bin/bash
# Stand-in for `apptainer exec` in bubblewrap: the options rlhpc writes (and --contain), with Apptainer's meaning.
set -eu
[ "${1-}" = exec ] || { echo "apptainer stand-in: only exec" >&2; exit 2; }
shift
home=1 contain=0 pwd=$PWD binds=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nv) ;;  # no GPU here; Apptainer warns and goes on without one
    --no-home) home=0 ;;
    -c|--contain) contain=1 ;;
    --bind=*) binds+=("${1#--bind=}") ;;
    --pwd=*) pwd=${1#--pwd=} ;;
    -*) echo "apptainer stand-in: unknown option $1" >&2; exit 2 ;;
    *) break ;;
  esac
  shift
done
image=$1
shift
echo "apptainer stand-in: exec in $image: $*" >&2
args=(--die-with-parent --proc /proc --bind /sys /sys)
for entry in "$image"/*; do  # a sandbox folder: its entries are the container's root
  target=$(readlink "$entry" || true)
  if [ -n "$target" ] && [ "${target#/}" = "$target" ]; then args+=(--symlink "$target" "/${entry##*/}")
  else args+=(--ro-bind "$entry" "/${entry##*/}"); fi
done
if [ $contain = 1 ]; then args+=(--dev /dev --tmpfs /dev/shm --tmpfs /tmp --tmpfs /var/tmp)
else
  args+=(--dev-bind /dev /dev --bind /tmp /tmp --bind /var/tmp /var/tmp)
  [ $home = 0 ] || args+=(--bind "$HOME" "$HOME")
fi
for spec in "${binds[@]}"; do
  IFS=: read -r src dst flags <<< "$spec"
  args+=("$([ "${flags-}" = ro ] && echo --ro-bind || echo --bind)" "$src" "${dst:-$src}")
done
for name in $(compgen -e); do  # APPTAINERENV_<NAME> sets NAME inside, over the host's value
  case "$name" in APPTAINERENV_*) args+=(--unsetenv "$name" --setenv "${name#APPTAINERENV_}" "${!name}") ;; esac
done
exec bwrap "${args[@]}" --chdir "$pwd" -- "$@"
"""

PROBE = """\
import json, os
if b"rlhpc.job" in open("/proc/self/cmdline", "rb").read():  # the entry of a node's task, in the container
    names = ("NCCL_IB_HCA", "RLHPC_PROBE_DIR", "SLURM_NODEID", "SUBMITIT_EXECUTOR")
    seen = {"env": {n: os.environ.get(n) for n in names}, "cwd": os.getcwd(),
            "host_only": os.path.exists(os.environ["RLHPC_PROBE_DIR"] + "/../host-only")}
    with open(os.path.join(os.getcwd(), "probe-" + os.environ["SLURM_NODEID"] + ".json"), "w") as f:
        json.dump(seen, f)
"""


@pytest.mark.slurm
def test_a_rendered_apptainer_script_runs_on_the_local_cluster(cluster, tiny_model_dir, tmp_path):
    from conftest import CONFIGS, ROOT, STATE, rlhpc, wait_gone

    if shutil.which("bwrap") is None:
        pytest.skip("needs bubblewrap (make system-deps installs it)")
    bin_dir, image, probe, run_dir = tmp_path / "bin", tmp_path / "image", tmp_path / "probe", tmp_path / "run"
    pwned = tmp_path / "pwned"
    for folder in (bin_dir, image, probe):
        folder.mkdir()
    (bin_dir / "apptainer").write_text(APPTAINER_STANDIN)
    (bin_dir / "apptainer").chmod(0o755)
    for name in ("usr", "etc"):  # an image made of the host's own system, nothing else of it
        (image / name).symlink_to(f"/{name}")
    for name in ("bin", "lib", "lib64", "sbin"):
        (image / name).symlink_to(f"usr/{name}")
    (probe / "sitecustomize.py").write_text(PROBE)
    (tmp_path / "host-only").write_text("seen only on the host")
    base = Path(sys.base_prefix)  # the venv's interpreter, which `python` unset runs from the host's path
    mounts = [f"{ROOT}:{ROOT}:ro", f"{base}:{base}:ro", f"{tiny_model_dir}:{tiny_model_dir}:ro", f"{probe}:{probe}:ro",
              str(STATE)]  # STATE: the cluster's slurm.conf and munge socket, for Slurm's client inside
    container = (f'{{runtime="apptainer", image="{image}", options=["--contain"], '
                 f'mounts=[{", ".join(repr(m).replace(chr(39), chr(34)) for m in mounts)}]}}')
    script = tmp_path / "run.sbatch"
    rendered = rlhpc("render", str(CONFIGS / "tiny_cpu.toml"), "--nodes", "2", "-o", str(script),
                     "--set", f"ckpt.hf_checkpoint='{tiny_model_dir}'", "--set", "rollout.num_rollout=1",
                     "--set", "rollout.n_samples_per_prompt=8", "--set", "eval.eval_interval=5",
                     "--set", f"run.output_dir='{run_dir}'", "--set", "slurm.cpus_per_task=2",
                     "--set", f"slurm.job_name='x; touch {pwned}'",
                     "--set", f"slurm.env={{PYTHONPATH='{probe}', RLHPC_PROBE_DIR='{probe}', NCCL_IB_HCA='a:1,b:1', "
                              f"RLHPC_INJECT='$(touch {pwned})'}}",
                     "--set", f"slurm.container={container}", env=cluster.env)
    assert rendered.returncode == 0, rendered.stderr
    env = {**cluster.env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    submitted = subprocess.run(["sbatch", "--parsable", str(script)], env=env, capture_output=True, text=True,
                               check=True)
    job_id = submitted.stdout.strip()
    wait_gone(job_id, cluster.env)
    logs = "".join(p.read_text() for p in (run_dir / "jobs" / job_id).glob("*_log.err"))
    assert logs.count("apptainer stand-in: exec in") == 2, logs[-3000:]
    result = json.loads((run_dir / "jobs" / job_id / "attempt-0" / "result.json").read_text())
    assert result["rollouts"] == 1 and set(result["ray_nodes"]) == {"node1", "node2"}
    assert not pwned.exists()  # config values reached the script quoted, never as commands
    [row] = json.loads(rlhpc("status", str(run_dir), "--json", env=cluster.env).stdout)
    assert (row["job_id"], row["state"], row["rollout"]) == (job_id, "COMPLETED", 1)
    for rank in ("0", "1"):
        seen = json.loads((run_dir / f"probe-{rank}.json").read_text())
        assert seen["env"] == {"NCCL_IB_HCA": "a:1,b:1", "RLHPC_PROBE_DIR": str(probe), "SLURM_NODEID": rank,
                               "SUBMITIT_EXECUTOR": None}
        assert seen["cwd"] == str(run_dir) and seen["host_only"] is False  # in the container, not on the host
