"""`rlhpc render`: the run as a plain sbatch script (templates/sbatch/), for users who prefer `sbatch`.

The script runs the same entry as `rlhpc submit` (`python -m rlhpc.job RUN_DIR` on every node) with the same
`#SBATCH` options (`rlhpc.submit.sbatch_parameters`). No config value can inject a command: values are
shell-quoted and any control character (a newline would end an `#SBATCH` line) is refused.
"""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

import jinja2

from rlhpc.config import Config
from rlhpc.run_folder import freeze, jobs_dir
from rlhpc.submit import job_name, sbatch_parameters

TEMPLATES = Path(__file__).resolve().parents[1] / "templates" / "sbatch"
TEMPLATE = "rlhpc.sbatch.j2"
# Options the template writes itself (srun line, setup block) or that only submitit understands.
_NOT_SBATCH = {"setup", "srun_args", "signal_delay_s", "additional_parameters"}


class RenderError(ValueError):
    pass


def _checked(field: str, value: object) -> str:
    text = str(value)
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise RenderError(f"{field}: {text!r} contains a control character (a newline could start a command "
                          "in the script); remove it")
    return text


def sbatch_lines(cfg: Config, run_dir: Path) -> list[str]:
    params = sbatch_parameters(cfg.slurm, job_name(cfg))
    options = {k: v for k, v in params.items() if k not in _NOT_SBATCH and v is not None}
    options |= params["additional_parameters"]
    options |= {"output": f"{jobs_dir(run_dir)}/slurm-%j.out", "open_mode": "append"}
    lines = []
    for key, value in sorted(options.items()):
        flag = key.replace("_", "-")
        if value is True:
            lines.append(f"--{flag}")
        elif value is not False:
            lines.append(f"--{flag}={shlex.quote(_checked(f'slurm.{key}', value))}")
    return lines


def render(cfg: Config, script_path: Path | None = None) -> str:
    """Freeze the run's config in its run folder and return the sbatch script that runs it."""
    env = {name: _checked(f"slurm.env.{name}", value) for name, value in cfg.slurm.env.items()}
    bad = [name for name in env if not name.replace("_", "a").isalnum() or name[0].isdigit()]
    if bad:
        raise RenderError(f"slurm.env: {', '.join(bad)} is not an environment variable name")
    lines = sbatch_lines(cfg, cfg.run_dir())
    run_dir = freeze(cfg)
    jobs_dir(run_dir).mkdir(exist_ok=True)
    templates = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
                                   keep_trailing_newline=True, trim_blocks=True, autoescape=False)
    templates.filters["shquote"] = lambda v: shlex.quote(str(v))
    return templates.get_template(TEMPLATE).render(
        run_name=run_dir.name, rendered_at=time.strftime("%Y-%m-%d %H:%M"), sbatch_lines=lines,
        setup=cfg.slurm.setup, env=sorted(env.items()), run_dir=str(run_dir), python=sys.executable,
        script_path=script_path or "<this file>")
