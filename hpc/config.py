"""Typed configuration of the cluster side of a run: the `[slurm]` and `[ray]` sections of the TOML file."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

_SLURM_TIME = re.compile(r"^(?:(?P<d>\d+)-)?(?P<h>\d+)(?::(?P<m>\d+)(?::(?P<s>\d+))?)?$")
_SBATCH_OPTION = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def no_control_characters(value: str) -> str:
    """Refuse what could end a line of the batch script (a newline after `#SBATCH` starts a command)."""
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError(f"{value!r} contains a control character (a newline could start a command in the batch "
                         "script); remove it")
    return value


def slurm_time_minutes(value: str) -> int:
    """Minutes in a Slurm time limit: "MM", "HH:MM:SS", "D-HH", "D-HH:MM" or "D-HH:MM:SS" (seconds round up)."""
    m = _SLURM_TIME.match(value.strip())
    if not m:
        raise ValueError(f"{value!r} is not a Slurm time limit (MM, HH:MM:SS or D-HH:MM:SS)")
    d, h, mi, s = (int(m.group(k) or 0) for k in "dhms")
    if m.group("d") is None and m.group("m") is None:  # a bare number is minutes
        return h
    if m.group("d") is None and m.group("s") is None:  # "MM:SS"
        return h + (mi > 0)
    if m.group("d") is None:
        return h * 60 + mi + (s > 0)
    return d * 1440 + h * 60 + mi + (s > 0)


class Section(BaseModel):
    # nan passes every range check (all comparisons are false) and inf most: refuse both in every float field.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SlurmConfig(Section):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None
    """Time limit in Slurm's syntax ("4:00:00", "2-00:00:00"); the partition's default when unset."""
    nodes: Annotated[int, Field(gt=0)] = 1
    gpus_per_node: Annotated[int, Field(ge=0)] = 0
    cpus_per_task: Annotated[int, Field(gt=0)] | None = None
    mem: str | None = None
    """Memory per node ("480G"; "0" means all of it)."""
    constraint: str | None = None
    exclusive: bool = False
    nodelist: str | None = None
    job_name: str | None = None
    requeue: bool = True
    signal: str = "USR2"
    """Signal sent before the time limit and on preemption; USR1 is often taken by NCCL."""
    signal_grace_s: Annotated[int, Field(gt=0, validate_default=True)] = 120
    """Seconds between the signal and the kill: time to checkpoint and requeue."""
    max_requeues: Annotated[int, Field(ge=0)] = 10
    setup: list[str] = []
    """Shell lines run on every node before rlhpc starts (module load, source an environment)."""
    additional_parameters: dict[str, str | int | bool] = {}
    """Other sbatch options, as `{ reservation = "rl" }`."""
    env: dict[str, str] = {}
    """Environment of every process of the job (NCCL_*, GLOO_*, ...); wins over what rlhpc computes."""

    @field_validator("partition", "account", "qos", "time", "mem", "constraint", "nodelist", "job_name")
    @classmethod
    def _one_line(cls, v: str | None) -> str | None:
        return v if v is None else no_control_characters(v)

    @field_validator("additional_parameters")
    @classmethod
    def _sbatch_options(cls, v: dict[str, str | int | bool]) -> dict[str, str | int | bool]:
        # Keys are written unquoted after `#SBATCH --`: only an option's name may stand there.
        for key, value in v.items():
            if not _SBATCH_OPTION.match(key):
                raise ValueError(f"{key!r} is not an sbatch option name (letters, digits, '-' and '_')")
            no_control_characters(str(value))
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not _ENV_NAME.match(name):
                raise ValueError(f"{name!r} is not an environment variable name")
            no_control_characters(value)
        return v

    @field_validator("time")
    @classmethod
    def _time(cls, v: str | None) -> str | None:
        if v is not None and slurm_time_minutes(v) == 0:
            # sbatch reads --time=0 as "no limit": the opposite of what a zero says
            raise ValueError(f"{v!r} is no time at all (Slurm would read it as no limit); give a limit, or leave "
                             "time unset for the partition's default")
        return v

    @field_validator("signal_grace_s")
    @classmethod
    def _grace(cls, v: int, info: ValidationInfo) -> int:
        time = info.data.get("time")
        # validate_default: the default grace is checked against a short time limit as well
        if time is not None and v >= slurm_time_minutes(time) * 60:
            raise ValueError(f"{v} s is not shorter than the time limit (slurm.time = {time!r}, "
                             f"{slurm_time_minutes(time)} min): the signal would come before the run could do "
                             "anything; lengthen the time or shorten signal_grace_s")
        return v

    @field_validator("signal")
    @classmethod
    def _signal(cls, v: str) -> str:
        name = v.upper().removeprefix("SIG")
        if name not in {"USR1", "USR2", "TERM", "INT", "HUP", "URG"}:
            raise ValueError(f"{v!r} is not a signal a job can catch; use USR2 (default), USR1 or TERM")
        return name

    @property
    def time_minutes(self) -> int | None:
        return None if self.time is None else slurm_time_minutes(self.time)

    @property
    def working_s(self) -> int | None:
        """Seconds of each attempt before the stop signal (start-up included), where a time limit is set."""
        minutes = self.time_minutes
        return None if minutes is None else minutes * 60 - self.signal_grace_s


class RayConfig(Section):
    port: Annotated[int, Field(gt=1023, lt=65536)] | None = None
    """GCS port of the head; derived from the job id when unset, so two jobs on one node do not clash."""
    temp_dir: str | None = None
    """Node-local temp dir; a short per-job path under /tmp when unset (socket paths must stay < 108 bytes)."""
    object_store_memory: Annotated[int, Field(gt=0)] | None = None
    """Bytes; sized against /dev/shm when unset."""
    dashboard: bool = False
    dashboard_host: str = "127.0.0.1"
    join_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    """How long, once the head is up, every node has to join it before the job fails naming the missing hosts."""
    socket_ifname: str | None = None
    """Interface for NCCL/Gloo/Ray traffic; the one routing to the other nodes when unset."""
    nccl_ib_hca: str | None = None
    nccl_debug: str | None = None

    def network_env(self) -> dict[str, str]:
        """The network variables this section sets explicitly (they win over computed ones)."""
        named = {"NCCL_SOCKET_IFNAME": self.socket_ifname, "GLOO_SOCKET_IFNAME": self.socket_ifname,
                 "NCCL_IB_HCA": self.nccl_ib_hca, "NCCL_DEBUG": self.nccl_debug}
        return {k: v for k, v in named.items() if v is not None}
