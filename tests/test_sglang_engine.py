"""The SGLang engine's translation of rlhpc's interface to SGLang's server (issue #7). Launching a server needs
SGLang and a GPU: that test is `gpu` and skipped where SGLang is not installed."""

from __future__ import annotations

import pytest

from rl.config import SglangConfig
from rl.rollout.engine import SamplingParams
from rl.rollout.sglang_engine import generate_payload, generation_of, server_args


def test_every_sglang_option_reaches_the_server_command_line():
    o = SglangConfig(rollout_num_gpus_per_engine=2, sglang_mem_fraction_static=0.7, sglang_cuda_graph_bs=[1, 2, 4],
                     sglang_disable_cuda_graph=True, sglang_context_length=4096, sglang_server_concurrency=64,
                     sglang_server_args={"chunked_prefill_size": 8192, "mem_fraction_static": 0.6})
    args = server_args(o, "/models/qwen3", host="10.0.0.1", port=30000, colocate=True)
    text = " ".join(args)
    for expected in ("--model-path /models/qwen3", "--tp-size 2", "--cuda-graph-bs 1 2 4", "--disable-cuda-graph",
                     "--context-length 4096", "--max-running-requests 64", "--chunked-prefill-size 8192",
                     "--enable-memory-saver", "--skip-tokenizer-init", "--host 10.0.0.1 --port 30000"):
        assert expected in text
    assert "--mem-fraction-static 0.6" in text and "0.7" not in text  # sglang_server_args win
    assert "--enable-memory-saver" not in server_args(SglangConfig(), "m", host="h", port=1, colocate=False)


def test_requests_carry_ids_seed_and_ask_for_log_probs_and_answers_become_generations():
    body = generate_payload([1, 2, 3], SamplingParams(max_new_tokens=8, temperature=0.9, top_k=-1,
                                                      stop_token_ids=(7,)), seed=42)
    assert body["input_ids"] == [1, 2, 3] and body["return_logprob"] is True
    wanted = {"max_new_tokens": 8, "temperature": 0.9, "top_k": -1, "stop_token_ids": [7], "sampling_seed": 42}
    assert {k: body["sampling_params"][k] for k in wanted} == wanted
    g = generation_of({"meta_info": {"finish_reason": {"type": "stop", "matched": 7},
                                     "output_token_logprobs": [[-0.5, 4, None], [-0.1, 7, None]]}}, version=3)
    assert (g.output_ids, g.log_probs, g.finish_reason, g.weight_version) == ([4, 7], [-0.5, -0.1], "stop", 3)


@pytest.mark.gpu
def test_a_real_sglang_server_generates_with_log_probs_and_takes_new_weights(tiny_model_dir):
    pytest.importorskip("sglang", reason="SGLang is not installed (its wheels are too large to carry here)")
    from transformers import AutoModelForCausalLM

    from rl.rollout.sglang_engine import SglangEngine

    engine = SglangEngine(str(tiny_model_dir), options=SglangConfig(sglang_mem_fraction_static=0.3))
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    first = engine.generate([[1, 2, 3]] * 4, params, seeds=[0, 1, 2, 3])
    assert all(len(g.output_ids) == len(g.log_probs) > 0 for g in first)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    engine.update_weights({k: v * 0 for k, v in model.state_dict().items()}, version=1)
    assert engine.generate([[1, 2, 3]], params, seeds=[0])[0].weight_version == 1
