"""Hugging Face ↔ Megatron-core layout (issue #7): exact round trips on tiny models of each family, the names
and shapes a real Megatron GPTModel has, and the torch_dist conversion both ways (megatron-core builds its
model on the host; its forward and its torch_dist writer need CUDA, so those tests are `gpu`)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, Glm4Config, LlamaConfig, Qwen2Config, Qwen3Config

from rl.megatron.layout import Heads, fuse_qkv, hf_to_megatron, megatron_to_hf, split_qkv

SHAPE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
CONFIGS = {
    "qwen3": lambda: Qwen3Config(**SHAPE, head_dim=16, tie_word_embeddings=True),
    "qwen2": lambda: Qwen2Config(**SHAPE, tie_word_embeddings=False),
    "llama": lambda: LlamaConfig(**SHAPE, tie_word_embeddings=False),
    "glm4": lambda: Glm4Config(**SHAPE, head_dim=16, tie_word_embeddings=False),
}


def tiny(kind: str):
    torch.manual_seed(0)
    config = CONFIGS[kind]()
    return config, AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def test_fused_qkv_puts_each_query_group_beside_its_key_and_value():
    heads = Heads(heads=4, groups=2, head_dim=3)
    q = torch.arange(12.0)[:, None].expand(12, 5)
    k, v = 100 + torch.arange(6.0)[:, None].expand(6, 5), 200 + torch.arange(6.0)[:, None].expand(6, 5)
    qkv = fuse_qkv(q, k, v, heads)
    # group 0: query heads 0 and 1, key head 0, value head 0; then group 1
    assert qkv[:, 0].tolist() == [*range(6), 100, 101, 102, 200, 201, 202,
                                  *range(6, 12), 103, 104, 105, 203, 204, 205]
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(qkv, heads), (q, k, v)))
    bias = fuse_qkv(q[:, 0], k[:, 0], v[:, 0], heads)
    assert torch.equal(bias, qkv[:, 0])


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("te", [False, True])
def test_hf_megatron_hf_is_exact(kind, te):
    config, model = tiny(kind)
    hf = model.state_dict()
    back = megatron_to_hf(hf_to_megatron(hf, config, te=te), config, te=te)
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)


needs_megatron = pytest.mark.skipif(importlib.util.find_spec("megatron") is None,
                                    reason="megatron-core is not installed (pip install rlhpc[megatron])")


@needs_megatron
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_layout_matches_a_megatron_gpt_model(kind):
    from rl.megatron.convert import _host_model, load_megatron_state, one_process

    config, model = tiny(kind)
    mapped = hf_to_megatron(model.state_dict(), config)
    with one_process():
        gpt = _host_model(config, te=False)
        shapes = {k: v.shape for k, v in gpt.state_dict().items() if isinstance(v, torch.Tensor)}
        assert {k: v.shape for k, v in mapped.items()} == shapes
        load_megatron_state(gpt, mapped)


@needs_megatron
@pytest.mark.parametrize("kind", ["qwen3", "glm4"])
def test_convert_to_torch_dist_and_back_is_exact(tmp_path, kind):
    from rl.megatron.convert import hf_to_torch_dist, torch_dist_to_hf

    config, model = tiny(kind)
    model.save_pretrained(tmp_path / "hf")
    hf_to_torch_dist(tmp_path / "hf", tmp_path / "torch_dist")
    torch_dist_to_hf(tmp_path / "torch_dist", tmp_path / "back")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=torch.float32).state_dict()
    original = model.state_dict()
    assert again.keys() == original.keys()
    assert all(torch.equal(again[k], original[k]) for k in original)


@pytest.mark.parametrize("name", ["decoder.layers.3.mlp.linear_fc1.weight", "decoder.layers.3.mlp.linear_fc2.weight"])
def test_tensor_parallel_shards_put_back_whole(name):
    from rl.megatron.shards import renumber, shard, unshard

    whole = torch.arange(8 * 6.0).reshape(8, 6)
    for dim in (0, 1):
        parts = [shard(whole, name, dim, r, 2) for r in range(2)]
        assert torch.equal(unshard(parts, name, dim), whole)
    gate_rows = shard(whole, "decoder.layers.0.mlp.linear_fc1.weight", 0, 1, 2)[:, 0].tolist()
    assert gate_rows == [12.0, 18.0, 36.0, 42.0]  # rank 1: gate rows 2-3, then up rows 6-7
    assert renumber("decoder.layers.1.mlp.linear_fc2.weight", 4) == "decoder.layers.5.mlp.linear_fc2.weight"
    assert renumber("embedding.word_embeddings.weight", 4) == "embedding.word_embeddings.weight"


def test_context_parallel_ranks_hold_balanced_chunks_covering_every_token_once():
    from rl.megatron.context_parallel import held_positions, padded_lengths

    lengths = [5, 12, 1]
    assert padded_lengths(lengths, 2) == [8, 12, 4] and padded_lengths(lengths, 1) == lengths
    ranks = [held_positions(lengths, 2, r) for r in range(2)]
    assert sorted(p for held in ranks for p in held) == list(range(24))
    assert [len(h) for h in ranks] == [12, 12]
    assert ranks[0][:4] == [0, 1, 6, 7]  # sequence 0 (8 padded tokens, chunks of 2): chunks 0 and 3
    assert held_positions(lengths, 1, 0) == list(range(18))


@pytest.mark.parametrize("packed,cp_size", [(False, 1), (True, 1), (True, 2)])
def test_micro_batch_inputs_point_at_each_response_token_once(packed, cp_size):
    """Across the context-parallel ranks, every response token is predicted by exactly one held logit, at the
    position right before it, and the inputs each rank holds are its chunks of the sequences."""
    from rl.batch import TrainSample, lay_out

    samples = [TrainSample([10, 11, 12, 13, 14], 2, [1, 1], 0.0, [0.0] * 2, [0.0] * 2),
               TrainSample([20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30], 6, [1] * 6, 0.0, [0.0] * 6, [0.0] * 6)]
    ranks = [lay_out(samples, packed=packed, cp_size=cp_size, cp_rank=r) for r in range(cp_size)]
    times_held = sum(x.held.long() for x in ranks)
    assert torch.equal(times_held, ranks[0].valid.long())
    for x in ranks:
        inputs = x.input_ids.flatten()
        for b, s in enumerate(samples):
            response = s.tokens[s.prompt_length:]
            assert x.target[b, : len(response)].tolist() == response
            for j in range(len(response)):
                if x.held[b, j]:
                    # the held logit sits on the token just before response token j
                    assert inputs[x.at[b, j]] == s.tokens[s.prompt_length - 1 + j]
    if cp_size == 2:
        assert ranks[0].input_ids[0, :4].tolist() == [10, 11, 0, 0]  # sequence 0 padded to 8: chunks 0 and 3


@pytest.mark.parametrize("cp_size,tp_size", [(1, 2), (2, 2), (1, 4)])
def test_packed_rows_are_padded_for_sequence_parallelism(cp_size, tp_size):
    """Sequence parallelism scatters each rank's row over the tensor-parallel ranks, so its length must divide
    evenly (Megatron asserts it in the embedding's reduce-scatter): the row ends with a padding sequence, and
    what the loss reads is unchanged."""
    from rl.batch import TrainSample, lay_out

    samples = [TrainSample([10, 11, 12, 13, 14], 2, [1, 1], 0.0, [0.0] * 2, [0.0] * 2),
               TrainSample([20, 21, 22, 23, 24, 25, 26], 3, [1] * 3, 0.0, [0.0] * 3, [0.0] * 3)]
    for r in range(cp_size):
        plain = lay_out(samples, packed=True, cp_size=cp_size, cp_rank=r)
        x = lay_out(samples, packed=True, cp_size=cp_size, cp_rank=r, multiple=tp_size)
        assert x.input_ids.shape[1] % tp_size == 0 and x.input_ids.shape[1] >= plain.input_ids.shape[1]
        assert int(x.cu_seqlens[-1]) == x.input_ids.shape[1] * cp_size
        for name in ("at", "target", "valid", "held"):
            assert torch.equal(getattr(x, name), getattr(plain, name)), name
    padded = lay_out(samples, packed=False, multiple=4)
    assert padded.input_ids.shape[1] == 8


def test_megatron_parameters_are_read_one_tensor_at_a_time(tiny_model_dir):
    """Each Megatron parameter from only the Hugging Face tensors it is made of, read from safetensors by name:
    the same as converting the whole loaded model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rl.megatron.hf_tensors import hf_tensors
    from rl.megatron.layout import OUTPUT, megatron_sources

    config = AutoConfig.from_pretrained(tiny_model_dir)
    whole = hf_to_megatron(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).state_dict(),
                           config)
    read_names = []
    with hf_tensors(tiny_model_dir) as read:
        def counted(name):
            read_names.append(name)
            return read(name)

        layer_1 = {name: make(*map(counted, keys)) for name, (keys, make) in megatron_sources(config).items()
                   if name.startswith("decoder.layers.1.")}
        tied = megatron_sources(config)[OUTPUT]
        assert torch.equal(tied[1](*map(read, tied[0])), whole["embedding.word_embeddings.weight"])
    assert layer_1 and all(torch.equal(t, whole[name]) for name, t in layer_1.items())
    assert read_names and all(name.startswith("model.layers.1.") for name in read_names)
