"""Where colocated engines sit (`rl/placement.py`): which training rank hosts which engine, whose GPUs each
spans, and the GPUs its SGLang server is given; and the config refusing engines that would straddle nodes."""

from __future__ import annotations

import math

import pytest

from conftest import MINIMAL
from rl.placement import colocated_engines, engine_ranks, node_of, server_gpus
from rlhpc.config import ConfigError, load_config


@pytest.mark.parametrize(("world", "per_engine", "expected"), [
    (1, 1, [(0,)]),
    (2, 1, [(0,), (1,)]),  # the torch engine: one per worker
    (8, 2, [(0, 1), (2, 3), (4, 5), (6, 7)]),  # the shipped configs: 8 GPUs, engines of TP 2
    (16, 4, [(0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11), (12, 13, 14, 15)]),
])
def test_engines_cover_every_training_gpu_each_hosted_by_its_first_rank(world, per_engine, expected):
    engines = colocated_engines(world, per_engine)
    assert engines == expected
    assert sorted(r for ranks in engines for r in ranks) == list(range(world))
    for ranks in engines:
        assert all(engine_ranks(r, per_engine) == ranks for r in ranks)  # each rank finds its engine and host


def test_an_engine_stays_on_one_node_when_its_gpus_divide_the_nodes():
    for ranks in colocated_engines(16, 4):  # 2 nodes of 8
        assert len({node_of(r, 8) for r in ranks}) == 1
    assert {node_of(r, 6) for r in colocated_engines(12, 4)[1]} == {0, 1}  # 4 does not divide 6: straddles
    with pytest.raises(ValueError, match="do not divide 6"):
        colocated_engines(6, 4)


def test_the_server_sees_its_ranks_gpus_in_tensor_parallel_order():
    """SGLang's TP rank r runs on visible GPU base_gpu_id + r·gpu_id_step = r (the defaults, checked against
    SGLang's parser in tests/sglang_contract.py): the GPU of the engine's r-th training rank, whichever ids Ray
    gave them."""
    assert server_gpus(["6", "3"]) == "6,3"
    assert server_gpus(["GPU-aa", "GPU-bb"]) == "GPU-aa,GPU-bb"
    assert server_gpus([None, None]) is None  # no GPUs: the server inherits its host's view


@pytest.mark.parametrize(("overrides", "ok"), [
    (["perf.actor_num_gpus_per_node=8", "sglang.rollout_num_gpus_per_engine=2"], True),
    (["perf.actor_num_nodes=2", "perf.actor_num_gpus_per_node=6", "sglang.rollout_num_gpus_per_engine=4"], False),
    (["perf.actor_num_gpus_per_node=6", "sglang.rollout_num_gpus_per_engine=4"], False),
])
def test_colocated_engines_must_divide_the_gpus_of_a_node(write_config, overrides, ok):
    """12 GPUs in engines of 4 divide evenly, yet the second engine would span two nodes of 6."""
    args = ["perf.colocate=true", "rollout.engine='sglang'", *overrides]
    if ok:
        assert load_config(write_config(MINIMAL), args).perf.colocate
        return
    with pytest.raises(ConfigError) as e:
        load_config(write_config(MINIMAL), args)
    assert "sglang.rollout_num_gpus_per_engine / perf.actor_num_gpus_per_node" in str(e.value)
    assert "training GPUs of a node" in str(e.value)


def test_each_actor_of_a_node_gets_whole_cpus_where_there_are_enough_else_a_fraction():
    from rl.placement import actors_per_node, cpu_slot

    assert actors_per_node(gpus_per_node=8, nodes=2, decoupled_engines=3) == 10  # 3 engines over 2 nodes: 2 here
    assert cpu_slot(64, 10) == 6 and cpu_slot(2, 2) == 1 and cpu_slot(2, 3) == 2 / 3


def test_a_prompts_requests_go_to_one_engine_and_engines_share_evenly() -> None:
    from rl.rollout.pool import shares_by_prefix

    groups = [[p, p + 1] for p in range(5) for _ in range(4)]  # 5 GRPO groups of 4 samples, in order
    shares = shares_by_prefix(groups, 3)
    assert shares == [[0, 1, 2, 3, 12, 13, 14, 15], [4, 5, 6, 7, 16, 17, 18, 19], [8, 9, 10, 11]]
    # interleaved prompts (requests of a multi-turn rollout) still land with their own prompt's
    mixed = [[1], [2], [1], [3], [2], [1]]
    assert shares_by_prefix(mixed, 2) == [[0, 2, 5], [1, 3, 4]]
    assert shares_by_prefix([[1], [2]], 4) == [[0], [1], [], []]


def tokens(first: int, n: int = 32) -> list[int]:
    return list(range(first, first + n))


def test_a_next_turn_goes_to_the_engine_that_served_the_turn_before() -> None:
    """Turn 2's input (turn 1's prompt, its response, the tool's reply) is a new token list, which load alone
    would send to the emptier engine; the pool sends it where its prefix is cached. A request that shares no
    prefix, or too little of one, goes by load."""
    from rl.rollout.pool import PrefixMemory, block_hashes, shares_by_prefix

    memory = PrefixMemory(2)
    a, b = tokens(1000), tokens(2000)
    assert shares_by_prefix([a, a, b, b], 2, memory) == [[0, 1], [2, 3]]  # a new prompt goes by load
    memory.record(1, block_hashes(b + tokens(3000, 40)))  # b's response, as its engine ended it
    turn_two = b + tokens(3000, 40) + tokens(4000, 8)
    assert shares_by_prefix([turn_two], 2) == [[0], []]
    assert shares_by_prefix([turn_two], 2, memory) == [[], [0]]
    fresh = [tokens(5000), tokens(6000), tokens(7000)]
    assert shares_by_prefix(fresh, 2, memory) == shares_by_prefix(fresh, 2) == [[0, 2], [1]]
    memory.forget()
    memory.record(1, block_hashes(a))
    assert shares_by_prefix([a[:16] + tokens(8000, 48)], 2, memory) == [[0], []]  # 16 of 64 tokens: under 30%
    assert shares_by_prefix([a[:32] + tokens(8000, 32)], 2, memory) == [[], [0]]


def test_prefix_affinity_yields_to_load_beyond_the_even_share() -> None:
    """Eight prompts behind one long system prompt that engine 0 holds: it takes four (its even share), the other
    engine the rest, and from then on holds the system prompt too. An engine that has served nothing still gets
    its share of a batch whose every prompt the others hold the start of."""
    from rl.rollout.pool import PrefixMemory, block_hashes, shares_by_prefix

    system = tokens(100, 64)
    memory = PrefixMemory(2)
    memory.record(0, block_hashes(system))
    batch = [system + tokens(1000 * k, 8) for k in range(1, 9)]
    assert shares_by_prefix(batch, 2, memory) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert memory.matched(block_hashes(system)) == [4, 4]
    # held by both, it no longer favours either: by load; a GRPO group's samples still stay together
    groups = [system + tokens(1000 * k, 8) for k in range(9, 12) for _ in range(2)]
    assert shares_by_prefix(groups, 2, memory) == [[0, 1, 4, 5], [2, 3]]

    memory = PrefixMemory(4)
    for engine in range(3):
        memory.record(engine, block_hashes(system))
    groups = [system + tokens(1000 * k, 8) for k in range(1, 9) for _ in range(8)]
    assert [len(share) for share in shares_by_prefix(groups, 4, memory)] == [16, 16, 16, 16]


def test_the_memory_is_bounded_and_forgotten() -> None:
    """The least recently used blocks go first, a sequence's last blocks before its first (as a radix cache
    evicts leaves): what is held stays a prefix. A flush forgets every engine's, a replaced engine its own."""
    from rl.rollout.pool import BLOCK_TOKENS, PrefixMemory, block_hashes, shares_by_prefix

    memory = PrefixMemory(2, capacity=4)
    older, newer = block_hashes(tokens(0, 3 * BLOCK_TOKENS)), block_hashes(tokens(500, 3 * BLOCK_TOKENS))
    memory.record(0, older)
    memory.record(0, newer)
    assert memory.matched(older) == [1, 0] and memory.matched(newer) == [3, 0]
    memory.record(1, newer)
    memory.forget(0)
    assert memory.matched(newer) == [0, 3]
    memory.forget()
    assert memory.matched(newer) == [0, 0]
    turn_two = [tokens(500, 3 * BLOCK_TOKENS + 4)]
    assert shares_by_prefix(turn_two, 2, memory) == shares_by_prefix(turn_two, 2)


def test_placement_is_a_function_of_the_batches() -> None:
    """Two pools given the same batches, with the same responses, place every request alike."""
    from rl.rollout.pool import PrefixMemory, block_hashes, shares_by_prefix

    def replay() -> list[list[list[int]]]:
        memory, placed = PrefixMemory(3), []
        prompts = [tokens(1000 * p) for p in range(6) for _ in range(2)]
        for turn in range(3):
            shares = shares_by_prefix(prompts, 3, memory)
            placed.append(shares)
            slot_of = {i: s for s, share in enumerate(shares) for i in share}
            responses = [tokens(50_000 + 100 * i + 10 * turn, 20) for i in range(len(prompts))]
            for i, prompt in enumerate(prompts):
                memory.record(slot_of[i], block_hashes(prompt + responses[i]))
            prompts = [prompt + responses[i] + tokens(90_000, 5) for i, prompt in enumerate(prompts)][turn % 3:]
        return placed

    first = replay()
    assert first == replay()
    assert all(len(share) <= math.ceil(sum(map(len, shares)) / 3) for shares in first[1:] for share in shares)


def test_only_a_pool_of_engines_with_a_prefix_cache_remembers_prefixes(write_config) -> None:
    """The torch engine starts every call with an empty KV cache: its requests go by load alone."""
    from rl.rollout.pool import EnginePool, block_hashes

    rollout = load_config(write_config(MINIMAL)).rollout
    assert EnginePool(None, 0, rollout, engines=["e0", "e1"]).prefixes is None
    pool = EnginePool(None, 0, rollout.model_copy(update={"engine": "sglang"}), engines=["e0", "e1"])
    assert pool.prefixes is not None
    pool.prefixes.record(1, block_hashes(tokens(0)))
    pool.forget_prefixes(0)
    assert pool.prefixes.matched(block_hashes(tokens(0))) == [0, 2]
    pool.forget_prefixes()
    assert pool.prefixes.matched(block_hashes(tokens(0))) == [0, 0]
