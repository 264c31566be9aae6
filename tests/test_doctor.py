"""What `rlhpc doctor` makes of a controller's settings and of this node."""

from pathlib import Path

from hpc.doctor import Check, import_name_checks, node_checks, parse_key_values, slurm_checks

CONFIG = """\
Configuration data as of 2026-11-23T05:20:00
AccountingStorageType   = accounting_storage/none
JobRequeue              = 1
MinJobAge               = 300 sec
PreemptMode             = REQUEUE
PreemptType             = preempt/partition_prio
SlurmctldParameters     = preempt_send_user_signal
"""
PARTITIONS = ("PartitionName=batch Default=YES GraceTime=120 PriorityTier=1\n"
              "PartitionName=urgent GraceTime=0 PriorityTier=10\n")


def levels(checks) -> dict[str, str]:
    return {c.name: c.level for c in checks}


def test_a_cluster_ready_for_preemption() -> None:
    config = parse_key_values(CONFIG)
    assert config["MinJobAge"] == "300 sec" and config["PreemptMode"] == "REQUEUE"
    got = levels(slurm_checks(config, PARTITIONS, "slurm 22.05.8"))
    assert got == {"slurm": "ok", "JobRequeue": "ok", "PreemptMode": "ok", "preemption signal": "ok",
                   "GraceTime": "warn", "MinJobAge": "info", "accounting": "info"}


def test_what_loses_work_is_named() -> None:
    config = parse_key_values(CONFIG.replace("SlurmctldParameters     = preempt_send_user_signal\n", "")
                              .replace("PreemptMode             = REQUEUE", "PreemptMode             = CANCEL")
                              .replace("JobRequeue              = 1", "JobRequeue              = 0"))
    checks = {c.name: c for c in slurm_checks(config, "PartitionName=batch GraceTime=300\n", "slurm 23.11.1")}
    assert checks["preemption signal"].level == "warn" and "loses the work" in checks["preemption signal"].detail
    assert checks["PreemptMode"].level == "warn" and "cancelled" in checks["PreemptMode"].detail
    assert checks["JobRequeue"].level == "warn"
    assert checks["GraceTime"].level == "ok"


def test_no_slurm() -> None:
    assert levels(slurm_checks({}, "", None)) == {"slurm": "warn"}


def test_node_checks_on_a_built_sysfs(tmp_path: Path) -> None:
    port = tmp_path / "sys/class/infiniband/mlx5_0/ports/1"
    port.mkdir(parents=True)
    (port / "state").write_text("4: ACTIVE\n")
    (port / "link_layer").write_text("InfiniBand\n")
    checks = {c.name: c for c in node_checks(sysfs=tmp_path / "sys")}
    assert checks["InfiniBand/RoCE"].found == "mlx5_0:1 (InfiniBand)"
    assert checks["torch"].level == "ok" and checks["ray"].level == "ok"


def test_another_distribution_writing_our_top_level_package_fails(monkeypatch) -> None:
    import importlib.metadata

    owners = {"rl": ["rlhpc"], "hpc": ["rlhpc"], "rlhpc": ["rlhpc"], "yaml": ["PyYAML"]}
    monkeypatch.setattr(importlib.metadata, "packages_distributions", lambda: owners)
    assert import_name_checks() == [Check("import names", "ok", "hpc, rl, rlhpc")]
    owners["rl"] = ["rlhpc", "rl"]  # PyPI's readline bindings, installed into the same environment
    [check] = import_name_checks()
    assert check.level == "fail" and check.found == "rl also from rl"
    assert import_name_checks(distribution="nothing-installed") == [Check("import names", "ok", "")]
