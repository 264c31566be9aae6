"""Typed configuration of the cluster side of a run: the `[slurm]` and `[ray]` sections of the TOML file."""

from __future__ import annotations

import re
from typing import Annotated, Literal

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
    # A field's docstring is its description in the schema (`rlhpc config schema`, docs/configuration.md).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              use_attribute_docstrings=True)


class ContainerConfig(Section):
    """`[slurm.container]`: run every node's task inside a container image."""

    runtime: Literal["pyxis", "apptainer"]
    """`pyxis` (srun's --container-* options, enroot) or `apptainer` (`apptainer exec` around the command)."""
    image: str
    """pyxis: `slimerl/slime:latest` or a .sqsh file; apptainer: a .sif, a sandbox folder or `docker://...`."""
    mounts: list[str] = []
    """Host paths to mount, `SRC[:DST[:FLAGS]]` (data, model); the run folder is always mounted, at its path."""
    workdir: str | None = None
    """Working directory of the task inside the container; the run folder when unset."""
    python: str | None = None
    """Python in the container with rlhpc installed (`python3`); unset: the host's path, which must be mounted."""
    mount_home: bool = False
    """Mount the user's home directory (off: its ~/.local packages would shadow the image's)."""
    options: list[str] = []
    """More options as on the command line: srun's for pyxis, `apptainer exec`'s for apptainer."""

    @field_validator("image", "workdir", "python")
    @classmethod
    def _word(cls, v: str | None) -> str | None:
        if v is None:
            return v
        no_control_characters(v)
        if not v.strip() or v.startswith("-"):
            raise ValueError(f"{v!r} is empty or starts with '-' (it would be read as an option)")
        return v

    @field_validator("workdir")
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError(f"{v!r} is not an absolute path (inside the container there is no directory it could "
                             "be relative to)")
        return v

    @field_validator("mounts")
    @classmethod
    def _mounts(cls, v: list[str]) -> list[str]:
        for spec in v:
            no_control_characters(spec)
            parts = spec.split(":")
            if "," in spec:
                raise ValueError(f"{spec!r}: a comma separates mounts in both runtimes' syntax; give one mount per "
                                 "entry, with no comma in its paths")
            if len(parts) > 3 or not all(p.startswith("/") for p in parts[:2]):
                raise ValueError(f"{spec!r} is not SRC[:DST[:FLAGS]] with absolute SRC and DST paths")
        return v

    @field_validator("options")
    @classmethod
    def _options(cls, v: list[str]) -> list[str]:
        for option in v:
            no_control_characters(option)
            if not option.startswith("-"):
                raise ValueError(f"{option!r} is not an option (options start with '-'; the image is `image`)")
        return v

    def step(self, run_dir: str, env_names: list[str], gpus: bool) -> tuple[list[str], list[str]]:
        """The container in the job's step: (srun options, words before the task's command). `env_names` are
        the variables the batch script exports, which must reach the task with the host's value even where
        the image sets them too; `gpus`: the job asks for GPUs."""
        workdir = self.workdir or run_dir
        # mounted in order: the run folder last, so that a mount of a folder above it cannot hide it
        if self.runtime == "pyxis":
            # pyxis passes the host environment, but the image's values win unless named in --container-env.
            return [f"--container-image={self.image}",
                    f"--container-mounts={','.join([*self.mounts, run_dir])}",
                    f"--container-workdir={workdir}",
                    "--container-mount-home" if self.mount_home else "--no-container-mount-home",
                    *([f"--container-env={','.join(env_names)}"] if env_names else []),
                    *self.options], []
        # apptainer passes the host environment too (no --cleanenv), the image's values winning over it: the
        # batch script exports APPTAINERENV_<NAME> for each of `env_names`, which wins over both.
        return [], ["apptainer", "exec", *(["--nv"] if gpus else []),
                    *(f"--bind={m}" for m in [*self.mounts, run_dir]), f"--pwd={workdir}",
                    *([] if self.mount_home else ["--no-home"]), *self.options, self.image]


class SlurmConfig(Section):
    """The job `rlhpc submit` writes: its sbatch options, the stop signal before the time limit, requeues, and what
    every node runs first."""

    partition: str | None = None
    """Partition to submit to (sbatch --partition); the cluster's default when unset."""
    account: str | None = None
    """Account charged for the job (sbatch --account); the user's default when unset."""
    qos: str | None = None
    """Quality of service (sbatch --qos); the account's default when unset."""
    time: str | None = None
    """Time limit in Slurm's syntax ("4:00:00", "2-00:00:00"); the partition's default when unset."""
    nodes: Annotated[int, Field(gt=0)] = 1
    """Nodes of the job, one task each (sbatch --nodes); training uses perf.actor_num_nodes of them."""
    gpus_per_node: Annotated[int, Field(ge=0)] = 0
    """GPUs per node (sbatch --gpus-per-node); 0 asks for none (a CPU run)."""
    cpus_per_task: Annotated[int, Field(gt=0)] | None = None
    """CPUs of each node's task, all of the node's processes (sbatch --cpus-per-task); Slurm's default when unset."""
    mem: str | None = None
    """Memory per node ("480G"; "0" means all of it)."""
    constraint: str | None = None
    """Node features required (sbatch --constraint, e.g. "h100"); none when unset."""
    exclusive: bool = False
    """Ask for whole nodes, shared with no other job (sbatch --exclusive)."""
    nodelist: str | None = None
    """Nodes the job must run on (sbatch --nodelist, e.g. "gpu[01-04]"); any when unset."""
    job_name: str | None = None
    """Slurm job name; `rlhpc-<run folder name>` when unset."""
    requeue: bool = True
    """Let Slurm requeue the job after a node failure or preemption (sbatch --requeue)."""
    signal: str = "USR2"
    """Signal sent before the time limit and on preemption; USR1 is often taken by NCCL."""
    signal_grace_s: Annotated[int, Field(ge=0, validate_default=True)] = 120
    """Seconds between the signal and the kill: time to checkpoint and requeue. 0 asks for no signal: the run
    then stops by its own plan, from the job's end time and its measured save (a preemption kills it unwarned)."""
    max_requeues: Annotated[int, Field(ge=0)] = 10
    """Requeues rlhpc makes of a run after interruptions (time limit, preemption, lost node) before it gives up; 0:
    none."""
    max_excluded_nodes: Annotated[int, Field(ge=0)] = 2
    """At most how many nodes a run leaves behind after an attempt ended for them (lost, a process stopped); 0: none."""
    setup: list[str] = []
    """Shell lines run on every node before rlhpc starts (module load, source an environment)."""
    additional_parameters: dict[str, str | int | bool] = {}
    """Other sbatch options, as `{ reservation = "rl" }`."""
    env: dict[str, str] = {}
    """Environment of every process of the job (NCCL_*, GLOO_*, ...); wins over what rlhpc computes."""
    container: ContainerConfig | None = None
    """Run each node's task inside a container image (pyxis or Apptainer); on the host when unset."""

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
    """The Ray cluster started inside the job, and the network settings of NCCL, Gloo and Ray."""

    port: Annotated[int, Field(gt=1023, lt=65536)] | None = None
    """GCS port of the head; derived from the job id when unset, so two jobs on one node do not clash."""
    temp_dir: str | None = None
    """Node-local temp dir; a short per-job path under /tmp when unset (socket paths must stay < 108 bytes)."""
    object_store_memory: Annotated[int, Field(gt=0)] | None = None
    """Bytes; sized against /dev/shm when unset."""
    dashboard: bool = False
    """Start the Ray dashboard on the head node, on the GCS port + 3; off: no dashboard."""
    dashboard_host: str = "127.0.0.1"
    """Address the Ray dashboard listens on; 127.0.0.1 keeps it to the head node (reach it by an SSH tunnel)."""
    join_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    """How long, once the head is up, every node has to join it before the job fails naming the missing hosts."""
    socket_ifname: str | None = None
    """Interface for NCCL/Gloo/Ray traffic; the one routing to the other nodes when unset."""
    nccl_ib_hca: str | None = None
    """NCCL_IB_HCA for every process: the InfiniBand adapters NCCL uses (e.g. "mlx5_0,mlx5_1"); NCCL's choice when
    unset."""
    nccl_debug: str | None = None
    """NCCL_DEBUG for every process (e.g. "INFO", "WARN"); unset: NCCL's default (quiet)."""

    def network_env(self) -> dict[str, str]:
        """The network variables this section sets explicitly (they win over computed ones)."""
        named = {"NCCL_SOCKET_IFNAME": self.socket_ifname, "GLOO_SOCKET_IFNAME": self.socket_ifname,
                 "NCCL_IB_HCA": self.nccl_ib_hca, "NCCL_DEBUG": self.nccl_debug}
        return {k: v for k, v in named.items() if v is not None}
