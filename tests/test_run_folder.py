"""A run folder's identity: the fingerprint of its frozen config. Another config aimed at it is refused, a
folder rlhpc did not make is never written into, and a fresh start keeps the rows it would replace."""

from __future__ import annotations

import json
import logging

import pytest
from typer.testing import CliRunner

from conftest import MINIMAL
from rl.metrics import MetricsLog
from rlhpc.cli import app
from rlhpc.config import load_config
from rlhpc.run_folder import FINGERPRINT, RunFolderError, freeze

runner = CliRunner()


def render(path, *args: str):
    return runner.invoke(app, ["render", str(path), *args], terminal_width=400)


def test_two_configs_with_the_same_stem_are_two_runs(tmp_path, monkeypatch):
    """a/run.toml and b/run.toml both mean runs/run: the second is refused, naming resume and --force, and the
    first run's frozen config stays; the same config again is the same run."""
    monkeypatch.chdir(tmp_path)
    for name, lr in (("a", "1e-6"), ("b", "3e-6")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model").mkdir()
        (tmp_path / name / "train.jsonl").write_text('{"input": "1+1=", "label": "2"}\n')
        (tmp_path / name / "run.toml").write_text(MINIMAL + f"[optimizer]\nlr = {lr}\n")
    assert render(tmp_path / "a" / "run.toml").exit_code == 0
    frozen = (tmp_path / "runs" / "run" / "config.toml").read_text()
    assert (tmp_path / "runs" / "run" / FINGERPRINT).is_file()
    assert render(tmp_path / "a" / "run.toml").exit_code == 0  # the same run
    refused = render(tmp_path / "b" / "run.toml")
    assert refused.exit_code == 2 and len(refused.output.strip().splitlines()) == 1
    for words in ("holds another run", "optimizer.lr", "rollout.prompt_data", "rlhpc resume", "--force"):
        assert words in refused.output
    assert (tmp_path / "runs" / "run" / "config.toml").read_text() == frozen
    assert render(tmp_path / "b" / "run.toml", "--force").exit_code == 0
    assert load_config(tmp_path / "runs" / "run" / "config.toml").optimizer.lr == 3e-6


def test_a_folder_rlhpc_did_not_make_is_never_written_into(write_config, tmp_path):
    """output_dir naming the user's own folder: their config.toml is left as it is."""
    mine = '# my notes\n[ckpt]\nhf_checkpoint = "model"\n'
    (tmp_path / "config.toml").write_text(mine)
    result = render(write_config(MINIMAL + '[run]\noutput_dir = "."\n'))
    assert result.exit_code == 2 and "not a run folder rlhpc made" in result.output
    assert (tmp_path / "config.toml").read_text() == mine
    # an empty folder is the user's way of naming where the run goes
    (tmp_path / "empty").mkdir()
    assert render(write_config(MINIMAL + '[run]\noutput_dir = "empty"\n')).exit_code == 0


def test_the_file_system_root_is_no_run_folder(write_config):
    result = runner.invoke(app, ["validate", str(write_config(MINIMAL + '[run]\noutput_dir = "/"\n'))],
                           terminal_width=400)
    assert result.exit_code == 2 and "run.output_dir" in result.output and "root of the file system" in result.output


def test_a_run_folder_frozen_before_fingerprints_is_still_its_runs(write_config, tmp_path):
    cfg = load_config(write_config(MINIMAL + '[run]\noutput_dir = "out"\n'))
    run_dir = freeze(cfg)
    (run_dir / FINGERPRINT).unlink()
    assert freeze(cfg) == run_dir
    other = load_config(write_config(MINIMAL + '[run]\noutput_dir = "out"\n[grpo]\neps_clip = 0.1\n'))
    (run_dir / FINGERPRINT).unlink()
    with pytest.raises(RunFolderError, match="grpo.eps_clip"):
        freeze(other)
    assert freeze(other, replace=True) == run_dir  # what `resume --set` and `--force` do


def test_the_cluster_sections_do_not_change_the_run(write_config):
    """--time, --nodes and friends change from one submission of a run to the next."""
    path = write_config(MINIMAL + '[run]\noutput_dir = "out"\n')
    freeze(load_config(path))
    freeze(load_config(path, ['slurm.time="4:00:00"', "slurm.partition='gpu'", "ray.dashboard=true"]))


def test_a_fresh_start_keeps_the_rows_it_replaces(tmp_path, caplog):
    rows = [{"rollout_id": i, "reward_mean": 0.5} for i in range(3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING):
        log = MetricsLog(tmp_path, tensorboard=False, resume_from=0)
    assert log.dropped == 3 and log.rows() == []
    (kept,) = tmp_path.glob("metrics.before-*.jsonl")
    assert [json.loads(line) for line in kept.read_text().splitlines()] == rows and str(kept) in caplog.text
    # a resume from a checkpoint drops only the rollouts after it, which it redoes
    MetricsLog(tmp_path, tensorboard=False).write(rows[0])
    MetricsLog(tmp_path, tensorboard=False, resume_from=1)
    assert len(list(tmp_path.glob("metrics.before-*.jsonl"))) == 1
