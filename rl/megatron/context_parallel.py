"""Which tokens of a packed micro-batch each context-parallel rank holds (Megatron's load-balanced split for
causal attention, as Transformer Engine's THD attention expects it).

Each sequence is padded to a multiple of 2·CP tokens and cut into 2·CP equal chunks; rank r holds chunks r and
2·CP − 1 − r, so that every rank gets as much of the costly end of a causal sequence as of its cheap start.
"""

from __future__ import annotations


def padded_lengths(lengths: list[int], cp_size: int) -> list[int]:
    """Each length rounded up to a multiple of 2·CP (unchanged without context parallelism)."""
    unit = 2 * cp_size if cp_size > 1 else 1
    return [-(-n // unit) * unit for n in lengths]


def held_positions(lengths: list[int], cp_size: int, cp_rank: int) -> list[int]:
    """The flat positions, in the packed row of the padded sequences, that rank `cp_rank` holds, in order."""
    held: list[int] = []
    start = 0
    for n in padded_lengths(lengths, cp_size):
        if cp_size == 1:
            held += range(start, start + n)
        else:
            chunk = n // (2 * cp_size)
            for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
                held += range(start + c * chunk, start + (c + 1) * chunk)
        start += n
    return held
