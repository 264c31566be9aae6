"""Whole tensors ↔ one rank's tensor-parallel shard and pipeline stage, by Megatron parameter name.

Megatron marks each split parameter with `tensor_model_parallel` and `partition_dim`: rows for column-parallel
layers and the vocabulary, columns for row-parallel ones. A rank's `linear_fc1` shard is its slice of the gate
above its slice of up, so whole ↔ shard regroups gate and up. `linear_qkv` splits into whole query groups,
which its per-group layout (`rl/megatron/layout.py`) makes plain rows. Pipeline stages number their layers
from 0; `offset` is the stage's first global layer.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def renumber(name: str, offset: int) -> str:
    """A stage-local parameter name with its layer index moved by `offset` (negative: global → local)."""
    return _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name)


def split_dim(param: Tensor) -> int | None:
    """The dimension tensor parallelism splits this parameter along, or None when every rank holds it whole."""
    if not getattr(param, "tensor_model_parallel", False):
        return None
    # Megatron sets partition_dim on the tensor itself, an attribute torch's Tensor type does not declare.
    return param.partition_dim  # type: ignore[attr-defined]


def _is_gated(name: str) -> bool:
    return name.endswith("mlp.linear_fc1.weight")


def shard(whole: Tensor, name: str, dim: int | None, rank: int, size: int) -> Tensor:
    """Rank `rank`'s part of a whole parameter."""
    if dim is None or size == 1:
        return whole
    if _is_gated(name):
        gate, up = whole.chunk(2, dim=dim)
        return torch.cat([gate.chunk(size, dim=dim)[rank], up.chunk(size, dim=dim)[rank]], dim=dim)
    return whole.chunk(size, dim=dim)[rank]


def unshard(parts: list[Tensor], name: str, dim: int | None) -> Tensor:
    """The whole parameter from every rank's part, in rank order (the inverse of `shard`)."""
    if dim is None or len(parts) == 1:
        return parts[0]
    if _is_gated(name):
        halves = [p.chunk(2, dim=dim) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=dim)
    return torch.cat(parts, dim=dim)
