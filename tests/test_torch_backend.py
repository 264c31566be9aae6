from __future__ import annotations

import dataclasses
import json
import random
import shutil

import pytest
import torch

from conftest import MINIMAL
from rl import checkpoint
from rl.batch import TrainSample, micro_batches, pad_rows, split_for_ranks
from rl.train.backend import TrainingBackend
from rl.train.objective import policy_objective
from rl.train.schedule import lr_at
from rl.train.torch_backend import TorchBackend
from rlhpc.config import load_config


def make_samples(n=6, vocab=90, seed=0):
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        prompt = [rng.randrange(4, vocab) for _ in range(rng.randint(2, 7))]
        response_len = rng.randint(1, 6)
        response = [rng.randrange(4, vocab) for _ in range(response_len)]
        mask = [1] * response_len
        if response_len > 2:
            mask[1] = 0  # a tool-output token: no loss
        samples.append(TrainSample(prompt + response, response_len, mask, reward=rng.random(),
                                   rollout_log_probs=[-1.0] * response_len,
                                   advantages=[rng.uniform(-1, 1)] * response_len))
    return samples


def backend_for(write_config, tiny_model_dir, *extra):
    cfg = load_config(write_config(MINIMAL), ["grpo.use_kl_loss=true", "grpo.kl_loss_coef=0.1",
                                               "grpo.entropy_coef=0.01", *extra])
    return TorchBackend(cfg, init_from=tiny_model_dir, total_steps=10)


def padded_reference_grads(backend, samples):
    """The unpacked computation: a right-padded batch with an attention mask, one forward for all."""
    model, width = backend.model, max(len(s.tokens) for s in samples)
    ids = torch.zeros((len(samples), width), dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, s in enumerate(samples):
        ids[i, : len(s.tokens)] = torch.tensor(s.tokens)
        attn[i, : len(s.tokens)] = 1
    logits = model(input_ids=ids, attention_mask=attn).logits.float()
    ref_logits = backend.ref(input_ids=ids, attention_mask=attn).logits.float()
    t = backend.cfg.rollout.rollout_temperature
    lps, refs, ents = [], [], []
    for i, s in enumerate(samples):
        lo, hi = s.prompt_length - 1, len(s.tokens) - 1
        target = ids[i, lo + 1 : hi + 1, None]
        lps.append((logits[i, lo:hi] / t).log_softmax(-1).gather(-1, target)[:, 0])
        refs.append((ref_logits[i, lo:hi] / t).log_softmax(-1).gather(-1, target)[:, 0].detach())
        p = (logits[i, lo:hi] / t).softmax(-1)
        ents.append(-(p * p.clamp_min(1e-30).log()).sum(-1))
    r = max(s.response_length for s in samples)
    lp = torch.stack([torch.nn.functional.pad(x, (0, r - len(x))) for x in lps])
    ent = torch.stack([torch.nn.functional.pad(x, (0, r - len(x))) for x in ents])
    mask = pad_rows([s.loss_mask for s in samples], r)
    loss, _ = policy_objective(
        backend.cfg.grpo, log_probs=lp, entropy=ent, old_log_probs=lp.detach(),
        advantages=pad_rows([s.advantages for s in samples], r), mask=mask, ref_log_probs=pad_rows(refs, r),
        rollout_log_probs=pad_rows([s.rollout_log_probs for s in samples], r),
        num_samples=len(samples), num_tokens=int(mask.sum()))
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("packed_rows", [False, True], ids=["padded-rows", "packed-rows"])
@pytest.mark.parametrize("per_token", [False, True], ids=["per-sample", "per-token"])
def test_packed_micro_batches_give_the_unpacked_gradient(write_config, tiny_model_dir, per_token, packed_rows):
    samples = make_samples()
    num_tokens = sum(sum(s.loss_mask) for s in samples)
    flags = [f"grpo.calculate_per_token_loss={str(per_token).lower()}"]
    expected = padded_reference_grads(backend_for(write_config, tiny_model_dir, *flags), samples)
    for packing in (["perf.use_dynamic_batch_size=true", "perf.max_tokens_per_gpu=20"],
                    ["perf.micro_batch_size=4"]):
        backend = backend_for(write_config, tiny_model_dir, *flags, *packing)
        backend.packed = packed_rows
        assert len(backend._micro_batches(samples)) > 1
        backend.model.zero_grad()
        backend.accumulate_gradients(samples, num_samples=len(samples), num_tokens=num_tokens)
        for name, p in backend.model.named_parameters():
            assert torch.allclose(p.grad, expected[name], atol=1e-5, rtol=1e-4), name


def test_tool_output_gets_no_loss(write_config, tiny_model_dir):
    """Tokens with loss mask 0 (what a tool wrote) are context only: whatever advantage, sampling log-prob or
    KL they would have, the gradient is the same; with mask 1 it is not."""
    backend = backend_for(write_config, tiny_model_dir)
    samples = [s for s in make_samples() if 0 in s.loss_mask]
    num_tokens = sum(sum(s.loss_mask) for s in samples)

    def grads(batch):
        backend.model.zero_grad()
        backend.accumulate_gradients(batch, num_samples=len(batch), num_tokens=num_tokens)
        return [p.grad.clone() for p in backend.model.parameters()]

    def at_tool_tokens(advantage, mask_value):
        out = []
        for s in samples:
            adv, lps = list(s.advantages), list(s.rollout_log_probs)
            for i, m in enumerate(s.loss_mask):
                if not m:
                    adv[i], lps[i] = advantage, -9.0
            mask = [m or mask_value for m in s.loss_mask]
            out.append(dataclasses.replace(s, advantages=adv, rollout_log_probs=lps, loss_mask=mask))
        return out

    base = grads(samples)
    assert all(torch.equal(a, b) for a, b in zip(base, grads(at_tool_tokens(50.0, 0))))
    assert not all(torch.allclose(a, b) for a, b in zip(base, grads(at_tool_tokens(50.0, 1))))


def test_train_step_moves_the_policy_and_reports(write_config, tiny_model_dir):
    backend = backend_for(write_config, tiny_model_dir, "optimizer.lr=1e-3")
    samples = make_samples()
    before = [p.detach().clone() for p in backend.model.parameters()]
    waits = []  # what an asynchronous save's wait for its copy would find: the step's backward done, no weight moved

    def before_update():
        waits.append((all(p.grad is not None for p in backend.model.parameters()),
                      all(torch.equal(a, b) for a, b in zip(before, backend.model.parameters())), backend.step))

    metrics = backend.train_step(samples, num_samples=len(samples), num_tokens=sum(sum(s.loss_mask) for s in samples),
                                 before_update=before_update)
    assert waits == [(True, True, 0)]
    assert {"loss", "pg_loss", "entropy", "clipfrac", "kl", "grad_norm", "lr"} <= set(metrics)
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-6) and metrics["clipfrac"] == 0.0  # on-policy, ref = init
    assert metrics["lr"] == 1e-3 and metrics["grad_norm"] > 0 and backend.step == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, backend.model.parameters()))
    lps = backend.compute_log_probs(samples)
    assert [len(x) for x in lps] == [s.response_length for s in samples]
    assert backend.compute_log_probs(samples, ref=True) != lps


def test_a_non_finite_step_is_skipped_and_counted_and_the_next_one_taken(write_config, tiny_model_dir):
    """A NaN advantage makes the loss and the gradient NaN: the step changes no weight, no optimizer state and
    not the schedule's position, and says so; the next, finite, step trains as usual."""
    backend = backend_for(write_config, tiny_model_dir, "optimizer.lr=1e-3")
    samples = make_samples()
    tokens = sum(sum(s.loss_mask) for s in samples)
    poisoned = [dataclasses.replace(samples[0], advantages=[float("nan")] * samples[0].response_length),
                *samples[1:]]
    before = [p.detach().clone() for p in backend.model.parameters()]
    metrics = backend.train_step(poisoned, num_samples=len(samples), num_tokens=tokens,
                                 before_update=lambda: pytest.fail("a skipped step changes nothing to wait for"))
    assert metrics["skipped_steps"] == 1.0 and not torch.isfinite(torch.tensor(metrics["loss"]))
    assert backend.step == 0 and not backend.optimizer.state
    assert all(torch.equal(a, b) for a, b in zip(before, backend.model.parameters()))
    metrics = backend.train_step(samples, num_samples=len(samples), num_tokens=tokens)
    assert metrics["skipped_steps"] == 0.0 and backend.step == 1
    assert all(torch.isfinite(p).all() for p in backend.model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, backend.model.parameters()))


def test_a_reloaded_backend_continues_training_bitwise_even_through_dropout(write_config, tiny_model_dir, tmp_path):
    """Model, optimizer, step and the rank's random state: the step after a reload draws the same dropout masks
    and lands on the same weights as the step that was never interrupted."""
    model_dir = tmp_path / "dropout-model"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.5}))
    samples = make_samples()
    sizes = {"num_samples": len(samples), "num_tokens": sum(sum(s.loss_mask) for s in samples)}
    folder = tmp_path / "ckpt"

    def after_next_step(backend) -> dict[str, torch.Tensor]:
        backend.train_step(samples, **sizes)
        return {name: t.clone() for name, t in backend.named_weights()}

    torch.manual_seed(7)
    backend = backend_for(write_config, model_dir)
    assert isinstance(backend, TrainingBackend)
    backend.train_step(samples, **sizes)
    backend.save(folder)
    checkpoint.save_rng(folder, rank=0)
    expected = after_next_step(backend)

    def reloaded(with_rng: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(99)  # another process's state
        again = backend_for(write_config, model_dir)
        again.load(folder)
        assert again.step == 1
        if with_rng:
            assert checkpoint.load_rng(folder, rank=0)
        return after_next_step(again)

    assert all(torch.equal(t, expected[name]) for name, t in reloaded(with_rng=True).items())
    assert any(not torch.equal(t, expected[name]) for name, t in reloaded(with_rng=False).items())  # dropout draws
    assert not checkpoint.load_rng(folder, rank=1)  # written by one rank: a second has none


def test_micro_batches_never_truncate_and_respect_the_limit():
    assert micro_batches([3, 4, 5, 20, 1, 1], 10) == [[0, 1], [2], [3], [4, 5]]
    assert micro_batches([3, 4, 5], None, 2) == [[0, 1], [2]]
    assert [list(r) for r in split_for_ranks(5, 2)] == [[0, 1, 2], [3, 4]]


def test_lr_schedules():
    kw = dict(lr=1.0, min_lr=0.1, warmup=2, decay_steps=12)
    assert [lr_at(s, style="constant", **kw) for s in (0, 1, 2, 50)] == [0.5, 1.0, 1.0, 1.0]
    assert lr_at(7, style="linear", **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(7, style="cosine", **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(12, style="cosine", **kw) == pytest.approx(0.1)
    assert lr_at(4, style="cosine", **kw) == pytest.approx(0.1 + 0.45 * (1 + 0.8090169943749475))


def test_a_colocated_engine_gives_its_memory_to_training_and_gets_the_new_weights_back(write_config, tiny_model_dir):
    from rl.rollout.engine import SamplingParams
    from rl.train.worker import TrainWorker

    cfg = load_config(write_config(MINIMAL), ["perf.colocate=true", "perf.offload_train=true",
                                               "optimizer.lr=1e-2"])
    worker = TrainWorker(cfg, rank=0, world_size=1, master_addr="", master_port=0, init_from=tiny_model_dir,
                         total_steps=10, threads=1, host_engine=True)
    engine, params = worker.engine, SamplingParams(max_new_tokens=3)
    worker.sync_engine(0)
    before = engine.generate([[5, 6, 7]], params, [1])[0]
    worker.to_training()
    assert sum(p.numel() for p in engine.model.parameters()) == 0  # released while the policy trains
    with pytest.raises(RuntimeError, match="memory was released"):
        engine.generate([[5, 6, 7]], params, [1])
    samples = make_samples()
    worker.train([samples], [(len(samples), sum(sum(s.loss_mask) for s in samples))], [None])
    worker.sync_engine(1)
    trained = dict(worker.backend.named_weights())
    assert engine.weight_version == 1
    assert all(torch.equal(p, trained[name]) for name, p in engine.model.named_parameters())
    assert engine.generate([[5, 6, 7]], params, [1])[0].log_probs != before.log_probs
    assert all(v.device.type == "cpu" for s in worker.backend.optimizer.state.values() for v in s.values())


@pytest.mark.parametrize("given", [False, True], ids=["recomputed", "given"])
def test_a_rollouts_later_steps_are_scored_once_before_any_update(write_config, tiny_model_dir, monkeypatch, given):
    """Of a rollout's two steps, the first takes its old log-probs from its own forward and the second's
    samples are scored in one pass before the first update; old log-probs given (the engine's, say) are
    used as they are."""
    from rl.train.worker import TrainWorker

    cfg = load_config(write_config(MINIMAL), ["optimizer.lr=1e-2"])
    worker = TrainWorker(cfg, rank=0, world_size=1, master_addr="", master_port=0, init_from=tiny_model_dir,
                         total_steps=10, threads=1, host_engine=False)
    samples = make_samples(8)
    steps = [samples[:4], samples[4:]]
    before = worker.backend.compute_log_probs(steps[1])
    calls, original = [], worker.backend.train_step

    def scoring(batch, **kwargs):
        calls.append(("score", len(batch)))
        return before

    def step(batch, **kwargs):
        calls.append(("step", kwargs["old_log_probs"]))
        return original(batch, **kwargs)

    monkeypatch.setattr(worker.backend, "compute_log_probs", scoring)
    monkeypatch.setattr(worker.backend, "train_step", step)
    old = [[s.rollout_log_probs for s in batch] for batch in steps] if given else [None, None]
    sizes = [(4, sum(sum(s.loss_mask) for s in batch)) for batch in steps]
    metrics = worker.train(steps, sizes, old)
    assert len(metrics) == 2 and all(m["lr"] == 1e-2 for m in metrics)
    if given:
        assert calls == [("step", old[0]), ("step", old[1])]
    else:
        assert calls == [("score", 4), ("step", None), ("step", before)]


@pytest.mark.gpu
def test_optimizer_offload_moves_its_state_to_the_host_and_back(write_config, tiny_model_dir):
    cfg = load_config(write_config(MINIMAL), ["optimizer.lr=1e-2"])
    backend = TorchBackend(cfg, init_from=tiny_model_dir, total_steps=10, device="cuda")
    samples = make_samples()
    sizes = {"num_samples": len(samples), "num_tokens": sum(sum(s.loss_mask) for s in samples)}
    backend.train_step(samples, **sizes)
    on_gpu = torch.cuda.memory_allocated()
    backend.offload(weights=True)
    assert torch.cuda.memory_allocated() < on_gpu
    assert all(v.device.type == "cpu" for s in backend.optimizer.state.values() for v in s.values())
    backend.reload()
    assert all(v.device.type == "cuda" for s in backend.optimizer.state.values() for k, v in s.items() if k != "step")
    backend.train_step(samples, **sizes)


def test_balanced_shares_even_out_tokens_across_ranks():
    from rl.batch import balanced_shares

    lengths = [50, 48, 47, 3, 4, 5, 6, 2, 9]
    shares = balanced_shares(lengths, 3)
    assert sorted(i for s in shares for i in s) == list(range(9))
    assert [len(s) for s in shares] == [len(r) for r in split_for_ranks(9, 3)]
    tokens = [sum(lengths[i] for i in s) for s in shares]
    contiguous = [sum(lengths[i] for i in r) for r in split_for_ranks(9, 3)]
    assert max(tokens) - min(tokens) <= 10 < max(contiguous) - min(contiguous)


def test_passes_without_backward_take_their_own_token_budget(write_config):
    """`log_probs_max_tokens_per_gpu` (slime's) sizes the micro-batches of scoring passes; training keeps
    `max_tokens_per_gpu`."""
    from rl.train.torch_backend import rank_micro_batches

    samples = make_samples(n=8)
    cfg = load_config(write_config(MINIMAL), ["perf.use_dynamic_batch_size=true", "perf.max_tokens_per_gpu=16",
                                              "perf.log_probs_max_tokens_per_gpu=1000"])
    assert len(rank_micro_batches(samples, cfg.perf, None, forward_only=True)) == 1
    assert len(rank_micro_batches(samples, cfg.perf, None)) > 1
    cfg.perf.log_probs_max_tokens_per_gpu = None
    assert rank_micro_batches(samples, cfg.perf, None, forward_only=True) == rank_micro_batches(samples, cfg.perf, None)
