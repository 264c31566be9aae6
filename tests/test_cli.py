from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from conftest import CONFIGS, MINIMAL
from rlhpc.cli import app

runner = CliRunner()
COMMANDS = ["validate", "config", "submit", "run", "export", "plot", "status", "logs", "cancel", "resume", "drill",
            "render", "cluster", "doctor", "convert"]


def test_help_lists_every_command():
    registered = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert sorted(registered + [g.name for g in app.registered_groups]) == sorted(COMMANDS)  # a new one is added here
    result = runner.invoke(app, ["--help"], terminal_width=200)
    assert result.exit_code == 0
    for command in COMMANDS:
        assert f" {command} " in result.output


def test_cli_start_up_imports_no_heavy_library():
    code = (
        "import sys; from rlhpc.cli import app; "
        "heavy = [m for m in ('torch', 'ray', 'megatron', 'sglang', 'transformers') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_cluster_commands_default_to_the_local_clusters_own_folder():
    from hpc.local_cluster import DEFAULT_STATE_DIR
    from rlhpc.cli import CLUSTER_STATE_DIR

    assert CLUSTER_STATE_DIR == DEFAULT_STATE_DIR


def test_validate_accepts_the_shipped_configs():
    for name in ("qwen3_4b.toml", "glm4_9b.toml", "tiny_cpu.toml"):
        result = runner.invoke(app, ["validate", str(CONFIGS / name)])
        assert result.exit_code == 0, result.output
        assert "ok" in result.output


def test_validate_reports_missing_paths_and_strict_fails_on_them():
    result = runner.invoke(app, ["validate", str(CONFIGS / "qwen3_4b.toml")])
    assert result.exit_code == 0 and "warning" in result.output and "ckpt.hf_checkpoint" in result.output
    result = runner.invoke(app, ["validate", "--strict", str(CONFIGS / "qwen3_4b.toml")])
    assert result.exit_code == 2 and "error" in result.output


def test_validate_fails_on_a_broken_batch_constraint(write_config):
    path = write_config(MINIMAL + "global_batch_size = 5\n")
    result = runner.invoke(app, ["validate", str(path)], terminal_width=400)
    assert result.exit_code == 2
    for field in ("rollout_batch_size", "n_samples_per_prompt", "global_batch_size", "num_steps_per_rollout"):
        assert f"rollout.{field}" in result.output


def test_validate_takes_overrides(write_config):
    path = write_config(MINIMAL)
    assert runner.invoke(app, ["validate", str(path), "--set", "rollout.temperature=0.7"]).exit_code == 0
    result = runner.invoke(app, ["validate", str(path), "--set", "rollout.temperture=0.7"], terminal_width=400)
    assert result.exit_code == 2 and "did you mean 'rollout.rollout_temperature'" in result.output


def test_config_show_prints_the_resolved_toml(write_config):
    result = runner.invoke(app, ["config", "show", str(write_config(MINIMAL)), "--set", "optimizer.lr=3e-6"])
    assert result.exit_code == 0
    assert "global_batch_size = 8" in result.output and "lr = 3e-06" in result.output
    assert "adam_beta2 = 0.98" in result.output  # defaults filled


def test_config_schema_is_json(tmp_path):
    result = runner.invoke(app, ["config", "schema"])
    assert result.exit_code == 0 and "rollout" in json.loads(result.output)["properties"]
    out = tmp_path / "schema.json"
    assert runner.invoke(app, ["config", "schema", "-o", str(out)]).exit_code == 0
    assert json.loads(out.read_text())["title"] == "Config"


def test_submit_refuses_an_invalid_config_before_anything_else(write_config):
    result = runner.invoke(app, ["submit", str(write_config(MINIMAL + "global_batch_size = 5\n")), "--nodes", "2"])
    assert result.exit_code == 2 and "batch constraint" in result.output


def test_a_wheel_carries_the_sbatch_template(tmp_path):
    """`rlhpc render` and `rlhpc submit` need templates/sbatch/ from an installed wheel too, not only from a
    checkout (rlhpc/templates links to it)."""
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path), str(root)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("rlhpc-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "rlhpc/templates/sbatch/rlhpc.sbatch.j2" in names


def one_error_line(result, *wanted: str, code: int = 2) -> None:
    """An expected failure: the exit code, one line, no traceback, and the words that name the thing."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    for word in wanted:
        assert word in result.output, result.output


def test_a_binary_config_file_is_an_error_line(tmp_path):
    path = tmp_path / "run.toml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    one_error_line(runner.invoke(app, ["validate", str(path)], terminal_width=400), str(path), "not a text file")


def test_writing_into_a_missing_folder_is_an_error_line(write_config, tmp_path):
    missing = tmp_path / "missing" / "x"
    result = runner.invoke(app, ["render", str(write_config(MINIMAL)), "-o", str(missing)], terminal_width=400)
    one_error_line(result, str(missing), "no folder")
    assert not (tmp_path / "runs").exists()  # nothing frozen for a script that was not written
    one_error_line(runner.invoke(app, ["config", "schema", "-o", str(missing)], terminal_width=400), str(missing),
                   "No such file or directory")


def test_plot_of_a_run_without_metrics_is_an_error_line(tmp_path, monkeypatch):
    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "config.toml").write_text("")
    monkeypatch.chdir(tmp_path)
    one_error_line(runner.invoke(app, ["plot", "a"], terminal_width=400), "metrics.jsonl: no rollouts yet")


def test_doctor_refuses_a_zero_time_limit(monkeypatch):
    import hpc.doctor

    monkeypatch.setattr(hpc.doctor, "login_node_checks", lambda: [])
    result = runner.invoke(app, ["doctor", "--nodes", "2", "--time", "0"], terminal_width=400)
    assert result.exit_code == 2 and "slurm.time" in result.output and "no time at all" in result.output
    assert "Traceback" not in result.output


def test_submit_refuses_input_paths_missing_here_unless_told_they_are_on_the_nodes(write_config, tmp_path,
                                                                                   monkeypatch):
    from rlhpc import submit as submission

    submitted = []
    monkeypatch.setattr(submission, "slurm_reachable", lambda: True)
    monkeypatch.setattr(submission, "submit", lambda cfg, **kw: submitted.append(cfg) or submission.Submitted(
        cfg.run_dir(), "7", "slurm", None))
    monkeypatch.chdir(tmp_path)
    path = write_config(MINIMAL.replace('"model"', '"/nodes/only/model"'))
    result = runner.invoke(app, ["submit", str(path)], terminal_width=400)
    assert result.exit_code == 2 and submitted == []
    assert "ckpt.hf_checkpoint: /nodes/only/model does not exist on this machine" in result.output
    assert "--paths-on-nodes" in result.output and not (tmp_path / "runs").exists()
    result = runner.invoke(app, ["submit", str(path), "--paths-on-nodes"], terminal_width=400)
    assert result.exit_code == 0 and "submitted job 7" in result.output and len(submitted) == 1


def test_validate_strict_loads_every_hook_and_reads_every_prompt_file(write_config, tmp_path):
    (tmp_path / "hooks.py").write_text("def reward(args, sample):\n    return 1.0\n")
    (tmp_path / "broken.py").write_text("def reward(args, sample)\n")
    (tmp_path / "eval.jsonl").write_text('{"input": "2+2=", "label": "4"}\n{"input": "3+3=", "lab\n')
    (tmp_path / "empty.jsonl").write_text("\n")
    good = MINIMAL + 'custom_rm_path = "hooks.py:reward"\n'
    assert runner.invoke(app, ["validate", "--strict", str(write_config(good))]).exit_code == 0
    bad = (MINIMAL.replace('rm_type = "math"', 'custom_rm_path = "broken.py:reward"')
           + 'custom_generate_function_path = "no_such_package.gen:generate"\n'
           + 'dynamic_sampling_filter_path = "hooks.py:no_such_function"\nover_sampling_batch_size = 8\n'
           + '[eval]\neval_prompt_data = { aime = "eval.jsonl", empty = "empty.jsonl" }\n')
    path = write_config(bad)
    assert runner.invoke(app, ["validate", str(path)]).exit_code == 0  # without --strict, the config alone
    result = runner.invoke(app, ["validate", "--strict", str(path)], terminal_width=400)
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 5, result.output
    assert "rollout.custom_rm_path: hook" in result.output and "SyntaxError" in result.output
    assert "rollout.custom_generate_function_path" in result.output and "no_such_package" in result.output
    assert "rollout.dynamic_sampling_filter_path" in result.output and "no function 'no_such_function'" in result.output
    assert f"eval.eval_prompt_data.aime: {tmp_path / 'eval.jsonl'}:2: not valid JSON" in result.output
    assert f"eval.eval_prompt_data.empty: {tmp_path / 'empty.jsonl'}: no prompts" in result.output


def test_one_error_path_decides_every_exit_code_and_leaves_bugs_visible(tmp_path, monkeypatch):
    """Expected failures, wherever a command meets them, end in one error line each and the exit code of their
    kind (input refused: 2, work failed: 1); anything else is a bug and keeps its traceback."""
    from rlhpc import cli

    monkeypatch.chdir(tmp_path)
    refused = runner.invoke(app, ["status", "no-such-run"])
    assert refused.exit_code == cli.REFUSED == 2 and "no-such-run: no run folder" in refused.output
    assert "Traceback" not in refused.output

    def bug(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr("rlhpc.status.find_runs", bug)
    crashed = runner.invoke(app, ["status", "x"])
    assert isinstance(crashed.exception, KeyError)  # not turned into an error line

    from rlhpc.submit import JobFailed

    assert cli._exit_code(JobFailed("job 7 failed")) == cli._exit_code(cli.Failed("x")) == cli.FAILED == 1
    assert cli._exit_code(OSError(2, "No such file or directory", "x.toml")) == cli.REFUSED
    assert cli._exit_code(ValueError("a bug")) is None
