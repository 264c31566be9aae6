"""The `rlhpc` command. Heavy libraries (torch, ray, megatron) are imported inside commands, never here,
so `rlhpc --help` stays instant."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from rich.table import Table

    from hpc.config import SlurmConfig
    from rlhpc.config import Config
    from rlhpc.status import RunStatus

REFUSED = 2
"""Exit code of a command that refused its input: a config, a path, a run's name, a folder, an option."""
FAILED = 1
"""Exit code of a command whose work failed: a job, a Slurm command, the local cluster, a drill."""


class Refused(Exception):
    """The input is refused; each argument is one error line."""


class Failed(Exception):
    """The work failed; each argument is one error line."""


_EXPECTED = [
    (REFUSED, "rlhpc.config", "ConfigError"), (REFUSED, "rlhpc.run_folder", "RunFolderError"),
    (REFUSED, "rlhpc.render", "RenderError"), (REFUSED, "rl.data", "DataError"), (REFUSED, "rl.errors", "RunError"),
    (REFUSED, "rlhpc.status", "NoSuchRun"),
    (FAILED, "rlhpc.submit", "JobFailed"), (FAILED, "rlhpc.drill", "DrillError"),
    (FAILED, "hpc.local_cluster", "ClusterError"),
]
"""Errors of rlhpc's own modules that commands let through, by where they are defined: an exception of one of
these classes means its module is loaded, so none is imported here (the CLI starts without torch or Ray)."""


def _exit_code(e: BaseException) -> int | None:
    """The one place exit codes are decided. None: not an expected failure (a bug), whose traceback stays."""
    if isinstance(e, Refused | OSError):  # OSError: a file named, or one a command writes
        return REFUSED
    if isinstance(e, Failed):
        return FAILED
    for code, module, name in _EXPECTED:
        if module in sys.modules and isinstance(e, getattr(sys.modules[module], name)):
            return code
    return None


def _lines(e: BaseException) -> list[str]:
    if isinstance(e, Refused | Failed):
        return [str(a) for a in e.args]
    if hasattr(e, "lines"):  # ConfigError: one line per problem, each naming file, line and field
        return list(e.lines())
    if isinstance(e, OSError) and e.filename and e.strerror:
        return [f"{e.filename}: {e.strerror}"]
    return [str(e)]


Command = TypeVar("Command", bound=Callable[..., Any])


class _Typer(typer.Typer):
    """Every command's expected failures end the same way: one error line each, the exit code `_exit_code`
    decides, no traceback."""

    def command(self, *args: Any, **kwargs: Any) -> Callable[[Command], Command]:
        register = super().command(*args, **kwargs)

        def decorator(f: Command) -> Command:
            @functools.wraps(f)
            def one_error_path(*a: Any, **kw: Any) -> Any:
                try:
                    return f(*a, **kw)
                except Exception as e:
                    code = _exit_code(e)
                    if code is None:
                        raise
                    for line in _lines(e):
                        _error(line)
                    raise typer.Exit(code) from None

            register(one_error_path)
            return f

        return decorator


app = _Typer(
    name="rlhpc",
    help="Slurm-native GRPO post-training of LLMs (Megatron-core + SGLang, orchestrated by Ray).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = _Typer(help="Inspect a run's configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")

out = Console()
err = Console(stderr=True)

ConfigArg = Annotated[Path, typer.Argument(help="The run's TOML file.", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a field, e.g. --set rollout.temperature=0.7 (repeatable).",
                 show_default=False),
]
NodesOpt = Annotated[int | None, typer.Option("--nodes", "-N", min=1, help="Nodes to allocate.")]
RunArg = Annotated[str, typer.Argument(help="Run name, run folder or Slurm job id.", show_default=False)]
NodePathsOpt = Annotated[bool, typer.Option("--paths-on-nodes", help="The config's input paths exist only on the "
                                            "compute nodes: do not check them here.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Point this config at a run folder that holds another "
                                        "run: its frozen config is replaced, its checkpoints resumed from.")]


SHORT_ATTEMPT_S = 600
"""Below this, the time before the stop signal is mostly Ray's and the actors' start-up: warn at submission."""


def _error(message: str) -> None:
    err.print(f"[bold red]error[/] {escape(message)}", highlight=False, soft_wrap=True)


def _load(path: Path, overrides: list[str] | None) -> Config:
    from rlhpc.config import load_config

    return load_config(path, overrides or [])


@app.command()
def validate(
    config: ConfigArg,
    overrides: SetOpt = None,
    strict: Annotated[bool, typer.Option(help="Also load every hook and read every prompt file; input paths "
                                         "missing on this machine are errors.")] = False,
) -> None:
    """Check a config: types, ranges, the batch constraint and the paths it names."""
    cfg = _load(config, overrides)
    missing = cfg.missing_paths()
    for field, path in missing:
        level = "[bold red]error[/]" if strict else "[yellow]warning[/]"
        err.print(f"{level} {config}: {field}: {path} does not exist on this machine", highlight=False, soft_wrap=True)
    if strict:
        from rlhpc.config import input_problems

        unreadable = input_problems(cfg)
        if missing or unreadable:
            raise Refused(*(f"{config}: {problem.field}: {problem.message}" for problem in unreadable))
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
        return
    try:
        output.write_text(text)
    except OSError as e:
        raise Refused(f"{output}: cannot write the schema: {e.strerror}") from e


@config_app.command("docs")
def config_docs(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file.")] = None,
) -> None:
    """Print the configuration reference (Markdown: every section's fields, types, defaults and meaning)."""
    from rlhpc.config_docs import render

    text = render()
    if output is None:
        typer.echo(text, nl=False)
        return
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
    except OSError as e:
        raise Refused(f"{output}: cannot write the reference: {e.strerror}") from e


@app.command()
def run(config: ConfigArg, overrides: SetOpt = None, force: ForceOpt = False) -> None:
    """Run the GRPO loop on this machine (Ray started locally); resumes from the run's latest checkpoint."""
    cfg = _load(config, overrides)
    from rl.loop import run as run_loop
    from rlhpc.run_folder import freeze

    run_dir = freeze(cfg, replace=force)
    out.print(f"run folder: {run_dir}", highlight=False, soft_wrap=True)
    result = run_loop(cfg, run_dir)
    rows = result["rows"]
    if rows:
        first = sum(r["reward_mean"] for r in rows[:5]) / len(rows[:5])
        last = sum(r["reward_mean"] for r in rows[-5:]) / len(rows[-5:])
        out.print(f"reward: first 5 rollouts {first:.3f} → last 5 rollouts {last:.3f}", highlight=False)


def _one_run(run_: str) -> Path:
    from rlhpc.status import find_runs

    runs = find_runs(run_)
    if len(runs) != 1:
        raise Refused(f"{run_}: several runs match ({', '.join(p.name for p in runs)}); name one")
    return runs[0].absolute()


@app.command()
def export(
    run_: RunArg,
    hf: Annotated[Path, typer.Option("--hf", help="Hugging Face folder to write.", show_default=False)],
) -> None:
    """Export a run's latest complete checkpoint as a Hugging Face model folder."""
    from rl.export import export_hf

    run_dir = _one_run(run_)
    cfg = _load(run_dir / "config.toml", [])
    folder = export_hf(cfg.save_dir(run_dir), cfg.ckpt.hf_checkpoint, hf)
    out.print(f"exported {folder} → {hf}", highlight=False, soft_wrap=True)


convert_app = _Typer(help="Convert weights between Hugging Face folders and Megatron torch_dist checkpoints "
                          "(needs megatron-core, `pip install rlhpc[megatron]`; runs on the host, no GPU needed).",
                          no_args_is_help=True)
app.add_typer(convert_app, name="convert")


@convert_app.command("hf-to-megatron")
def hf_to_megatron(
    hf: Annotated[Path, typer.Argument(help="Hugging Face model folder.", show_default=False)],
    out: Annotated[Path, typer.Argument(help="New folder for the torch_dist checkpoint (ckpt.ref_load).",
                                        show_default=False)],
    te: Annotated[bool | None, typer.Option("--te/--no-te", help="Transformer Engine's layer spec (the default where "
                                     "it is installed).")] = None,
) -> None:
    """Write a Hugging Face model as a torch_dist checkpoint that the Megatron backend loads under any layout."""
    from rl.megatron.convert import hf_to_torch_dist
    from rl.megatron.model import has_transformer_engine

    _convert(lambda: hf_to_torch_dist(hf, out, te=has_transformer_engine() if te is None else te), hf, out)


@convert_app.command("megatron-to-hf")
def megatron_to_hf(
    folder: Annotated[Path, typer.Argument(help="torch_dist checkpoint: written by hf-to-megatron, or a Megatron "
                                                "run's iter_NNNNNNN/megatron.", show_default=False)],
    out: Annotated[Path, typer.Argument(help="Hugging Face folder to write.", show_default=False)],
    tokenizer: Annotated[Path | None, typer.Option(help="Hugging Face folder to copy the tokenizer from.")] = None,
) -> None:
    """Write a torch_dist checkpoint as a Hugging Face folder that `from_pretrained` loads."""
    from rl.megatron.convert import torch_dist_to_hf

    _convert(lambda: torch_dist_to_hf(folder, out, tokenizer_from=tokenizer), folder, out)


def _convert(work: Callable[[], None], source: Path, dest: Path) -> None:
    try:
        work()
    except (ValueError, OSError) as e:  # OSError: a missing folder, or an output folder that exists
        raise Refused(f"{source}: {e}") from e
    out.print(f"converted {source} → {dest}", highlight=False, soft_wrap=True)


@app.command()
def plot(
    run_: RunArg,
    output: Annotated[Path | None,
                      typer.Option("--output", "-o", help="PNG to write (default RUN/curves.png).")] = None,
) -> None:
    """Plot reward, response length and KL over rollouts to a PNG."""
    from rl.plot import plot_run

    run_dir = _one_run(run_)
    try:
        png = plot_run(run_dir / "metrics.jsonl", output or run_dir / "curves.png")
    except ValueError as e:  # no rollouts yet
        raise Refused(str(e)) from e
    except OSError as e:
        raise Refused(f"{e.filename or output}: cannot write the plot: {e.strerror or e}") from e
    out.print(f"wrote {png}", highlight=False, soft_wrap=True)


def _slurm_flags(**flags: object) -> list[str]:
    """`--partition gpu` and friends as `--set slurm.partition="gpu"`: one path, validated like the file."""
    return [f"slurm.{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]


def _load_for_slurm(config: Path, overrides: list[str] | None, flags: list[str], nodes: int | None) -> Config:
    cfg = _load(config, [*(overrides or []), *flags])
    if nodes is not None and nodes > 1 and "actor_num_nodes" not in cfg.perf.model_fields_set:
        # --nodes N with no explicit actor_num_nodes: the training workers use every node of the allocation.
        cfg = _load(config, [*(overrides or []), *flags, f"perf.actor_num_nodes={nodes}"])
    return cfg


PartitionOpt = Annotated[str | None, typer.Option(help="Slurm partition.", show_default=False)]
OptStr = Annotated[str | None, typer.Option(show_default=False)]
OptInt = Annotated[int | None, typer.Option(min=0, show_default=False)]


@app.command()
def submit(
    config: ConfigArg,
    nodes: NodesOpt = None,
    partition: PartitionOpt = None,
    account: OptStr = None,
    qos: OptStr = None,
    time: Annotated[str | None, typer.Option(help="Time limit (4:00:00, 2-00:00:00).", show_default=False)] = None,
    gpus_per_node: OptInt = None,
    cpus_per_task: OptInt = None,
    mem: OptStr = None,
    constraint: OptStr = None,
    exclusive: Annotated[bool | None, typer.Option("--exclusive", help="Whole nodes.", show_default=False)] = None,
    nodelist: OptStr = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the sbatch script; submit nothing.")] = False,
    local: Annotated[bool, typer.Option("--local", help="Run through submitit's local executor here.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the job to end; exit non-zero if it failed.")] = False,
    overrides: SetOpt = None,
    force: ForceOpt = False,
    paths_on_nodes: NodePathsOpt = False,
) -> None:
    """Submit a run to Slurm (or run it through the local executor where no Slurm is reachable)."""
    flags = _slurm_flags(nodes=nodes, partition=partition, account=account, qos=qos, time=time,
                         gpus_per_node=gpus_per_node, cpus_per_task=cpus_per_task, mem=mem, constraint=constraint,
                         exclusive=exclusive, nodelist=nodelist)
    cfg = _load_for_slurm(config, overrides, flags, nodes)
    from rlhpc import submit as submission

    if dry_run:
        out.print(submission.sbatch_script(cfg, cfg.run_dir()), highlight=False, markup=False, soft_wrap=True)
        return
    _submit_and_report(cfg, local=local, wait=wait, replace=force, check_paths=not paths_on_nodes)


def _grace_short_of_save(slurm: SlurmConfig, run_dir: Path) -> str | None:
    """What is wrong when the stop signal's grace is shorter than the run's last measured save; None if it
    is not (or nothing was measured, or no signal is asked)."""
    from rl.timings import FILE, Timings

    save_s = Timings.read(run_dir).save_s
    if not slurm.signal_grace_s or save_s is None or save_s <= slurm.signal_grace_s:
        return None
    return (f"slurm.signal_grace_s ({slurm.signal_grace_s} s) is shorter than this run's last checkpoint save "
            f"({save_s:.0f} s, {run_dir / FILE}): after a preemption's signal no checkpoint fits, and the rollouts "
            "since the last one are redone (the stop before the time limit plans with the measured save)")


def _submit_and_report(cfg: Config, *, local: bool, wait: bool, replace: bool, check_paths: bool) -> None:
    from rlhpc import submit as submission

    # A job that cannot find its model or data fails only after its wait in the queue.
    missing = cfg.missing_paths() if check_paths else []
    if missing:
        raise Refused(*(f"{field}: {path} does not exist on this machine (--paths-on-nodes if it exists on the "
                        "compute nodes only)" for field, path in missing))

    if not local and not submission.slurm_reachable():
        local = True
        out.print("no Slurm reachable here (sbatch/sinfo): running through submitit's local executor instead")
    if local and cfg.slurm.nodes > 1:
        raise Refused(f"slurm.nodes = {cfg.slurm.nodes}: the local executor runs one node; submit to Slurm, or "
                      "try `rlhpc cluster up` for a local multi-node cluster")
    working = cfg.slurm.working_s
    if not local and working is not None and working < SHORT_ATTEMPT_S:
        err.print(f"[bold yellow]warning[/] each attempt has {working} s before the stop signal (slurm.time "
                  f"{cfg.slurm.time} less slurm.signal_grace_s {cfg.slurm.signal_grace_s}), start-up included: "
                  f"an attempt that completes no rollout still counts against slurm.max_requeues "
                  f"({cfg.slurm.max_requeues})", highlight=False, soft_wrap=True)
    if not local and (short := _grace_short_of_save(cfg.slurm, cfg.run_dir())):
        err.print(f"[bold yellow]warning[/] {short}", highlight=False, soft_wrap=True)
    done = submission.submit(cfg, local=local, replace=replace)
    out.print(f"submitted job {done.job_id} ({done.executor}); run folder: {done.run_dir}", highlight=False,
              soft_wrap=True)
    if wait:
        result = submission.wait(done)
        out.print(f"job {done.job_id} finished: {result['rollouts']} rollouts, last reward "
                  f"{result['last_reward']:.3f}", highlight=False)


@app.command()
def render(
    config: ConfigArg,
    nodes: NodesOpt = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the script here (else stdout).")] = None,
    overrides: SetOpt = None,
    force: ForceOpt = False,
) -> None:
    """Render a plain sbatch script that does what `rlhpc submit` does (and freeze the run's config)."""
    cfg = _load_for_slurm(config, overrides, _slurm_flags(nodes=nodes), nodes)
    from rlhpc.render import render as render_script
    from rlhpc.run_folder import write_private

    if output is not None and not output.parent.is_dir():  # before the run folder is made
        raise Refused(f"{output}: no folder {output.parent}")
    try:
        script = render_script(cfg, output, replace=force)
        if output is not None:
            write_private(output, script)
    except OSError as e:
        raise Refused(f"{e.filename or output}: {e.strerror}") from e
    if output is None:
        out.print(script, highlight=False, markup=False, soft_wrap=True, end="")
    else:
        err.print(f"wrote {output}; submit it with: sbatch {output}", highlight=False, soft_wrap=True)


def _status_table(rows: list[RunStatus]) -> Table:
    from rich.table import Table

    from rlhpc.status import duration

    table = Table(box=None, header_style="bold")
    for col in ["run", "job", "state", "nodes", "elapsed", "left", "requeues", "rollout", "reward", "checkpoint",
                "ETA", "left behind"]:
        table.add_column(col, justify="right" if col in {"nodes", "requeues", "reward"} else "left")
    colors = {"RUNNING": "green", "COMPLETED": "cyan", "PENDING": "yellow", "FAILED": "red", "CANCELLED": "red",
              "TIMEOUT": "red", "NODE_FAIL": "red", "PREEMPTED": "yellow"}
    for r in rows:
        state = f"[{colors.get(r.state, 'white')}]{r.state}[/]" + (f" ({escape(r.reason)})" if r.reason else "")
        table.add_row(
            escape(r.run), r.job_id or "-", state, str(r.nodes or "-"), duration(r.elapsed_s), duration(r.time_left_s),
            str(r.requeues) + (f" ({escape(r.interruptions[-1])})" if r.interruptions else ""),
            f"{r.rollout}/{r.num_rollout}" if r.num_rollout else str(r.rollout),
            f"{r.last_reward:.3f}" if r.last_reward is not None else "-",
            f"{r.checkpoint} ({duration(r.checkpoint_age_s)} ago)" if r.checkpoint else "-", duration(r.eta_s),
            escape("; ".join(f"{node}: {why}" for node, why in r.excluded.items())) or "-")
    return table


@app.command()
def status(
    run_: Annotated[str | None, typer.Argument(metavar="[RUN]", help="Run name, run folder or job id.")] = None,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between refreshes with --watch.")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show runs: Slurm state joined with each run's own progress."""
    import time

    from rlhpc.status import collect, find_runs

    runs = find_runs(run_)
    if as_json:
        out.print_json(json.dumps([r.as_dict() for r in collect(runs)]))
        return
    if not runs:
        out.print("no runs in runs/ (give a run folder, name or job id)")
        return
    if not watch:
        out.print(_status_table(collect(runs)))
        return
    from rich.live import Live

    with Live(_status_table(collect(runs)), console=out, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(_status_table(collect(runs)), refresh=True)
        except KeyboardInterrupt:
            pass


def _last_job(run_dir: Path) -> dict:
    from rlhpc.run_folder import submissions

    subs = submissions(run_dir)
    if not subs:
        raise Refused(f"{run_dir}: the run was never submitted (no submissions.jsonl)")
    return subs[-1]


@app.command()
def logs(
    run_: RunArg,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing as the logs grow.")] = False,
    node: Annotated[int, typer.Option("--node", min=0, help="Node rank of the allocation (0: the driver).")] = 0,
) -> None:
    """Print the logs of a run's current job on one node (stdout, then stderr)."""
    import os

    from rlhpc.run_folder import task_logs

    run_dir = _one_run(run_)
    job = _last_job(run_dir)
    files = [str(p) for p in task_logs(run_dir, job["job_id"], node)]
    if not any(Path(f).exists() for f in files) and not follow:
        raise Failed(f"no logs yet for job {job['job_id']} node {node} (looked for {files[0]} and .err)")
    os.execvp("tail", ["tail", "-n", "+1", *(["-F"] if follow else []), *[f for f in files if follow or
                                                                        Path(f).exists()]])


@app.command()
def cancel(run_: RunArg) -> None:
    """Cancel a run's current job and stop its requeueing."""
    from hpc.slurm import cancel as scancel
    from rlhpc.run_folder import mark_cancelled

    run_dir = _one_run(run_)
    job = _last_job(run_dir)
    job_id = str(job["job_id"])
    if job["executor"] == "slurm":
        mark_cancelled(run_dir)  # first: a requeue racing with the cancel finds the mark and stops
        try:
            scancel(job_id)
        except OSError as e:  # scancel failed or did not answer
            raise Failed(str(e)) from e
        running = True
    else:
        # submitit's local job id is its process id; -1 or 0 would signal every process the user can reach
        if not job_id.isdigit() or int(job_id) <= 1:
            raise Refused(f"{run_dir / 'submissions.jsonl'}: job id {job_id!r} is not the process id of a local "
                          "job; nothing was signalled")
        mark_cancelled(run_dir)
        running = _stop_local_job(int(job_id), job.get("started"))
    if running:
        out.print(f"cancelled job {job_id} of run {run_dir.name}; it will not be requeued", highlight=False)
    else:
        out.print(f"job {job_id} of run {run_dir.name} had already ended; the run is marked cancelled",
                  highlight=False)


def _stop_local_job(pid: int, started: str | None) -> bool:
    """SIGTERM the local job `pid` if the process of that id is still the job, the one that started at
    `started` (an id is reused once its process has ended); False when the job has ended."""
    import os
    import signal

    from hpc.processes import process_start

    now = process_start(pid)
    if now is None:
        return False
    if started is None:
        raise Failed(f"cannot tell whether process {pid} is still this run's job (its start time was not "
                     "recorded); nothing was signalled: stop it yourself if it is")
    if now != started:
        return False  # another program holds the id now
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    except OSError as e:
        raise Failed(f"signalling job {pid}: {e.strerror}") from e
    return True


@app.command()
def resume(
    run_: RunArg,
    nodes: NodesOpt = None,
    partition: PartitionOpt = None,
    time: Annotated[str | None, typer.Option(help="Time limit (4:00:00, 2-00:00:00).", show_default=False)] = None,
    local: Annotated[bool, typer.Option("--local", help="Run through submitit's local executor here.")] = False,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the job to end; exit non-zero if it failed.")] = False,
    overrides: SetOpt = None,
    paths_on_nodes: NodePathsOpt = False,
) -> None:
    """Submit a run again from its frozen config (plus --set, e.g. more rollouts); it continues from its latest
    complete checkpoint. For a run that ended (failed, timed out, cancelled, out of requeues): a requeued job
    resumes by itself."""
    from hpc.slurm import TERMINAL, queue
    from rlhpc.run_folder import CANCELLED

    run_dir = _one_run(run_)
    job = _last_job(run_dir)
    live = [j for j in queue([job["job_id"]]) if j.state not in TERMINAL] if job["executor"] == "slurm" else []
    if live:
        raise Refused(f"job {job['job_id']} of run {run_dir.name} is still {live[0].state}; it resumes by itself "
                      f"(`rlhpc cancel {run_dir.name}` first to start over)")
    (run_dir / CANCELLED).unlink(missing_ok=True)  # resuming is the user taking the run back up
    flags = _slurm_flags(nodes=nodes, partition=partition, time=time)
    # the run's own config, changed by --set: it replaces the frozen one
    _submit_and_report(_load_for_slurm(run_dir / "config.toml", overrides, flags, nodes), local=local, wait=wait,
                       replace=True, check_paths=not paths_on_nodes)


@app.command()
def drill(
    run_: RunArg,
    preempt: Annotated[bool, typer.Option("--preempt", help="Preempt the run with a job in a higher-priority "
                                          "partition.")] = False,
    timeout: Annotated[bool, typer.Option("--timeout", help="Send the signal that comes before the time "
                                          "limit.")] = False,
    requeue: Annotated[bool, typer.Option("--requeue", help="scontrol requeue: killed at once, no signal.")] = False,
    node_loss: Annotated[bool, typer.Option("--node-loss", help="Kill the run's Ray on its last node.")] = False,
    at: Annotated[str | None, typer.Option(help="Wait for this phase first: rollout, train, sync, eval, save.")] = None,
    partition: Annotated[str | None, typer.Option(help="The preempting partition (default: the highest "
                                                  "PriorityTier above the run's).", show_default=False)] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the run has resumed, and say from where.")] = False,
) -> None:
    """Rehearse an interruption on a live run through Slurm, to prove that requeue and resume work on this site."""
    from rl.heartbeat import PHASES
    from rlhpc import drill as drills

    kinds = [k for k, on in (("preempt", preempt), ("timeout", timeout), ("requeue", requeue),
                             ("node-loss", node_loss)) if on]
    if len(kinds) != 1:
        raise Refused("name one drill: --preempt, --timeout, --requeue or --node-loss")
    if at is not None and at not in PHASES:
        raise Refused(f"--at {at}: not a phase ({', '.join(PHASES)})")
    run_dir = _one_run(run_)
    cfg = _load(run_dir / "config.toml", [])
    try:
        done = drills.drill(run_dir, kinds[0], signal=cfg.slurm.signal, at=at, partition=partition)
        where = f" during {done.phase['phase']} of rollout {done.phase['rollout_id']}" if done.phase else ""
        out.print(f"job {done.job_id}{where}: {done.action}", highlight=False, soft_wrap=True)
        if wait:
            start = drills.wait_resumed(run_dir, done.job_id, done.attempt, timeout_s=900)
            out.print(f"resumed from checkpoint {start['resumed_from']}, {start['redone']} rollouts redone",
                      highlight=False)
    except OSError as e:  # a Slurm command that failed or did not answer
        raise Failed(str(e)) from e


cluster_app = _Typer(help="A real local Slurm cluster on this machine (tests, CI, trying rlhpc).",
                          no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")
StateDirOpt = Annotated[Path, typer.Option("--state-dir", help="Where the cluster keeps its config, state and logs.")]
CLUSTER_STATE_DIR = Path("/tmp/rlhpc-cluster")
"""hpc.local_cluster's DEFAULT_STATE_DIR (a test holds them equal), not imported from there: that module
brings jinja2, which every start of the command would then load."""


@cluster_app.command("up")
def cluster_up(
    nodes: Annotated[int, typer.Option("--nodes", "-N", min=1, help="Nodes of the cluster.")] = 2,
    cpus_per_node: Annotated[
        int | None, typer.Option(min=1, help="CPUs each node declares; the machine's by default.")] = None,
    accounting: Annotated[bool, typer.Option(help="Add slurmdbd with a local MariaDB, so sacct works.")] = False,
    state_dir: StateDirOpt = CLUSTER_STATE_DIR,
) -> None:
    """Start munged, slurmctld and one slurmd per node, each node in its own network namespace."""
    import os

    from hpc.local_cluster import LocalCluster, Spec

    c = LocalCluster(state_dir)
    spec = Spec(nodes=nodes, cpus_per_node=cpus_per_node or os.cpu_count() or 1, accounting=accounting)
    started = c.up(spec)
    word = "up" if started else "already up"
    out.print(f"local cluster {word}: {nodes} nodes, {spec.cpus_per_node} CPUs each, partitions batch (default) "
              f"and urgent (preempts batch)", highlight=False)
    out.print(f"use it with: export SLURM_CONF={c.conf}", highlight=False, soft_wrap=True)


@cluster_app.command("down")
def cluster_down(state_dir: StateDirOpt = CLUSTER_STATE_DIR) -> None:
    """Stop every daemon and job process of the local cluster and remove its namespaces and bridge."""
    from hpc.local_cluster import LocalCluster, check_prerequisites

    c = LocalCluster(state_dir)
    check_prerequisites()
    c.down()
    if left := c.leftovers():
        raise Failed("still there after down: " + "; ".join(left))
    out.print("local cluster down")


@cluster_app.command("status")
def cluster_status(state_dir: StateDirOpt = CLUSTER_STATE_DIR) -> None:
    """Say whether the local cluster is up, and the state of each node."""
    from hpc.local_cluster import LocalCluster

    c = LocalCluster(state_dir)
    spec = c.spec()
    if spec is None or not c.controller_alive():
        out.print("local cluster down" + (" (daemons missing: run `rlhpc cluster up`)" if spec else ""))
        raise typer.Exit(FAILED)
    out.print(f"local cluster up: SLURM_CONF={c.conf}", highlight=False, soft_wrap=True)
    failed = {n.name for n in c.failed_nodes(spec)}
    for node, state in c.node_states().items():
        address = next(n.addr for n in spec.node_list() if n.name == node)
        note = "  (failed: `rlhpc cluster up` restarts its slurmd)" if node in failed else ""
        out.print(f"  {node}  {address}  {state}{note}", highlight=False)


@cluster_app.command("fail")
def cluster_fail(
    node: Annotated[str, typer.Argument(help="The node to fail, e.g. node2.")],
    state_dir: StateDirOpt = CLUSTER_STATE_DIR,
) -> None:
    """Fail a node as a power cut would: its slurmd and every process on it killed at once. `rlhpc cluster up`
    brings it back."""
    from hpc.local_cluster import LocalCluster, check_prerequisites

    check_prerequisites()
    killed = LocalCluster(state_dir).fail_node(node)
    out.print(f"{node} failed: {len(killed)} processes killed (slurmd, job steps, Ray)", highlight=False)


@app.command()
def doctor(
    nodes: Annotated[int | None, typer.Option("--nodes", "-N", min=1, help="Also run a short job on N nodes: "
                                               "all-reduce bandwidth and clock skew between them.")] = None,
    partition: PartitionOpt = None,
    time_limit: Annotated[str, typer.Option("--time", help="Time limit of that job.")] = "10",
    run: Annotated[Path | None, typer.Option("--run", help="Also check this run folder: its last measured "
                                             "checkpoint save against its slurm.signal_grace_s.")] = None,
) -> None:
    """Check what breaks runs at sites: Slurm settings, Ray, CUDA, network, limits."""
    from rich.table import Table

    from hpc.doctor import Check, allreduce_probe, login_node_checks

    checks = login_node_checks()
    if run is not None:
        from rlhpc.config import load_config
        from rlhpc.run_folder import FROZEN

        slurm = load_config(run / FROZEN).slurm
        short = _grace_short_of_save(slurm, run)
        checks.append(Check("save vs signal grace", "warn" if short else "ok", f"{slurm.signal_grace_s} s",
                            short or "a checkpoint fits in the grace the stop signal gives (or none was measured)"))
    table = Table(box=None, header_style="bold")
    for col in ("check", "found", "meaning"):
        table.add_column(col)
    marks = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]", "info": "[blue]info[/]"}
    for c in checks:
        table.add_row(f"{marks[c.level]} {escape(c.name)}", escape(c.found), escape(c.detail))
    out.print(table)
    failed = any(c.level == "fail" for c in checks)
    if nodes is None:
        raise typer.Exit(FAILED if failed else 0)

    from hpc.config import SlurmConfig
    from rlhpc.submit import Submitted, slurm_executor, wait

    from pydantic import ValidationError

    folder = Path("runs") / "_doctor"
    try:
        slurm = SlurmConfig(nodes=nodes, partition=partition, time=time_limit, requeue=False, max_requeues=0)
    except ValidationError as e:
        raise Refused(*(f"slurm.{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in e.errors())) from e
    ex = slurm_executor(slurm, folder.absolute(), "rlhpc-doctor")
    job = ex.submit(allreduce_probe)
    out.print(f"submitted job {job.job_id} on {nodes} nodes: all-reduce bandwidth and clock skew ...")
    probe = wait(Submitted(folder, str(job.job_id), "slurm", job))
    for size, gbps in probe["busbw_GBps"].items():
        out.print(f"  all-reduce {int(size) >> 20:>4} MiB ({probe['backend']}, {len(probe['nodes'])} nodes): "
                  f"bus bandwidth {gbps:.2f} GB/s", highlight=False)
    out.print(f"  clock skew across nodes: {probe['clock_skew_s'] * 1e3:.1f} ms", highlight=False)
    raise typer.Exit(FAILED if failed else 0)
