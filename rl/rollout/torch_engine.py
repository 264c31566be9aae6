"""The rollout engine of the CPU path: batched sampling with a KV cache over a Hugging Face causal LM."""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rl.rollout.engine import FinishReason, Generation, SamplingParams, in_order

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from rl.weight_sync import BucketMeta


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Mask (to −inf) the tokens outside the top-k and outside the smallest set whose probability reaches
    top_p; the most likely token always stays."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # mass before this token already enough
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class TorchEngine:
    """Generates with a `transformers` model on CPU or one GPU. Finished samples leave the batch (their
    rows are dropped from the KV cache), so they stop costing compute; they are sent back every
    `stream_interval` decode steps."""

    def __init__(self, model_path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 threads: int | None = None, stream_interval: int = 1):
        from transformers import AutoModelForCausalLM

        if threads is not None:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        # transformers wraps Module.to with functools.wraps, whose type leaves `self` unbound: mypy takes the
        # device for the model.
        self.model: PreTrainedModel = (AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
                                       .to(self.device).eval())  # type: ignore[arg-type]
        self.pad_id = self.model.config.pad_token_id or 0
        self.stream_interval = stream_interval
        self.shapes = {name: p.shape for name, p in self.model.named_parameters()}
        self.weight_version = 0
        self._generating = self._aborting = False
        self.needs_weights = False
        """True between release_memory and the update_weights that brings every parameter back."""
        self.update_group: Any = None
        """The weight-update group with the trainer's rank 0, once `init_weights_update_group` has joined it."""
        self.in_update_session = False
        """Between begin_weight_update and end_weight_update. Kept to SGLang's rules (a broadcast bucket is
        loaded only within a session, and one session at a time), so that runs on CPU hold the trainer to
        the order an SGLang server requires."""
        gc.freeze()  # as the driver does: full collections no longer walk what lives as long as the engine

    def generate(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int]) -> list[Generation]:
        return in_order(len(prompts), self.generate_stream(prompts, params, seeds))

    @torch.no_grad()
    def generate_stream(self, prompts: list[list[int]], params: SamplingParams,
                        seeds: list[int]) -> Iterator[list[tuple[int, Generation]]]:
        from transformers import DynamicCache

        if self.needs_weights:
            raise RuntimeError("the engine's memory was released: resume_memory, then update_weights first")
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if not prompts:
            return
        self._aborting = False
        self._generating = True
        try:
            yield from self._sample(prompts, params, seeds, DynamicCache())
        finally:
            self._generating = False

    def _sample(self, prompts: list[list[int]], params: SamplingParams, seeds: list[int],
                cache: Any) -> Iterator[list[tuple[int, Generation]]]:
        n, width = len(prompts), max(len(p) for p in prompts)
        if params.max_new_tokens <= 0:
            yield [(i, Generation([], [], "length", self.weight_version)) for i in range(n)]
            return
        # Left padding: every row's next token is at the same column.
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # Each sample's uniforms come from its own seed, drawn up front: inverse-CDF sampling with them
        # makes a sample independent of the batch it is generated in.
        generator = torch.Generator()
        uniforms = torch.stack([torch.rand(params.max_new_tokens, generator=generator.manual_seed(s)) for s in seeds])
        stop = torch.tensor(sorted(set(params.stop_token_ids)), dtype=torch.long)
        # Tokens and log-probs of every row, filled one column per step; a row's lists are made once it ends.
        out_ids = torch.zeros((n, params.max_new_tokens), dtype=torch.long)
        out_lps = torch.zeros((n, params.max_new_tokens), dtype=torch.float32)

        def ended(rows: list[int], step: int, reason: FinishReason) -> list[tuple[int, Generation]]:
            ids, lps = out_ids[rows, : step + 1].tolist(), out_lps[rows, : step + 1].tolist()
            return [(i, Generation(t, lp, reason, self.weight_version)) for i, t, lp in zip(rows, ids, lps)]

        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                            past_key_values=cache, use_cache=True).logits[:, -1]
        active = torch.arange(n)
        held: list[tuple[int, Generation]] = []  # ended since the last message
        for step in range(params.max_new_tokens):
            scaled = logits.float().cpu() / params.temperature
            log_probs = scaled.log_softmax(-1)
            cdf = filter_logits(scaled, params.top_k, params.top_p).softmax(-1).cumsum(-1)
            u = uniforms[active, step : step + 1] * cdf[:, -1:]
            tokens = torch.searchsorted(cdf, u, right=True)[:, 0].clamp(max=cdf.shape[-1] - 1)
            out_ids[active, step] = tokens
            out_lps[active, step] = log_probs.gather(-1, tokens[:, None])[:, 0]
            finished = torch.isin(tokens, stop)
            if finished.any():
                held += ended(active[finished].tolist(), step, "stop")
            keep = (~finished).nonzero()[:, 0]
            last = step + 1 == params.max_new_tokens
            if len(keep) == 0:
                break
            if held and (step + 1) % self.stream_interval == 0 and not last:
                yield held  # an abort asked for meanwhile ends the rest at this very step
                held = []
            if self._aborting or last:
                held += ended(active[keep].tolist(), step, "abort" if self._aborting else "length")
                break
            if len(keep) < len(active):
                cache.batch_select_indices(keep.to(self.device))
                active, tokens, mask, positions = active[keep], tokens[keep], mask[keep], positions[keep]
            mask = torch.cat([mask, mask.new_ones((len(active), 1))], dim=-1)
            positions = positions[:, -1:] + 1
            logits = self.model(input_ids=tokens[:, None].to(self.device), attention_mask=mask,
                                position_ids=positions, past_key_values=cache, use_cache=True).logits[:, -1]
        yield held

    def abort(self) -> None:
        """End the generation in progress (if any) at its next token: unfinished samples come back as they
        are, with finish reason "abort"."""
        if self._generating:
            self._aborting = True

    @torch.no_grad()
    def update_weights(self, named_tensors: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]], version: int) -> None:
        params = dict(self.model.named_parameters())
        received = set()
        pairs = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
        for name, tensor in pairs:
            if name not in params:
                raise KeyError(f"the engine's model has no parameter {name!r}")
            if self.shapes[name] != tensor.shape:
                raise ValueError(f"{name}: engine shape {tuple(self.shapes[name])}, got {tuple(tensor.shape)}")
            params[name].data = tensor.detach().to(params[name].device, params[name].dtype, copy=True)
            received.add(name)
        if self.needs_weights and received != set(params):
            missing = sorted(set(params) - received)
            raise ValueError(f"after release_memory every parameter must be sent; missing {missing[:3]}...")
        self.weight_version = version
        self.needs_weights = False

    def init_weights_update_group(self, master_address: str, master_port: int, rank: int, world_size: int,
                                  backend: str) -> None:
        from rl.weight_sync import UpdateGroup

        self.update_group = UpdateGroup(master_address, master_port, rank, world_size, backend)

    def begin_weight_update(self) -> None:
        if self.in_update_session:
            raise RuntimeError("a weight-update session is already open: end_weight_update first")
        self.in_update_session = True

    def end_weight_update(self) -> None:
        self.in_update_session = False

    def update_weights_from_distributed(self, meta: BucketMeta, version: int) -> None:
        if not self.in_update_session:
            raise RuntimeError("update_weights_from_distributed outside begin_weight_update … end_weight_update")
        self.update_weights(self.update_group.receive(meta, self.device), version)

    def health(self) -> bool:
        return True

    def release_memory(self) -> None:
        for p in self.model.parameters():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        self.needs_weights = True

    def resume_memory(self) -> None:
        """Take the memory back; the weights arrive with the next `update_weights`."""
        for name, p in self.model.named_parameters():
            if p.numel() == 0:
                p.data = torch.empty(self.shapes[name], dtype=p.dtype, device=p.device)
