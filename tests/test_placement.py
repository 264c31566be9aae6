"""Where colocated engines sit (`rl/placement.py`): which training rank hosts which engine, whose GPUs each
spans, and the GPUs its SGLang server is given; and the config refusing engines that would straddle nodes."""

from __future__ import annotations

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
    from rl.rollout.pool import shares_by_prompt

    groups = [[p, p + 1] for p in range(5) for _ in range(4)]  # 5 GRPO groups of 4 samples, in order
    shares = shares_by_prompt(groups, 3)
    assert shares == [[0, 1, 2, 3, 12, 13, 14, 15], [4, 5, 6, 7, 16, 17, 18, 19], [8, 9, 10, 11]]
    # interleaved prompts (requests of a multi-turn rollout) still land with their own prompt's
    mixed = [[1], [2], [1], [3], [2], [1]]
    assert shares_by_prompt(mixed, 2) == [[0, 2, 5], [1, 3, 4]]
    assert shares_by_prompt([[1], [2]], 4) == [[0], [1], [], []]
