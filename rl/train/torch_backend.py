"""The training backend of the CPU path (and single-node GPUs): a `transformers` model in plain PyTorch,
data-parallel with DDP, or sharded with FSDP2 (`fully_shard`, `perf.torch_data_parallel = "fsdp2"`), when
several workers share the work (`rl/train/backend.py` is the interface).

Micro-batches are formed by token budget (`max_tokens_per_gpu`) or by count. With a variable-length
attention kernel each micro-batch runs as one packed row — sequences concatenated without padding,
positions restarting at each sequence (transformers derives the block-diagonal mask from the position
ids), Megatron's THD layout; without one, as a right-padded batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from rl.batch import TrainSample, lay_out, micro_batches, pad_rows
from rl.checkpoint import BackgroundWriter, load_model_state, save_model_state
from rl.losses import entropy_from_logits
from rl.train.objective import policy_objective
from rl.train.schedule import lr_at

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from rl.config import PerfConfig, RLConfig


log = logging.getLogger(__name__)

PADDING = TrainSample(tokens=[0, 0], response_length=1, loss_mask=[0], reward=0.0, rollout_log_probs=[0.0],
                      advantages=[0.0])
"""The one sample of a padding micro-batch: its mask is 0, so it adds nothing to the loss or the metrics."""


def _causal_lm(init_from: str | Path) -> PreTrainedModel:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(init_from, dtype=torch.float32)


def _full(t: Tensor) -> Tensor:
    """A sharded tensor (FSDP's DTensor) gathered whole; any other as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def rank_micro_batches(samples: list[TrainSample], perf: PerfConfig, device: torch.device | None, *,
                       forward_only: bool = False) -> list[list[int]]:
    """This rank's micro-batches (by token budget or count), padded with empty ones to the count of the rank
    that has the most, agreed over the default process group on `device` (None: alone, nothing to agree).
    A pass without backward keeps no activations, so it may take `log_probs_max_tokens_per_gpu` (slime's)."""
    max_tokens = None
    if perf.use_dynamic_batch_size:
        max_tokens = (forward_only and perf.log_probs_max_tokens_per_gpu) or perf.max_tokens_per_gpu
    batches = micro_batches([len(s.tokens) for s in samples], max_tokens, perf.micro_batch_size)
    if device is not None:
        count = torch.tensor(len(batches), device=device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        batches += [[] for _ in range(int(count) - len(batches))]
    return batches


def finite_on_every_rank(finite: bool, device: torch.device) -> bool:
    """Whether `finite` (this rank's loss and gradients are) holds on every rank of the default process group:
    ranks take or skip an optimizer step together, or their weights would part."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return finite
    flag = torch.tensor(float(finite), device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag)


def move_optimizer_state(optimizer: torch.optim.Optimizer, to: torch.device, home: torch.device) -> None:
    """The optimizer's state tensors moved to `to`; leaving a GPU (`home`) hands the memory back at once."""
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, Tensor) and key != "step":  # Adam keeps its step count on the host anyway
                state[key] = value.to(to, non_blocking=True)
    if to.type == "cpu" and home.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class TorchBackend:
    def __init__(self, cfg: RLConfig, *, init_from: str | Path, total_steps: int, device: str = "cpu"):
        self.cfg, self.device, self.total_steps = cfg, torch.device(device), total_steps
        self.base_lr = self._base_lr()
        # transformers wraps Module.to with functools.wraps, whose type leaves `self` unbound: mypy takes the
        # device for the model.
        self.model: PreTrainedModel = self._load(init_from).to(self.device)  # type: ignore[arg-type]
        self.model.config.use_cache = False
        self.ref: PreTrainedModel | None = None
        if self._needs_reference():
            self.ref = _causal_lm(init_from).to(self.device).eval()  # type: ignore[arg-type]
            self.ref.requires_grad_(False)
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.dp_rank, self.dp_size, self.reports = (dist.get_rank() if dist.is_initialized() else 0,
                                                    self.world_size, True)
        self.sharded = self.world_size > 1 and cfg.perf.torch_data_parallel == "fsdp2"
        self.module: torch.nn.Module = self.model
        if self.sharded:
            # One shard group per decoder layer (the classes a transformers model names as never to be split),
            # gathered just in time; the rest (embeddings, the tied head, the final norm) in the root's.
            blocks = set(self.model._no_split_modules or ())
            for module in self.model.modules():
                if type(module).__name__ in blocks:
                    fully_shard(module)
            fully_shard(self.model)
        elif self.world_size > 1:
            self.module = DistributedDataParallel(self.model)
        o = cfg.optimizer
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer: torch.optim.Optimizer
        if o.optimizer == "adam":
            self.optimizer = torch.optim.AdamW(params, lr=self.base_lr, betas=(o.adam_beta1, o.adam_beta2),
                                               eps=o.adam_eps, weight_decay=o.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(params, lr=self.base_lr, weight_decay=o.weight_decay)
        self.step = 0
        """Optimizer steps taken."""
        self.packed = self.model.config._attn_implementation.startswith("flash")
        autocast_ok = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        self.autocast = (
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cfg.perf.bf16 and autocast_ok else nullcontext
        )

    # --- forward ---------------------------------------------------------------------------------------

    def _load(self, init_from: str | Path) -> PreTrainedModel:
        return _causal_lm(init_from)

    def _base_lr(self) -> float:
        return self.cfg.optimizer.lr

    def _needs_reference(self) -> bool:
        return bool(self.cfg.grpo.use_kl_loss or self.cfg.grpo.kl_coef)

    def _forward(self, model: torch.nn.Module, samples: list[TrainSample], with_entropy: bool
                 ) -> tuple[Tensor, Tensor | None]:
        """Response-token log-probs (and entropies) of the samples, as [b, R] (R the longest response)."""
        logits, target, valid = self._at_responses(model, samples)
        scaled = logits / self.cfg.rollout.rollout_temperature
        log_probs = scaled.log_softmax(-1).gather(-1, target[..., None])[..., 0]
        entropy = entropy_from_logits(scaled) * valid if with_entropy else None
        return log_probs * valid, entropy

    def _at_responses(self, model: torch.nn.Module, samples: list[TrainSample]) -> tuple[Tensor, Tensor, Tensor]:
        """The model's outputs where it predicts each response token, [b, R, outputs] (R the longest
        response); the response tokens, [b, R]; and which of those entries are real, [b, R].

        Packed layout (one row, positions restarting per sequence) where a variable-length attention
        kernel makes it pay (flash attention); otherwise a right-padded batch, since dense attention over
        a packed row costs the square of the whole micro-batch's length.
        """
        x = lay_out(samples, packed=self.packed)
        with self.autocast():
            out = model(input_ids=x.input_ids.to(self.device), position_ids=x.position_ids.to(self.device)).logits
        picked = out.reshape(-1, out.shape[-1])[x.at.flatten().to(self.device)].float().view(*x.at.shape, -1)
        return picked, x.target.to(self.device), x.valid.to(self.device)

    def _micro_batches(self, samples: list[TrainSample], *, forward_only: bool = False) -> list[list[int]]:
        """This rank's micro-batches, padded with empty ones to the count of the rank that has the most: under
        FSDP every forward gathers parameters from all ranks, under DDP the last backward reduces gradients,
        so every rank must run as many (a rank may even have no sample at all)."""
        return rank_micro_batches(samples, self.cfg.perf, self.device if self.world_size > 1 else None,
                                  forward_only=forward_only)

    @torch.no_grad()
    def compute_log_probs(self, samples: list[TrainSample], *, ref: bool = False) -> list[list[float]]:
        """Response log-probs of each sample under the policy (or the reference model)."""
        model = self.ref if ref else self.model
        if model is None:
            raise ValueError("no reference model: set grpo.use_kl_loss or grpo.kl_coef")
        return self._per_response_token(lambda batch: self._forward(model, batch, with_entropy=False)[0], samples)

    def _per_response_token(self, rows: Callable[[list[TrainSample]], Tensor],
                            samples: list[TrainSample]) -> list[list[float]]:
        """`rows(micro_batch)` ([b, R], no gradient) over this rank's micro-batches, cut to each sample's
        response."""
        out: list[list[float]] = [[] for _ in samples]
        for batch in self._micro_batches(samples, forward_only=True):
            for row, i in zip(rows([samples[i] for i in batch] or [PADDING]).tolist(), batch):
                out[i] = row[: samples[i].response_length]
        return out

    # --- update ----------------------------------------------------------------------------------------

    def train_step(self, samples: list[TrainSample], *, num_samples: int, num_tokens: int,
                   old_log_probs: list[list[float]] | None = None,
                   before_update: Callable[[], None] = lambda: None) -> dict[str, float]:
        """One optimizer step on this rank's share of a global batch of `num_samples` samples holding
        `num_tokens` loss tokens. `old_log_probs` are needed when the policy moved since the rollout
        (several steps per rollout); for the first step they equal the current ones. `before_update()` right
        before the optimizer changes anything saved (`TrainingBackend.train_step`)."""
        o = self.cfg.optimizer
        lr = lr_at(self.step, lr=self.base_lr, min_lr=o.min_lr, style=o.lr_decay_style, warmup=o.lr_warmup_iters,
                   decay_steps=o.lr_decay_iters or self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        metrics = self.accumulate_gradients(samples, num_samples=num_samples, num_tokens=num_tokens,
                                            old_log_probs=old_log_probs)
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = float(_full(torch.nn.utils.clip_grad_norm_(params, o.clip_grad if o.clip_grad > 0 else
                                                               float("inf"))))
        # A non-finite step would make every weight NaN for good: it is skipped (the schedule stays), counted,
        # and the driver stops the run after `optimizer.max_consecutive_nonfinite_steps` in a row.
        taken = finite_on_every_rank(math.isfinite(grad_norm) and all(map(math.isfinite, metrics.values())),
                                     self.device)
        if taken:
            before_update()
            self.optimizer.step()
            self.step += 1
        else:
            log.warning("optimizer step %d skipped: non-finite loss or gradient norm", self.step)
        return {**metrics, "grad_norm": grad_norm, "lr": lr, "skipped_steps": float(not taken)}

    def accumulate_gradients(self, samples: list[TrainSample], *, num_samples: int, num_tokens: int,
                             old_log_probs: list[list[float]] | None = None) -> dict[str, float]:
        """Backward of the loss over all micro-batches of `samples`; returns the summed metrics."""
        self.model.train()
        totals: dict[str, float] = {}
        batches = self._micro_batches(samples)
        for k, batch in enumerate(batches):
            sync = k == len(batches) - 1 or self.world_size == 1
            if isinstance(self.module, FSDPModule):
                self.module.set_requires_gradient_sync(sync)
            old = None if old_log_probs is None or not batch else [old_log_probs[i] for i in batch]
            # DDP reduces gradients in the last micro-batch's backward only.
            with (self.module.no_sync() if isinstance(self.module, DistributedDataParallel) and not sync
                  else nullcontext()):
                loss, metrics = self._micro_batch_loss([samples[i] for i in batch] or [PADDING], old,
                                                       num_samples, num_tokens)
                # DDP and FSDP average gradients over ranks; the losses already use global denominators.
                (loss * self.world_size).backward()
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + float(value)
        return totals

    def _micro_batch_loss(self, samples: list[TrainSample], old_log_probs: list[list[float]] | None,
                          num_samples: int, num_tokens: int) -> tuple[Tensor, dict[str, Tensor]]:
        lp, entropy = self._forward(self.module, samples, with_entropy=True)
        assert entropy is not None  # asked for
        width = lp.shape[1]

        def rows(values: list[Any]) -> Tensor:
            return pad_rows(values, width).to(self.device)

        ref = None
        if self.ref is not None:
            with torch.no_grad():
                ref = self._forward(self.ref, samples, with_entropy=False)[0]
        old = lp.detach() if old_log_probs is None else rows(old_log_probs)
        return policy_objective(
            self.cfg.grpo,
            log_probs=lp,
            entropy=entropy,
            old_log_probs=old,
            advantages=rows([s.advantages for s in samples]),
            mask=rows([s.loss_mask for s in samples]),
            ref_log_probs=ref,
            rollout_log_probs=rows([s.rollout_log_probs for s in samples]),
            num_samples=num_samples,
            num_tokens=num_tokens,
        )

    # --- weights and state -----------------------------------------------------------------------------

    def named_weights(self) -> Iterator[tuple[str, Tensor]]:
        """The policy's parameters by Hugging Face name, for the rollout engines; sharded ones are gathered,
        so every rank must iterate (the engines take rank 0's)."""
        for name, p in self.model.named_parameters():
            yield name, _full(p.detach())

    def offload(self, *, weights: bool) -> None:
        """The optimizer's state; the weights stay (the torch backend runs where one device holds all)."""
        move_optimizer_state(self.optimizer, torch.device("cpu"), self.device)

    def reload(self) -> None:
        move_optimizer_state(self.optimizer, self.device, self.device)

    def save(self, folder: Path, writer: BackgroundWriter | None = None) -> None:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        save_model_state({"model": model_state, "optim": optim_state, "step": self.step}, Path(folder), writer)

    def load(self, folder: Path) -> None:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state: dict[str, Any] = {"model": model_state, "optim": optim_state, "step": self.step}
        load_model_state(state, Path(folder))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        self.step = int(state["step"])
