"""Training samples and how a global batch is cut into micro-batches.

With `use_dynamic_batch_size`, consecutive sequences are packed into micro-batches of at most
`max_tokens_per_gpu` tokens (a longer sequence forms its own micro-batch, never truncated); otherwise
micro-batches hold `micro_batch_size` sequences. Either way the loss is reduced with the global batch's
denominators, so the split changes nothing but memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TrainSample:
    tokens: list[int]
    """Prompt and response token ids."""
    response_length: int
    loss_mask: list[int]
    """1 on each response token that gets a loss (0 on tool output, say); length response_length."""
    reward: float
    rollout_log_probs: list[float]
    advantages: list[float] | None = None
    """Per response token; filled in by the driver."""
    values: list[float] | None = None
    """PPO: the critic's values per response token at the rollout (the value clip's reference)."""
    returns: list[float] | None = None
    """PPO: the critic's targets per response token."""
    weight_version: int = 0

    @property
    def prompt_length(self) -> int:
        return len(self.tokens) - self.response_length


def micro_batches(lengths: list[int], max_tokens: int | None, micro_batch_size: int = 1) -> list[list[int]]:
    """Indices of the sequences of each micro-batch, in order.

    max_tokens set: fill each micro-batch with consecutive sequences while their total length stays within
    max_tokens; a sequence longer than max_tokens alone. Otherwise: groups of micro_batch_size.
    """
    if max_tokens is None:
        return [list(range(i, min(i + micro_batch_size, len(lengths)))) for i in range(0, len(lengths), micro_batch_size)]
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if current and used + n > max_tokens:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        batches.append(current)
    return batches


def split_for_ranks(n: int, world_size: int) -> list[range]:
    """Contiguous shares of a global batch of n samples for each data-parallel rank (sizes differ by ≤ 1)."""
    base, extra = divmod(n, world_size)
    starts = [r * base + min(r, extra) for r in range(world_size + 1)]
    return [range(starts[r], starts[r + 1]) for r in range(world_size)]


def balanced_shares(lengths: list[int], world_size: int) -> list[list[int]]:
    """Shares of a global batch for each data-parallel rank with about equal tokens (`balance_data`): as
    many samples per rank as `split_for_ranks` gives, the longest sequences placed first, each on the rank
    with the fewest tokens that still has room (longest-processing-time first). Indices in batch order."""
    room = [len(r) for r in split_for_ranks(len(lengths), world_size)]
    tokens = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        rank = min((r for r in range(world_size) if room[r]), key=lambda r: tokens[r])
        shares[rank].append(i)
        tokens[rank] += lengths[i]
        room[rank] -= 1
    return [sorted(share) for share in shares]


def pad_rows(rows: list, width: int | None = None) -> torch.Tensor:
    """[len(rows), width] float32 tensor of rows (lists or 1-D tensors) right-padded with zeros."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    if all(isinstance(r, list) for r in rows):  # one tensor built at once: a tensor per row costs more than the row
        return torch.tensor([r + [0.0] * (width - len(r)) for r in rows], dtype=torch.float32).reshape(
            len(rows), width)
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.as_tensor(row, dtype=torch.float32)
    return out
