"""W&B logging (issue 23): one W&B run per rlhpc run across stops and resumes, the rows of metrics.jsonl at their
rollout ids, read back from the files W&B writes in offline mode."""

from __future__ import annotations

import json
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import MINIMAL
from rl import wandb_run
from rl.metrics import MetricsLog, read_jsonl
from rlhpc.config import ConfigError, load_config

BLOCK, HEADER = 32768, 7  # W&B's transaction log: LevelDB's log format, 32 KiB blocks of framed records
FULL, LAST = 1, 4


def wandb_records(path: Path):
    """The protobuf records of one `.wandb` file, as W&B's service wrote them (its own Python reader is gone)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0:
            pos += BLOCK - pos % BLOCK
            continue
        pending += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def offline_runs(wandb_dir: Path) -> list[tuple[object, dict[int, dict[str, float]]]]:
    """Per attempt (offline-run-* folder, in order): its run record and its history, step -> metrics. Each file
    must be whole, up to its exit record, once MetricsLog.close has returned."""
    attempts = []
    for path in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
        run, history, kind = None, {}, None
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                history[record.history.step.num] = {k: v for k, v in items.items() if not k.startswith("_")}
        assert kind == "exit", f"{path} ends before W&B's exit record"
        attempts.append((run, history))
    return attempts


def wandb_config(tmp_path: Path, *extra: str):
    """A run's config with offline W&B logging into its own run folder."""
    text = MINIMAL + f'[run]\noutput_dir = "{tmp_path / "run"}"\nuse_wandb = true\nwandb_mode = "offline"\n'
    (tmp_path / "train.jsonl").write_text('{"input": "1+1=", "label": "2"}\n')
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "run.toml").write_text(text + "".join(f"{line}\n" for line in extra))
    return load_config(tmp_path / "run.toml")


def row(rollout_id: int) -> dict:
    out = {"rollout_id": rollout_id, "num_rollout": 6, "timestamp": 1.0, "reward_mean": rollout_id / 10,
           "checkpoint": "iter_0000002"}
    return out | ({"eval/aime/pass@1": 0.5} if rollout_id % 2 else {})


def test_a_resumed_run_logs_to_the_same_wandb_run_each_rollout_once(tmp_path):
    cfg = wandb_config(tmp_path, 'wandb_project = "p"', 'wandb_group = "g"')
    run_dir = tmp_path / "run"
    log = MetricsLog(run_dir, tensorboard=False, wandb=cfg)
    for i in range(4):
        log.write(row(i))
    log.close()
    # resumed from checkpoint 2: rollouts 2 and 3 are redone (their rows dropped, written again), then 4 and 5
    log = MetricsLog(run_dir, tensorboard=False, resume_from=2, wandb=cfg)
    for i in range(2, 6):
        log.write(row(i))
    log.close()

    (first, steps_a), (second, steps_b) = offline_runs(run_dir)
    run_id = json.loads((run_dir / wandb_run.STATE).read_text())["id"]
    assert first.run_id == second.run_id == run_id
    assert (first.project, first.run_group, first.display_name) == ("p", f"g_{run_id}", f"g_{run_id}")
    assert sorted(steps_a) == [0, 1, 2, 3] and sorted(steps_b) == [4, 5]  # W&B has no step twice
    rows = {r["rollout_id"]: r for r in read_jsonl(run_dir / "metrics.jsonl")}
    for step, metrics in (steps_a | steps_b).items():
        assert metrics == {"rollout/reward_mean": rows[step]["reward_mean"],
                           **({"eval/aime/pass@1": 0.5} if step % 2 else {})}


def test_without_the_random_suffix_the_wandb_run_is_named_after_the_group_or_the_run(tmp_path):
    cfg = wandb_config(tmp_path, "disable_wandb_random_suffix = true")
    MetricsLog(tmp_path / "run", tensorboard=False, wandb=cfg).close()
    [(run, _)] = offline_runs(tmp_path / "run")
    assert run.run_group == run.display_name == "run"


def test_wandbs_processes_outlive_the_jobs_stop_signal(tmp_path):
    """Slurm sends the stop signal to every process of the step; the run goes on to its safe point, and W&B's
    processes with it."""
    import psutil

    log = MetricsLog(tmp_path / "run", tensorboard=False, wandb=wandb_config(tmp_path))
    children = [p for p in psutil.Process().children(recursive=True) if p.name().startswith("wandb")]
    assert children
    for child in children:
        child.send_signal(signal.SIGUSR2)
    log.write(row(0))
    time.sleep(0.5)
    assert all(child.is_running() and child.status() != psutil.STATUS_ZOMBIE for child in children)
    log.close()
    [(_, steps)] = offline_runs(tmp_path / "run")
    assert list(steps) == [0]


def test_a_disabled_wandb_writes_nothing(tmp_path):
    cfg = wandb_config(tmp_path)
    cfg.run.wandb_mode = "disabled"
    log = MetricsLog(tmp_path / "run", tensorboard=False, wandb=cfg)
    log.write(row(0))
    log.close()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl"]


def test_wandb_fields_without_use_wandb_are_refused(write_config):
    with pytest.raises(ConfigError, match="wandb_project has no effect without use_wandb = true"):
        load_config(write_config(MINIMAL + '[run]\nwandb_project = "p"\n'))


class FakeWandb:
    """wandb.init's arguments, for the online settings no test machine can reach."""

    def __init__(self, monkeypatch):
        import wandb

        self.calls = []
        monkeypatch.setattr(wandb, "init", lambda **kwargs: self.calls.append(kwargs))


def test_the_key_reaches_wandb_in_memory_and_later_attempts_through_a_private_file(tmp_path, monkeypatch):
    fake = FakeWandb(monkeypatch)
    cfg = wandb_config(tmp_path, 'wandb_key = "k-123"', 'wandb_host = "https://wandb.example"')
    cfg.run.wandb_mode = "online"
    wandb_run.WandbRun(cfg, tmp_path / "run")
    settings = fake.calls[0]["settings"]
    assert (settings.api_key, settings.base_url, settings.mode) == ("k-123", "https://wandb.example", "online")
    assert "k-123" not in json.dumps(fake.calls[0]["config"])
    key_file = tmp_path / "run" / wandb_run.KEY
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    cfg.run.wandb_key = None  # a requeued attempt: the frozen config leaves the key out
    wandb_run.WandbRun(cfg, tmp_path / "run")
    assert fake.calls[1]["settings"].api_key == "k-123" and fake.calls[1]["id"] == fake.calls[0]["id"]


def test_offline_runs_are_given_no_key(tmp_path, monkeypatch):
    fake = FakeWandb(monkeypatch)
    wandb_run.WandbRun(wandb_config(tmp_path, 'wandb_key = "k-123"'), tmp_path / "run")
    assert fake.calls[0]["settings"].api_key is None and not (tmp_path / "run" / wandb_run.KEY).exists()


def test_neither_the_cli_nor_a_run_without_wandb_imports_wandb_or_pyarrow():
    code = ("import sys, rlhpc.cli, rl.metrics, rl.data, rl.config, rl.loop; "
            "assert not {'wandb', 'pyarrow'} & set(sys.modules), {'wandb', 'pyarrow'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the loop: a resume that redoes a rollout -----------------------------------------------------------------

def test_a_loop_resumed_from_an_older_checkpoint_is_one_wandb_run_with_each_rollout_once(ray_local, tmp_path,
                                                                                         tiny_model_dir):
    from rl import checkpoint
    from rl.loop import run
    from test_loop import tiny

    settings = ("ckpt.save_interval=1", "eval.skip_eval_before_train=true", "run.use_wandb=true",
                "run.wandb_mode='offline'")
    run(tiny(tmp_path, tiny_model_dir, "rollout.num_rollout=2", *settings))
    # lost after checkpoint 1 (as after a crash): the next attempt redoes rollout 1, then goes on to rollout 2
    shutil.rmtree(checkpoint.iteration_dir(tmp_path / "checkpoints", 2))
    (tmp_path / "checkpoints" / checkpoint.LATEST).write_text("1\n")
    run(tiny(tmp_path, tiny_model_dir, "rollout.num_rollout=3", *settings))
    (first, steps_a), (second, steps_b) = offline_runs(tmp_path)
    assert first.run_id == second.run_id and sorted(steps_a) == [0, 1] and sorted(steps_b) == [2]
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    steps = steps_a | steps_b
    assert [r["rollout_id"] for r in rows] == sorted(steps) == [0, 1, 2]
    for r in rows:  # rollout 1 redone: the same samples, so the first attempt's values stand for it
        assert steps[r["rollout_id"]]["rollout/reward_mean"] == r["reward_mean"]
    assert "eval/arith/pass@1" in steps[2]  # eval_interval 3
