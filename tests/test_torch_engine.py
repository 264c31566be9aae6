from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from rl.rollout.engine import SamplingParams, sample_seed
from rl.rollout.torch_engine import TorchEngine, filter_logits


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return TorchEngine(tiny_model_dir)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def prompts_of(tokenizer, texts):
    return [tokenizer(t)["input_ids"] for t in texts]


def test_generates_with_log_probs_and_finish_reasons(engine, tokenizer):
    prompts = prompts_of(tokenizer, ["3+4=", "12+30=", "9-1="])
    params = SamplingParams(max_new_tokens=6, stop_token_ids=(tokenizer.eos_token_id,))
    gens = engine.generate(prompts, params, seeds=[1, 2, 3])
    assert len(gens) == 3
    for g in gens:
        assert 1 <= len(g.output_ids) <= 6 and len(g.log_probs) == len(g.output_ids)
        assert all(lp <= 0 for lp in g.log_probs)
        assert g.finish_reason == ("stop" if g.output_ids[-1] == tokenizer.eos_token_id else "length")
        assert g.finish_reason == "stop" or len(g.output_ids) == 6


def test_log_probs_are_those_of_the_model(engine, tokenizer):
    """The returned log-prob of each token equals a plain forward pass over prompt + response."""
    prompt = prompts_of(tokenizer, ["7+2="])[0]
    gen = engine.generate([prompt], SamplingParams(max_new_tokens=5, temperature=0.8), seeds=[5])[0]
    full = torch.tensor([prompt + gen.output_ids])
    with torch.no_grad():
        logits = engine.model(full).logits[0, len(prompt) - 1 : -1] / 0.8
    expected = logits.log_softmax(-1).gather(-1, torch.tensor(gen.output_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(gen.log_probs), expected, atol=1e-5)


def test_samples_depend_only_on_their_seed(engine, tokenizer):
    """Same seed, same sample, whatever batch it is generated in (left padding and early finishers)."""
    a, b = prompts_of(tokenizer, ["1+1=", "123+456+789="])
    params = SamplingParams(max_new_tokens=8, stop_token_ids=(tokenizer.eos_token_id,))
    alone = engine.generate([a], params, seeds=[42])[0]
    batched = engine.generate([b, a, b], params, seeds=[7, 42, 8])[1]
    assert alone.output_ids == batched.output_ids
    assert torch.allclose(torch.tensor(alone.log_probs), torch.tensor(batched.log_probs), atol=1e-5)
    other = engine.generate([a] * 4, params, seeds=[1, 2, 3, 4])
    assert len({tuple(g.output_ids) for g in other}) > 1


def test_sample_seed_is_the_same_in_every_process():
    """A resumed run draws what the interrupted one did only if the seed does not depend on the process (as
    Python's salted hash() would): computed in processes with other hash salts, it is the same."""
    code = "import sys; from rl.rollout.engine import sample_seed; print(sample_seed(*map(int, sys.argv[1:])))"
    for salt in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code, "1", "2", "3"], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": salt}).stdout
        assert int(out) == sample_seed(1, 2, 3)
    assert len({sample_seed(1, r, i) for r in range(10) for i in range(10)}) == 100
    assert sample_seed(1, 12, 3) != sample_seed(1, 1, 23)  # digits of one argument never run into the next


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [[True, False, False, True]]
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert torch.isinf(filter_logits(p, -1, 0.8)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(p, -1, 0.1)).tolist() == [[False, True, True, True]]


def test_greedy_top_k_one(engine, tokenizer):
    prompt = prompts_of(tokenizer, ["5+5="])[0]
    params = SamplingParams(max_new_tokens=4, top_k=1)
    first, second = (engine.generate([prompt], params, seeds=[s])[0].output_ids for s in (1, 2))
    assert first == second


def test_weight_update_release_and_resume(tiny_model_dir, tokenizer):
    engine = TorchEngine(tiny_model_dir)
    prompt = prompts_of(tokenizer, ["2+2="])[0]
    params = SamplingParams(max_new_tokens=4)
    before = engine.generate([prompt], params, seeds=[0])[0]
    saved = {n: p.detach().clone() for n, p in engine.model.named_parameters()}
    engine.update_weights(((n, torch.zeros_like(t)) for n, t in saved.items()), version=1)
    zeroed = engine.generate([prompt], params, seeds=[0])[0]
    assert zeroed.weight_version == 1 and zeroed.log_probs != before.log_probs
    engine.release_memory()
    with pytest.raises(RuntimeError, match="released"):
        engine.generate([prompt], params, seeds=[0])
    engine.resume_memory()
    with pytest.raises(ValueError, match="every parameter must be sent"):
        engine.update_weights([next(iter(saved.items()))], version=2)
    engine.update_weights(saved.items(), version=2)
    again = engine.generate([prompt], params, seeds=[0])[0]
    assert again.output_ids == before.output_ids and again.weight_version == 2
    with pytest.raises(KeyError, match="no parameter 'nope'"):
        engine.update_weights([("nope", torch.zeros(1))], version=3)


def test_finished_samples_leave_the_batch(engine, tokenizer):
    prompt = prompts_of(tokenizer, ["1+1="])[0]
    hot = SamplingParams(max_new_tokens=1, temperature=5.0)
    first = {seed: engine.generate([prompt], hot, seeds=[seed])[0].output_ids[0] for seed in range(8)}
    seed_b = next(seed for seed in first if first[seed] != first[0])
    batch_sizes = []
    hook = engine.model.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        params = SamplingParams(max_new_tokens=4, temperature=5.0, stop_token_ids=(first[0],))
        gens = engine.generate([prompt, prompt], params, seeds=[0, seed_b])
    finally:
        hook.remove()
    assert gens[0].output_ids == [first[0]] and gens[0].finish_reason == "stop"
    assert len(gens[1].output_ids) > 1
    assert batch_sizes[0] == 2 and batch_sizes[1:] == [1] * (len(batch_sizes) - 1)


def test_ended_samples_are_sent_every_stream_interval_decode_steps(engine, tiny_model_dir):
    """With `stream_interval` 4 a message goes after decode steps 4, 8, ... (and at the end), holding the
    samples that ended since the last: the same generations in fewer messages."""
    prompts = [[5 + i % 7, 9, 11 + i % 5] for i in range(24)]
    params = SamplingParams(max_new_tokens=12, stop_token_ids=tuple(range(20, 40)))  # a fifth of the tokens
    seeds = list(range(24))
    whole = engine.generate(prompts, params, seeds)
    messages = list(TorchEngine(tiny_model_dir, stream_interval=4).generate_stream(prompts, params, seeds))
    assert sorted(i for m in messages for i, _ in m) == list(range(24))
    assert all(g.output_ids == whole[i].output_ids and g.log_probs == whole[i].log_probs for m in messages
               for i, g in m)
    windows = [{-(-len(g.output_ids) // 4) for _, g in m} for m in messages]  # 1: ended in steps 1-4, ...
    assert all(len(w) == 1 for w in windows) and [w.pop() for w in windows] == sorted(
        {-(-len(g.output_ids) // 4) for g in whole})


def test_generations_stream_as_they_end_and_an_abort_returns_the_unfinished_partial(engine, tokenizer):
    prompts = prompts_of(tokenizer, ["1+1=", "22+33=", "5*6=", "9-4="])
    params = SamplingParams(max_new_tokens=12, stop_token_ids=(tokenizer.eos_token_id,))
    seeds = [1, 2, 3, 4]
    whole = engine.generate(prompts, params, seeds)
    ended = [i for batch in engine.generate_stream(prompts, params, seeds) for i, _ in batch]
    assert ended == sorted(range(4), key=lambda i: (whole[i].finish_reason == "length", len(whole[i].output_ids)))
    assert whole[ended[0]].finish_reason == "stop" and len(whole[ended[0]].output_ids) < 12

    stream = engine.generate_stream(prompts, params, seeds)
    firsts = dict(next(stream))  # those that ended together, first
    engine.abort()
    rest = dict(pair for batch in stream for pair in batch)
    assert all(g.output_ids == whole[i].output_ids for i, g in firsts.items())
    gen = next(iter(firsts.values()))
    assert rest and all(g.finish_reason == "abort" for g in rest.values())
    for i, g in rest.items():  # what an abort returns is the start of what the sample would have been
        assert len(g.output_ids) == len(gen.output_ids) and whole[i].output_ids[: len(g.output_ids)] == g.output_ids
        assert g.log_probs == pytest.approx(whole[i].log_probs[: len(g.log_probs)], abs=1e-5)
    engine.abort()  # idle: nothing to end, the next generation is whole
    assert [g.output_ids for g in engine.generate(prompts, params, seeds)] == [g.output_ids for g in whole]


@pytest.mark.gpu
def test_the_engine_generates_on_cuda_and_takes_new_weights(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    engine = TorchEngine(tiny_model_dir, device="cuda")
    params = SamplingParams(max_new_tokens=6)
    before = engine.generate([[5, 6, 7]], params, [1])[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    engine.update_weights({k: v * 0.5 for k, v in model.named_parameters()}, 1)
    after = engine.generate([[5, 6, 7]], params, [1])[0]
    assert after.weight_version == 1 and after.log_probs != before.log_probs
