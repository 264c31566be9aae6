"""The batch script of a run (templates/sbatch/), one for both ways in: `rlhpc submit` hands it to submitit,
`rlhpc render` writes it for users who prefer `sbatch`.

The `#SBATCH` options come from the `[slurm]` section; the shell owns the stop signal and forwards it to the
tasks (see the template). No config value can inject a command: values are shell-quoted and any control
character (a newline would end an `#SBATCH` line) is refused.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Any

import jinja2

from hpc.config import SlurmConfig, no_control_characters
from rlhpc.config import Config
from rlhpc.run_folder import freeze, jobs_dir, leaving_behind

TEMPLATES = Path(__file__).parent / "templates" / "sbatch"
TEMPLATE = "rlhpc.sbatch.j2"
REQUEUE_MARGIN_S = 10
"""Of the grace, what the batch shell keeps to requeue the job itself when the tasks do not stop."""


class RenderError(ValueError):
    pass


def job_name(cfg: Config) -> str:
    return cfg.slurm.job_name or f"rlhpc-{cfg.run_dir().name}"


def fallback_s(grace_s: int) -> int:
    """When, after the signal, the batch shell requeues a job whose tasks have not stopped."""
    return max(grace_s - REQUEUE_MARGIN_S, grace_s // 2)


def sbatch_options(s: SlurmConfig, run_dir: Path, name: str) -> dict[str, Any]:
    """The `#SBATCH` options of a run: one task per node, requeue, the stop signal to the batch shell
    `signal_grace_s` before the time limit (none when 0), append-mode logs; `additional_parameters` win. None:
    not set."""
    options: dict[str, Any] = {
        "job_name": name, "nodes": s.nodes, "ntasks_per_node": 1,
        "time": s.time_minutes,  # None: the partition's default
        "partition": s.partition, "account": s.account, "qos": s.qos, "cpus_per_task": s.cpus_per_task,
        "mem": s.mem, "constraint": s.constraint, "nodelist": s.nodelist, "gpus_per_node": s.gpus_per_node or None,
        "exclusive": s.exclusive or None, "requeue": s.requeue or None,
        "signal": f"B:{s.signal}@{s.signal_grace_s}" if s.signal_grace_s else None,
        "output": f"{jobs_dir(run_dir)}/slurm-%j.out", "open_mode": "append",
    }
    return {**options, **s.additional_parameters}


def _checked(field: str, value: object) -> str:
    try:
        return no_control_characters(str(value))
    except ValueError as e:
        raise RenderError(f"{field}: {e}") from None


def sbatch_lines(s: SlurmConfig, run_dir: Path, name: str) -> list[str]:
    lines = []
    for key, value in sorted(sbatch_options(s, run_dir, name).items()):
        flag = key.replace("_", "-")
        if value is True:
            lines.append(f"--{flag}")
        elif value is not None and value is not False:
            lines.append(f"--{flag}={shlex.quote(_checked(f'slurm.{key}', value))}")
    return lines


def batch_script(s: SlurmConfig, run_dir: Path, name: str, command: str, *, env: dict[str, str] | None = None,
                 header: str = "") -> str:
    """The script of job `name` running `command` (a shell command line) as one task per node of the run at
    `run_dir`; `env` is exported after `[slurm.env]`."""
    exported = {var: _checked(f"slurm.env.{var}", value) for var, value in {**s.env, **(env or {})}.items()}
    if bad := [var for var in exported if not var.replace("_", "a").isalnum() or var[0].isdigit()]:
        raise RenderError(f"slurm.env: {', '.join(bad)} is not an environment variable name")
    templates = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                                   keep_trailing_newline=True, trim_blocks=True, autoescape=False)
    templates.filters["shquote"] = lambda v: shlex.quote(str(v))
    logs = jobs_dir(run_dir) / "%j"
    srun_options, wrapped, container_env = container_step(s, run_dir, command, sorted(exported))
    return templates.get_template(TEMPLATE).render(
        header=header, sbatch_lines=sbatch_lines(s, run_dir, name), setup=s.setup, env=sorted(exported.items()),
        run_dir=str(run_dir), python=sys.executable, command=wrapped, signal=s.signal, grace_s=s.signal_grace_s,
        fallback_s=fallback_s(s.signal_grace_s), container=s.container, container_srun=srun_options,
        container_gpus=s.gpus_per_node > 0, container_env=container_env,
        task_output=str(logs / "%j_%t_log.out"), task_error=str(logs / "%j_%t_log.err"))


def container_step(s: SlurmConfig, run_dir: Path, command: str, env_names: list[str]) -> tuple[str, str, list[str]]:
    """`[slurm.container]` in the step, as shell words: (srun's options, the command with its wrapper, the
    variables to hand to Apptainer as APPTAINERENV_<NAME>). No container: ("", `command`, [])."""
    c = s.container
    if c is None:
        return "", command, []
    if c.python is not None:  # the entry's interpreter: the host's, as submitit and `render` write it
        host = shlex.quote(sys.executable)
        if not command.startswith(host + " "):
            raise RenderError(f"slurm.container.python: the command does not start with {host}: {command}")
        command = shlex.quote(c.python) + command[len(host):]
    options, wrapper = c.step(str(run_dir), env_names, gpus=s.gpus_per_node > 0)
    words = " ".join(shlex.quote(_checked("slurm.container", w)) for w in wrapper)
    exported = env_names if c.runtime == "apptainer" else []
    return (" ".join(shlex.quote(_checked("slurm.container", o)) for o in options),
            f"{words} {command}" if words else command, exported)


def render(cfg: Config, script_path: Path | None = None, *, replace: bool = False) -> str:
    """Freeze the run's config in its run folder (`replace`: see `freeze`) and return a plain sbatch script
    that runs it, off the nodes the run leaves behind."""
    cfg = leaving_behind(cfg)
    run_dir = cfg.run_dir()
    shown = "<this file>" if script_path is None else shlex.quote(_checked("--output", script_path))
    header = (f"Rendered by `rlhpc render` for run {run_dir.name} ({time.strftime('%Y-%m-%d %H:%M')}). "
              f"Submit with: sbatch {shown}")
    command = f"{shlex.quote(sys.executable)} -u -m rlhpc.job {shlex.quote(str(run_dir))}"
    script = batch_script(cfg.slurm, run_dir, job_name(cfg), command, header=header)
    jobs_dir(freeze(cfg, replace=replace)).mkdir(exist_ok=True)  # only once the script is sound
    return script
