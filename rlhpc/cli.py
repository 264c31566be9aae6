"""The `rlhpc` command. Heavy libraries (torch, ray, megatron) are imported inside commands, never here,
so `rlhpc --help` stays instant."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from rlhpc.config import Config

app = typer.Typer(
    name="rlhpc",
    help="Slurm-native GRPO post-training of LLMs (Megatron-core + SGLang, orchestrated by Ray).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect a run's configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

out = Console()
err = Console(stderr=True)

ConfigArg = Annotated[Path, typer.Argument(help="The run's TOML file.", show_default=False)]
SetOpt = Annotated[
    list[str],
    typer.Option("--set", help="Override a field, e.g. --set rollout.temperature=0.7 (repeatable).", show_default=False),
]
NodesOpt = Annotated[int, typer.Option("--nodes", "-N", min=1, help="Nodes to allocate.")]
RunArg = Annotated[str, typer.Argument(help="Run name, run folder or Slurm job id.", show_default=False)]


def _error(message: str) -> None:
    err.print(f"[bold red]error[/] {escape(message)}", highlight=False, soft_wrap=True)


def _load(path: Path, overrides: list[str] | None) -> Config:
    from rlhpc.config import ConfigError, load_config

    try:
        return load_config(path, overrides or [])
    except ConfigError as e:
        for line in e.lines():
            _error(line)
        raise typer.Exit(2) from None


def _not_yet(command: str, issue: int, what: str) -> NoReturn:
    err.print(f"rlhpc {command} is not available yet: it arrives with issue #{issue} ({what}).")
    raise typer.Exit(1)


@app.command()
def validate(
    config: ConfigArg,
    overrides: SetOpt = None,
    strict: Annotated[bool, typer.Option(help="Treat input paths missing on this machine as errors.")] = False,
) -> None:
    """Check a config: types, ranges, the batch constraint and the paths it names."""
    cfg = _load(config, overrides)
    missing = cfg.missing_paths()
    for field, path in missing:
        level = "[bold red]error[/]" if strict else "[yellow]warning[/]"
        err.print(f"{level} {config}: {field}: {path} does not exist on this machine", highlight=False, soft_wrap=True)
    if strict and missing:
        raise typer.Exit(2)
    r = cfg.rollout
    out.print(
        f"[green]ok[/] {config}: {r.rollout_batch_size} prompts × {r.n_samples_per_prompt} samples = "
        f"{r.global_batch_size} × {r.num_steps_per_rollout} optimizer step(s) per rollout",
        highlight=False,
        soft_wrap=True,
    )


@config_app.command("show")
def config_show(config: ConfigArg, overrides: SetOpt = None) -> None:
    """Print the resolved config as TOML, every default filled in."""
    from rlhpc.config import dump_toml

    typer.echo(dump_toml(_load(config, overrides)), nl=False)


@config_app.command("schema")
def config_schema(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file.")] = None,
) -> None:
    """Print the JSON schema of the config file, for editor completion."""
    from rlhpc.config import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text)


@app.command()
def run(config: ConfigArg, overrides: SetOpt = None) -> None:
    """Run the GRPO loop on this machine (Ray started locally); resumes from the run's latest checkpoint."""
    cfg = _load(config, overrides)
    from rl.data import DataError
    from rl.loop import RunError, run_dir_of
    from rl.loop import run as run_loop
    from rlhpc.config import dump_toml

    run_dir = run_dir_of(cfg)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # The resolved config is frozen in the run folder: what ran is what is recorded.
        (run_dir / "config.toml").write_text(dump_toml(cfg))
        out.print(f"run folder: {run_dir}", highlight=False, soft_wrap=True)
        result = run_loop(cfg, run_dir)
    except (RunError, DataError, OSError) as e:
        _error(str(e))
        raise typer.Exit(2) from None
    rows = result["rows"]
    if rows:
        first = sum(r["reward_mean"] for r in rows[:5]) / len(rows[:5])
        last = sum(r["reward_mean"] for r in rows[-5:]) / len(rows[-5:])
        out.print(f"reward: first 5 rollouts {first:.3f} → last 5 rollouts {last:.3f}", highlight=False)


def _run_folder(run_: str) -> Path:
    path = Path(run_)
    if not path.is_dir() and (Path("runs") / run_).is_dir():
        path = Path("runs") / run_
    if not (path / "config.toml").exists():
        _error(f"{run_}: not a run folder (no config.toml)")
        raise typer.Exit(2)
    return path.absolute()


@app.command()
def export(
    run_: RunArg,
    hf: Annotated[Path, typer.Option("--hf", help="Hugging Face folder to write.", show_default=False)],
) -> None:
    """Export a run's latest complete checkpoint as a Hugging Face model folder."""
    from rl.export import export_hf

    run_dir = _run_folder(run_)
    cfg = _load(run_dir / "config.toml", [])
    from rl.loop import save_dir_of

    try:
        folder = export_hf(save_dir_of(cfg, run_dir), cfg.ckpt.hf_checkpoint, hf)
    except FileNotFoundError as e:
        _error(str(e))
        raise typer.Exit(2) from None
    out.print(f"exported {folder} → {hf}", highlight=False, soft_wrap=True)


@app.command()
def plot(
    run_: RunArg,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="PNG to write (default RUN/curves.png).")] = None,
) -> None:
    """Plot reward, response length and KL over rollouts to a PNG."""
    from rl.plot import plot_run

    run_dir = _run_folder(run_)
    png = plot_run(run_dir / "metrics.jsonl", output or run_dir / "curves.png")
    out.print(f"wrote {png}", highlight=False, soft_wrap=True)


@app.command()
def submit(config: ConfigArg, nodes: NodesOpt = 1, overrides: SetOpt = None) -> None:
    """Submit a run to Slurm (or run it through the local executor where no Slurm is reachable)."""
    _load(config, overrides)
    _not_yet("submit", 5, "Slurm-native execution")


@app.command()
def render(config: ConfigArg, nodes: NodesOpt = 1, overrides: SetOpt = None) -> None:
    """Render a plain sbatch script that does what `rlhpc submit` does."""
    _load(config, overrides)
    _not_yet("render", 5, "Slurm-native execution")


@app.command()
def status(run_: Annotated[str | None, typer.Argument(metavar="[RUN]", help="Run name or job id.")] = None) -> None:
    """Show runs: Slurm state joined with each run's own progress."""
    _not_yet("status", 5, "Slurm-native execution")


@app.command()
def logs(run_: RunArg) -> None:
    """Show a run's logs."""
    _not_yet("logs", 5, "Slurm-native execution")


@app.command()
def cancel(run_: RunArg) -> None:
    """Cancel a run's current job and stop its requeueing."""
    _not_yet("cancel", 5, "Slurm-native execution")


@app.command()
def resume(run_: RunArg) -> None:
    """Resume a run from its latest complete checkpoint."""
    _not_yet("resume", 6, "preemption, requeue and fault tolerance")


@app.command()
def cluster(action: Annotated[str, typer.Argument(help="up, down or status.")]) -> None:
    """Bring a real local Slurm cluster up or down on this machine (for tests and trying rlhpc)."""
    _not_yet("cluster", 5, "Slurm-native execution")


@app.command()
def doctor() -> None:
    """Check what breaks runs at sites: Slurm settings, Ray, CUDA, network, limits."""
    _not_yet("doctor", 5, "Slurm-native execution")
