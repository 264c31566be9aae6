"""Where the actors sit: the CPUs each is given, and where colocated rollout engines sit among the training
workers (`perf.colocate`), as slime lays them out.

Training rank r runs on one GPU of node r // `actor_num_gpus_per_node` (one placement-group bundle per node).
Colocated engines cover every training GPU: engine k spans the GPUs of ranks k·g … (k+1)·g - 1, g being
`sglang.rollout_num_gpus_per_engine` (1 for the torch engine), and is hosted (launched, driven) by the first
of them, rank k·g. An engine's ranks are on one node when g divides the GPUs of a node, which the config
demands. Pure arithmetic: no Ray, no CUDA.
"""

from __future__ import annotations


def cpu_slot(node_cpus: int, actors_per_node: int) -> float:
    """The CPUs each actor of a node is given: whole CPUs where the node has enough for all, else fractions (Ray
    takes fractions below 1 only), so that any number of actors fits (torch's threads are set apart)."""
    return node_cpus // actors_per_node or node_cpus / actors_per_node


def actors_per_node(gpus_per_node: int, nodes: int, decoupled_engines: int) -> int:
    """A node's training workers, and its share of the decoupled engines, rounded up."""
    return gpus_per_node + -(-decoupled_engines // nodes)


def node_of(rank: int, gpus_per_node: int) -> int:
    """The node (placement-group bundle) of a training rank."""
    return rank // gpus_per_node


def colocated_engines(world_size: int, gpus_per_engine: int) -> list[tuple[int, ...]]:
    """Each colocated engine as the training ranks whose GPUs it spans, its host first."""
    if world_size % gpus_per_engine:
        raise ValueError(f"engines of {gpus_per_engine} GPUs do not divide {world_size} training GPUs")
    return [tuple(range(k * gpus_per_engine, (k + 1) * gpus_per_engine)) for k in range(world_size // gpus_per_engine)]


def engine_ranks(rank: int, gpus_per_engine: int) -> tuple[int, ...]:
    """The ranks of the colocated engine whose GPUs include rank's, its host first; rank's place among them
    is its tensor-parallel rank in the engine."""
    first = rank - rank % gpus_per_engine
    return tuple(range(first, first + gpus_per_engine))


def server_gpus(devices: list[str | None]) -> str | None:
    """The CUDA_VISIBLE_DEVICES of an engine's server from each of its ranks' own (Ray gives each training
    worker one GPU and narrows its CUDA_VISIBLE_DEVICES to it), in rank order: SGLang puts tensor-parallel
    rank r on visible GPU base_gpu_id + r·gpu_id_step = r (their defaults), the GPU of the engine's r-th
    training rank, which hands it its weights. Narrowed rather than slime's whole node plus `--base-gpu-id`:
    the ids Ray assigns within a bundle need not follow rank order, and a server that sees only its own GPUs
    cannot touch another engine's. None where the ranks have no narrowed GPU (on the host): the server
    inherits its host's view."""
    if any(d is None for d in devices):
        return None
    return ",".join(d for d in devices if d is not None)
