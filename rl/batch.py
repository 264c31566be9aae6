"""Training samples and how a global batch is cut into micro-batches.

With `use_dynamic_batch_size`, consecutive sequences are packed into micro-batches of at most
`max_tokens_per_gpu` tokens (a longer sequence forms its own micro-batch, never truncated); otherwise
micro-batches hold `micro_batch_size` sequences. Either way the loss is reduced with the global batch's
denominators, so the split changes nothing but memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rl.megatron.context_parallel import held_positions, padded_lengths


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
        return [list(range(i, min(i + micro_batch_size, len(lengths))))
                for i in range(0, len(lengths), micro_batch_size)]
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


@dataclass
class MicroBatch:
    """One micro-batch laid out for a causal LM, on the host. `at`: where each response token's predicting
    logit sits among the model's flattened outputs, [b, R] (R the longest response); `target`: the response
    tokens; `valid`: which entries are real; `held`: which of those this rank computes (all of them without
    context parallelism)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor | None
    """Packed only: where each (padded) sequence starts in the row, and the total, int32."""
    max_seqlen: int
    at: torch.Tensor
    target: torch.Tensor
    valid: torch.Tensor
    held: torch.Tensor


def lay_out(samples: list[TrainSample], *, packed: bool, cp_size: int = 1, cp_rank: int = 0,
            multiple: int = 1) -> MicroBatch:
    """One packed row (Megatron's THD layout: no padding, positions restarting at each sequence; with context
    parallelism each rank holds its chunks of every sequence, `rl/megatron/context_parallel.py`), or
    right-padded rows, which need no attention mask: under causal attention a real token sees only the real
    tokens before it. Position t's logit predicts token t + 1. Each rank's row length is a multiple of
    `multiple` (sequence parallelism scatters a row over the tensor-parallel ranks): a packed row ends with a
    padding sequence of its own, padded rows are widened."""
    lengths = [len(s.tokens) for s in samples]
    if packed:
        padded = padded_lengths(lengths, cp_size)
        tail = -sum(padded) % ((2 * cp_size if cp_size > 1 else 1) * multiple)
        padded, lengths = (padded + [tail], lengths + [tail]) if tail else (padded, lengths)
        cu = torch.tensor([0, *padded]).cumsum(0)
        tokens_of = [s.tokens for s in samples] + [[]] * (len(padded) - len(samples))
        full = torch.tensor([t for seq, n in zip(tokens_of, padded) for t in seq + [0] * (n - len(seq))])
        held = torch.tensor(held_positions(lengths, cp_size, cp_rank))
        tokens, positions = full[held][None], torch.cat([torch.arange(n) for n in padded])[held][None]
        local = torch.full((len(full),), -1)
        local[held] = torch.arange(len(held))
        starts, cu_seqlens, max_seqlen = cu[: len(samples)], cu.to(torch.int32), max(padded)
    else:
        width = -(-max(lengths) // multiple) * multiple
        tokens = torch.tensor([s.tokens + [0] * (width - len(s.tokens)) for s in samples])
        positions = torch.arange(width)[None].expand(len(samples), width)
        full, local = tokens.flatten(), torch.arange(tokens.numel())
        starts, cu_seqlens, max_seqlen = torch.arange(len(samples)) * width, None, width
    r = max(s.response_length for s in samples)
    offsets = torch.arange(r)
    valid = offsets[None] < torch.tensor([s.response_length for s in samples])[:, None]
    first = torch.tensor([s.prompt_length - 1 for s in samples])
    at = torch.where(valid, (starts + first)[:, None] + offsets[None], 0)
    mine = local[at]
    return MicroBatch(input_ids=tokens, position_ids=positions, cu_seqlens=cu_seqlens,
                      max_seqlen=max_seqlen, at=mine.clamp(min=0),
                      target=full[(at + 1).flatten()].view(len(samples), r), valid=valid, held=valid & (mine >= 0))
