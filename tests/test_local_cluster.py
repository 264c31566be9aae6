"""The local cluster's config and its refusal to start without root or packages (no daemons started here)."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from hpc import local_cluster
from hpc.local_cluster import ClusterError, LocalCluster, Spec, check_prerequisites
from rlhpc.cli import app


def test_without_the_packages_it_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local_cluster.os, "geteuid", lambda: 0)
    monkeypatch.setattr(local_cluster.shutil, "which", lambda cmd: None if cmd.startswith("slurm") else "/bin/x")
    with pytest.raises(ClusterError, match="missing commands: slurmctld, slurmd; install them with `apt-get install "
                                           "slurmctld slurmd slurm-client munge"):
        check_prerequisites()


def test_without_root_it_refuses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(local_cluster.os, "geteuid", lambda: 1000)
    result = CliRunner().invoke(app, ["cluster", "up", "--state-dir", str(tmp_path)])
    assert result.exit_code == 1 and "needs root" in result.output


@pytest.mark.parametrize("version,line", [((22, 5), "SlurmctldParameters=preempt_send_user_signal"),
                                          ((23, 11), "PreemptParameters=send_user_signal")])
def test_slurm_conf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, version: tuple[int, int], line: str) -> None:
    monkeypatch.setattr(local_cluster, "slurm_version", lambda: version)
    c = LocalCluster(tmp_path / "state")
    c._write(Spec(nodes=3, cpus_per_node=4, memory_mb=2048))
    conf = c.conf.read_text()
    assert line in conf
    for expected in [
        "NodeName=node1 NodeAddr=10.87.0.11 CPUs=4 RealMemory=2048", "NodeName=node3 NodeAddr=10.87.0.13",
        "PartitionName=batch Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=30",
        "PartitionName=urgent Nodes=ALL", "PriorityTier=10",
        "PreemptType=preempt/partition_prio", "PreemptMode=REQUEUE", "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none", "SelectType=select/cons_tres", f"StateSaveLocation={tmp_path}/state/ctld",
        "AccountingStorageType=accounting_storage/none",
    ]:
        assert expected in conf
    assert c.spec() == Spec(nodes=3, cpus_per_node=4, memory_mb=2048)
