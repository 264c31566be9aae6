"""The network environment computed from sysfs trees built here: InfiniBand, RoCE, Ethernet only."""

from pathlib import Path

from hpc.network import Route, computed_env, ib_ports, job_env

ETH = Route("eth0", "10.0.0.5")


def port(sysfs: Path, dev: str, num: int, *, state: str = "4: ACTIVE", link: str = "InfiniBand",
         gids: dict[int, tuple[str, str]] | None = None) -> None:
    p = sysfs / "class/infiniband" / dev / "ports" / str(num)
    (p / "gids").mkdir(parents=True)
    (p / "gid_attrs/types").mkdir(parents=True)
    (p / "state").write_text(state + "\n")
    (p / "link_layer").write_text(link + "\n")
    for index, (kind, gid) in (gids or {}).items():
        (p / "gid_attrs/types" / str(index)).write_text(kind + "\n")
        (p / "gids" / str(index)).write_text(gid + "\n")


def test_infiniband_active_ports_only(tmp_path: Path) -> None:
    port(tmp_path, "mlx5_0", 1)
    port(tmp_path, "mlx5_1", 1)
    port(tmp_path, "mlx5_2", 1, state="1: DOWN")
    (tmp_path / "module/nvidia_peermem").mkdir(parents=True)
    env, _ = job_env(ETH, sysfs=tmp_path, environ={}, settings={})
    assert env["NCCL_IB_HCA"] == "mlx5_0:1,mlx5_1:1"
    assert env["NCCL_NET_GDR_LEVEL"] == "PHB"
    assert env["NCCL_CROSS_NIC"] == "0"
    assert "NCCL_IB_GID_INDEX" not in env and "NCCL_IB_DISABLE" not in env
    assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "eth0"
    assert env["CUDA_DEVICE_MAX_CONNECTIONS"] == "1"
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"


def test_roce_takes_the_v2_ipv4_gid(tmp_path: Path) -> None:
    port(tmp_path, "mlx5_bond_0", 1, link="Ethernet", gids={
        0: ("IB/RoCE v1", "fe80:0000:0000:0000:0a00:27ff:fe00:0001"),
        1: ("RoCE v2", "fe80:0000:0000:0000:0a00:27ff:fe00:0001"),
        2: ("IB/RoCE v1", "0000:0000:0000:0000:0000:ffff:0a00:0005"),
        5: ("RoCE v2", "0000:0000:0000:0000:0000:ffff:0a00:0005"),
    })
    [p] = ib_ports(tmp_path)
    assert p.link_layer == "Ethernet" and p.roce_v2_ipv4_gid == 5
    env = computed_env(ETH, [p], gdr=False)
    assert env["NCCL_IB_GID_INDEX"] == "5"
    assert env["NCCL_IB_HCA"] == "mlx5_bond_0:1"
    assert "NCCL_NET_GDR_LEVEL" not in env and "NCCL_CROSS_NIC" not in env


def test_ethernet_only_disables_ib(tmp_path: Path) -> None:
    (tmp_path / "class/net/eth0").mkdir(parents=True)
    env, _ = job_env(ETH, sysfs=tmp_path, environ={}, settings={})
    assert env["NCCL_IB_DISABLE"] == "1"
    assert "NCCL_IB_HCA" not in env


def test_environment_then_config_win(tmp_path: Path) -> None:
    port(tmp_path, "mlx5_0", 1)
    env, shown = job_env(ETH, sysfs=tmp_path, environ={"NCCL_IB_HCA": "mlx5_9", "NCCL_SOCKET_IFNAME": "ib0"},
                         settings={"NCCL_SOCKET_IFNAME": "bond0", "NCCL_DEBUG": "INFO"})
    assert env["NCCL_IB_HCA"] == "mlx5_9"
    assert env["NCCL_SOCKET_IFNAME"] == "bond0"
    assert env["NCCL_DEBUG"] == "INFO"
    assert shown["NCCL_IB_HCA"] == "mlx5_9 (environment)"
    assert shown["NCCL_SOCKET_IFNAME"] == "bond0 (config)"
    assert shown["GLOO_SOCKET_IFNAME"] == "eth0 (computed)"
