"""The Megatron-core training backend (`perf.train_backend = "megatron"`): `rl/train/backend.py`'s interface
over a GPTModel with tensor, pipeline and expert parallelism, Megatron's DDP and (distributed) optimizer.

Micro-batches are packed into one THD row (`PackedSeqParams`, positions restarting per sequence) when
Transformer Engine is there; otherwise right-padded rows under the causal mask, where padding after a sequence
changes none of its logits. Log-probs and entropy are computed on the vocabulary-parallel logits without
gathering the vocabulary. The losses are `rl/train/objective.py`'s, as in the torch backend.

With context parallelism each rank holds two of every sequence's 2·CP chunks (`rl/megatron/context_parallel.py`);
its log-probs are summed over the context-parallel ranks into whole rows, so sequence-level objectives (GSPO)
see whole sequences. Not yet: virtual pipeline stages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from torch import Tensor

from rl.batch import MicroBatch, TrainSample, lay_out, pad_rows
from rl.checkpoint import Synchronous
from rl.export import MEGATRON_DIR
from rl.megatron.convert import HF_CONFIG, load_megatron_state, torch_dist_config, write_torch_dist_config
from rl.megatron.hf_tensors import hf_tensors
from rl.megatron.layout import hf_of_parameter, megatron_sources
from rl.megatron.model import build_model, check_layer_spec, has_transformer_engine
from rl.megatron.shards import renumber, shard, split_dim, unshard
from rl.megatron.torch_dist_save import TorchDistStrategy
from rl.train.objective import policy_objective
from rl.train.schedule import lr_at
from rl.train.torch_backend import PADDING, finite_on_every_rank, rank_micro_batches

if TYPE_CHECKING:
    from rl.checkpoint import BackgroundWriter
    from rl.config import RLConfig

log = logging.getLogger(__name__)
STEP_FILE = "megatron_step.json"
OPTIMIZER_LAYOUT = {"distrib_optim_sharding_type": "dp_reshardable"}
"""How the distributed optimizer (`perf.use_distributed_optimizer`) lays out its state in a checkpoint: each
rank's own buffers, saved and loaded without gathering, reshardable over data parallelism only (Megatron-LM's
default). megatron-core's own default, the deprecated `fully_sharded_model_space`, fails to save in 0.16
("ShardedTensor.flattened_range is not supported"); other optimizers ignore it."""


def vocab_parallel_log_probs(logits: Tensor, target: Tensor) -> Tensor:
    """log softmax(logits)[target] with the vocabulary split over the tensor-parallel ranks:
    −cross_entropy, computed by Megatron across the ranks' shards. Megatron's cross-entropy overwrites its
    float32 input (max subtracted, exponentiated in place), so it gets a copy: the caller's logits stay whole for
    the entropy."""
    return -tensor_parallel.vocab_parallel_cross_entropy(logits.to(torch.float32, copy=True), target)


def vocab_parallel_entropy(logits: Tensor) -> Tensor:
    """H = log Z + m − Σ_v p_v z_v, with z the logits, m = max_v z_v, Z = Σ_v exp(z_v − m), p = softmax(z); each
    max and sum over the whole vocabulary (all-reduced over the tensor-parallel ranks, gradients kept)."""
    z = logits.float()
    m = z.max(-1, keepdim=True).values.detach()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=parallel_state.get_tensor_model_parallel_group())
    e = (z - m).exp()
    total = tensor_parallel.reduce_from_tensor_model_parallel_region(e.sum(-1, keepdim=True))
    p = e / total
    weighted = tensor_parallel.reduce_from_tensor_model_parallel_region((p * z).sum(-1, keepdim=True))
    return (total.log() + m - weighted)[..., 0]


def apply_schedule(param_groups: list[dict[str, Any]], *, lr: float, weight_decay: float) -> None:
    """This step's learning rate and weight decay on Megatron's parameter groups, scaled by each group's
    `lr_mult` and `wd_mult` as Megatron's `OptimizerParamScheduler` does: its groups give norms, biases and
    other 1-D parameters `wd_mult = 0`, which only the schedule applies (the groups start with the full decay)."""
    for group in param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)


def model_inputs(x: MicroBatch, device: torch.device) -> dict[str, Any]:
    """GPTModel's arguments for a laid-out micro-batch: a packed row goes with its THD sequence bounds."""
    inputs: dict[str, Any] = {"input_ids": x.input_ids.to(device), "position_ids": x.position_ids.to(device),
                              "attention_mask": None}
    if x.cu_seqlens is not None:
        cu = x.cu_seqlens.to(device)
        inputs["packed_seq_params"] = PackedSeqParams(
            qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu, cu_seqlens_kv_padded=cu,
            max_seqlen_q=x.max_seqlen, max_seqlen_kv=x.max_seqlen)
    return inputs


class MegatronBackend:
    def __init__(self, cfg: RLConfig, *, init_from: str | Path, total_steps: int, device: str = "cuda"):
        from transformers import AutoConfig

        p = cfg.perf
        self.cfg, self.total_steps, self.device = cfg, total_steps, torch.device(device)
        self.te = has_transformer_engine()
        check_layer_spec(p, te=self.te)
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=p.tensor_model_parallel_size,
            pipeline_model_parallel_size=p.pipeline_model_parallel_size,
            context_parallel_size=p.context_parallel_size,
            expert_model_parallel_size=p.expert_model_parallel_size,
            expert_tensor_parallel_size=p.expert_tensor_parallel_size)
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.run.seed)
        self.hf_config = AutoConfig.from_pretrained(init_from)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.tp_rank = parallel_state.get_tensor_model_parallel_rank()
        self.tp_size = parallel_state.get_tensor_model_parallel_world_size()
        self.cp_rank = parallel_state.get_context_parallel_rank()
        self.cp_size = parallel_state.get_context_parallel_world_size()
        self.first_stage = parallel_state.is_pipeline_first_stage()
        self.last_stage = parallel_state.is_pipeline_last_stage()
        self.reports = self.last_stage and self.tp_rank == 0 and self.cp_rank == 0
        """This rank's results stand for its data-parallel rank (the driver reads only these)."""

        self.model = build_model(self.hf_config, p, te=self.te, pre_process=self.first_stage,
                                 post_process=self.last_stage).to(self.device)
        self.layer_offset = self.model.decoder.layers[0].layer_number - 1 if len(self.model.decoder.layers) else 0
        self._load_weights(cfg, Path(init_from))
        self.ref = None
        # Colocated, the engines generate in the memory training leaves: the reference model waits on the host
        # and comes to the device only for its forward.
        self.ref_home = torch.device("cpu") if p.colocate else self.device
        if cfg.grpo.use_kl_loss or cfg.grpo.kl_coef:
            self.ref = build_model(self.hf_config, p, te=self.te, pre_process=self.first_stage,
                                   post_process=self.last_stage).eval()
            self.ref.load_state_dict(self.model.state_dict())
            self.ref.requires_grad_(False)
            self.ref.to(self.ref_home)
        self.ddp = DistributedDataParallel(
            config=self.model.config, module=self.model,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                                     use_distributed_optimizer=p.use_distributed_optimizer))
        o = cfg.optimizer
        self.optimizer = get_megatron_optimizer(MegatronOptimizerConfig(
            optimizer=o.optimizer, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad, bf16=self.model.config.bf16,
            params_dtype=self.model.config.params_dtype, use_distributed_optimizer=p.use_distributed_optimizer),
            [self.ddp])
        # What Megatron's schedule calls around the micro-batches: gradient accumulation without reduction,
        # then the data-parallel reduction (and the tied embedding's across pipeline stages) at the end.
        self.model.config.no_sync_func = self.ddp.no_sync
        self.model.config.finalize_model_grads_func = finalize_model_grads
        self.model.config.grad_scale_func = self.optimizer.scale_loss
        self.step = 0

    # --- weights in ------------------------------------------------------------------------------------

    def _load_weights(self, cfg: RLConfig, init_from: Path) -> None:
        """From a torch_dist checkpoint (`ckpt.ref_load` written by `rlhpc convert hf-to-megatron`), which
        loads under any layout; else straight from the Hugging Face folder, each rank cutting its shards of its
        own stage's parameters, one parameter at a time."""
        ref = cfg.ckpt.ref_load
        if ref is not None and (Path(ref) / HF_CONFIG).exists():
            _, te = torch_dist_config(Path(ref))
            if te != self.te:
                raise ValueError(f"ckpt.ref_load: {ref} was converted {'with' if te else 'without'} Transformer "
                                 f"Engine's layer spec, and this node has{'' if self.te else ' no'} Transformer Engine")
            loaded = dist_checkpointing.load({"model": self.model.sharded_state_dict()}, str(ref))
            load_megatron_state(self.model, loaded["model"])
            return
        sources = megatron_sources(self.hf_config, te=self.te)
        with hf_tensors(init_from) as read, torch.no_grad():
            for name, param in self.model.named_parameters():
                keys, make = sources[renumber(name, self.layer_offset)]
                param.copy_(shard(make(*map(read, keys)), name, split_dim(param), self.tp_rank, self.tp_size))

    # --- forward ---------------------------------------------------------------------------------------

    def _whole_rows(self, rows: Tensor) -> Tensor:
        """[b, R] rows of which this rank filled the entries it holds (zeros elsewhere), summed over the
        context-parallel ranks into whole rows; gradients flow back to each rank's own entries."""
        if self.cp_size == 1:
            return rows
        from torch.distributed.nn.functional import all_reduce

        return all_reduce(rows, group=parallel_state.get_context_parallel_group())

    def _run(self, model: torch.nn.Module, samples: list[TrainSample], loss_of, *, forward_only: bool) -> None:
        """Megatron's schedule (pipelined when the model is) over this rank's micro-batches; on the last stage
        `loss_of(indices, batch, log_probs, entropy)` gets each micro-batch (the indices of its samples in
        `samples`, empty for padding) and returns (loss, metrics)."""
        batches = rank_micro_batches(samples, self.cfg.perf, self.device, forward_only=forward_only)
        feed = iter([[samples[i] for i in b] or [PADDING] for b in batches])
        temperature = self.cfg.rollout.rollout_temperature
        count = iter(range(len(batches)))

        def forward_step(data: Iterator[list[TrainSample]], module: torch.nn.Module):
            batch = next(data)
            k = next(count)
            x = lay_out(batch, packed=self.te, cp_size=self.cp_size, cp_rank=self.cp_rank,
                        multiple=self.tp_size if self.model.config.sequence_parallel else 1)
            at, target, held, valid = (t.to(self.device) for t in (x.at, x.target, x.held, x.valid))
            out = module(**model_inputs(x, self.device))

            def loss_func(logits: Tensor):
                flat = logits.reshape(-1, logits.shape[-1])[at.flatten()].view(*at.shape, -1) / temperature
                lp = self._whole_rows(vocab_parallel_log_probs(flat, target) * held) * valid
                entropy = self._whole_rows(vocab_parallel_entropy(flat) * held) * valid
                loss, metrics = loss_of(batches[k], batch, lp, entropy)
                # The objective already uses global denominators. The schedule multiplies by the context-parallel
                # size and divides by the micro-batch count; DDP averages over data × context-parallel ranks,
                # and every context-parallel rank computes the same loss over whole rows.
                return loss * len(batches) * self.dp_size / self.cp_size, metrics

            return out, loss_func

        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=feed, model=[model], num_microbatches=len(batches),
            seq_length=max((len(s.tokens) for s in samples), default=2), micro_batch_size=1,
            forward_only=forward_only)

    @torch.no_grad()
    def compute_log_probs(self, samples: list[TrainSample], *, ref: bool = False) -> list[list[float]]:
        model = self.ref if ref else self.model
        if model is None:
            raise ValueError("no reference model: set grpo.use_kl_loss or grpo.kl_coef")
        model.eval()
        out: list[list[float]] = [[] for _ in samples]

        def keep(indices: list[int], batch: list[TrainSample], lp: Tensor, entropy: Tensor):
            for row, i in zip(lp.tolist(), indices):
                out[i] = row[: samples[i].response_length]
            return lp.sum() * 0, {}

        home = self.ref_home if ref else self.device
        model.to(self.device)
        self._run(model, samples, keep, forward_only=True)
        if home != self.device:
            model.to(home)
            torch.cuda.empty_cache()
        return out

    # --- update ----------------------------------------------------------------------------------------

    def train_step(self, samples: list[TrainSample], *, num_samples: int, num_tokens: int,
                   old_log_probs: list[list[float]] | None = None,
                   before_update: Callable[[], None] = lambda: None) -> dict[str, float]:
        o = self.cfg.optimizer
        lr = lr_at(self.step, lr=o.lr, min_lr=o.min_lr, style=o.lr_decay_style, warmup=o.lr_warmup_iters,
                   decay_steps=o.lr_decay_iters or self.total_steps)
        apply_schedule(self.optimizer.param_groups, lr=lr, weight_decay=o.weight_decay)
        self.model.train()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        totals: dict[str, float] = {}
        refs = self.compute_log_probs(samples, ref=True) if self.ref is not None else None

        def objective(indices: list[int], batch: list[TrainSample], lp: Tensor, entropy: Tensor):
            width = lp.shape[1]

            def rows(values: list[Any]) -> Tensor:
                return pad_rows(values, width).to(self.device)

            loss, metrics = policy_objective(
                self.cfg.grpo, log_probs=lp, entropy=entropy,
                old_log_probs=lp.detach() if old_log_probs is None or not indices else rows(
                    [old_log_probs[i] for i in indices]),
                advantages=rows([s.advantages for s in batch]), mask=rows([s.loss_mask for s in batch]),
                ref_log_probs=None if refs is None or not indices else rows([refs[i] for i in indices]),
                rollout_log_probs=rows([s.rollout_log_probs for s in batch]),
                num_samples=num_samples, num_tokens=num_tokens)
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + float(value)
            return loss, metrics

        self._run(self.ddp, samples, objective, forward_only=False)
        # Megatron skips a step only where a loss scaler finds an overflow (fp16): without one (bf16, fp32) a
        # NaN gradient would be applied. Any NaN or Inf makes a buffer's sum non-finite, and a sum allocates
        # nothing the size of the model.
        grads_finite = all(bool(b.grad_data.sum().isfinite()) for b in self._buffers())
        ok = finite_on_every_rank(grads_finite and all(map(math.isfinite, totals.values())), self.device)
        grad_norm = math.nan
        if ok:
            before_update()
            ok, norm, _ = self.optimizer.step()
            grad_norm = float(norm or 0.0)
        if ok:
            self.step += 1
        else:
            log.warning("optimizer step %d skipped: non-finite loss or gradient norm", self.step)
        return {**totals, "grad_norm": grad_norm, "lr": lr, "skipped_steps": float(not ok)}

    # --- weights out -----------------------------------------------------------------------------------

    def named_weights(self) -> Iterator[tuple[str, Tensor]]:
        """The whole policy by Hugging Face name on every rank, a parameter at a time: tensor-parallel shards
        all-gathered within each stage, and each pipeline stage's parameters broadcast from it to the other stages
        of its pipeline one by one as they are reached (only their names, shapes and dtypes go ahead, as
        objects), so that no rank ever holds more than a parameter beyond its own stage. Whole on every rank
        because a colocated engine takes the weights from its own GPUs' ranks; every rank must take part."""
        pp_size = parallel_state.get_pipeline_model_parallel_world_size()
        if pp_size == 1:
            for name, whole in self._gathered():
                yield from hf_of_parameter(name, whole, self.hf_config, te=self.te)
            return
        pp_group = parallel_state.get_pipeline_model_parallel_group()
        stages: list[Any] = [None] * pp_size
        mine = [(renumber(n, self.layer_offset), p.dtype, self._whole_shape(p))
                for n, p in self.model.named_parameters()]
        dist.all_gather_object(stages, mine, group=pp_group)
        my_stage = parallel_state.get_pipeline_model_parallel_rank()
        for stage, (src, params) in enumerate(zip(dist.get_process_group_ranks(pp_group), stages)):
            own = self._gathered() if stage == my_stage else None
            for name, dtype, shape in params:
                if own is not None:
                    whole = next(own)[1].contiguous()
                else:
                    whole = torch.empty(shape, dtype=dtype, device=self.device)
                dist.broadcast(whole, src=src, group=pp_group)
                yield from hf_of_parameter(name, whole, self.hf_config, te=self.te)

    def _whole_shape(self, param: Tensor) -> tuple[int, ...]:
        dim, shape = split_dim(param), list(param.shape)
        if dim is not None:
            shape[dim] *= self.tp_size
        return tuple(shape)

    def _gathered(self) -> Iterator[tuple[str, Tensor]]:
        """This stage's parameters, each whole (tensor-parallel shards all-gathered) in turn, by global name."""
        tp_group = parallel_state.get_tensor_model_parallel_group()
        for name, param in self.model.named_parameters():
            dim = split_dim(param)
            parts = [param.detach()]
            if dim is not None and self.tp_size > 1:
                parts = [torch.empty_like(param) for _ in range(self.tp_size)]
                dist.all_gather(parts, param.detach().contiguous(), group=tp_group)
            yield renumber(name, self.layer_offset), unshard(parts, name, dim)

    def _buffers(self) -> list[Any]:
        return self.ddp.buffers + self.ddp.expert_parallel_buffers

    def _move_weights(self, *, home: bool) -> None:
        """The weights to the host, or back `home` to the device: views of DDP's parameter buffers (the
        distributed optimizer's layout) move with their buffers, which keeps the views; else each parameter."""
        if any(b.param_data is not None for b in self._buffers()):
            for b in self._buffers():
                (b.reload_from_cpu if home else b.offload_to_cpu)(move_params=True, move_grads=False)
        else:
            for p in self.model.parameters():
                p.data = p.data.to(self.device if home else "cpu")

    def offload(self, *, weights: bool) -> None:
        """Training's memory, as slime's torch_memory_saver pause frees it, through megatron-core's own offload
        calls: the optimizer's state and fp32 main parameters, the gradient buffers (storage freed, views kept),
        and with `weights` the weights."""
        cuda = self.device.type == "cuda"
        if cuda:  # Megatron's optimizer offload brings its tensors back with .cuda()
            self.optimizer.offload_to_cpu()
        self.ddp.offload_grad_buffers(synchronize=cuda, empty_cache=False)
        if weights:
            self._move_weights(home=False)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    def reload(self) -> None:
        self._move_weights(home=True)
        self.ddp.restore_grad_buffers(synchronize=self.device.type == "cuda")
        if self.device.type == "cuda":
            self.optimizer.restore_from_cpu()

    # --- checkpoints (torch_dist: loadable under another parallel layout) ------------------------------

    def _sharded_state(self, *, is_loading: bool = False) -> dict[str, Any]:
        model_state = self.model.sharded_state_dict()
        # Loading needs the optimizer's state laid out before it exists: with is_loading Megatron builds Adam's
        # moments and step count as placeholders to read into (a fresh process has none yet, and without them
        # they are silently left out).
        return {"model": model_state,
                "optimizer": self.optimizer.sharded_state_dict(model_state, is_loading=is_loading,
                                                               metadata=OPTIMIZER_LAYOUT)}

    @contextlib.contextmanager
    def _offloaded_weights_readable(self) -> Iterator[bool]:
        """While the weights are offloaded with the distributed optimizer (colocated: the loop saves after the
        sync has sent them), each parameter is a view of a DDP buffer whose device storage megatron-core freed,
        the values in the buffer's host copy, and so are the optimizer's shards of fp32 parameters (its main
        parameters; those of bf16 ones are copies of their own, offloaded by the optimizer); a checkpoint would
        read the freed storage. Within this, they point into the host copy instead, and come back after; it
        yields whether they were offloaded."""
        moved: dict[Tensor, Tensor] = {}
        for b in self._buffers():
            if b.param_data is not None and b.param_data_cpu is not None and b.param_data.untyped_storage().size() == 0:
                for param, (start, end, _) in b.param_index_map.items():
                    moved[param] = param.data
                    param.data = b.param_data_cpu[start:end].view(param.shape)
        for opt in self._distributed_optimizers() if moved else []:
            for params, mains in zip(opt.model_fp32_groups, opt.shard_fp32_groups):
                for param, main in zip(params, mains):
                    owned = opt._get_model_param_range_map(param)["param"]
                    moved[main] = main.data
                    main.data = param.data.view(-1)[owned.start:owned.end]
        try:
            yield bool(moved)
        finally:
            for tensor, data in moved.items():
                tensor.data = data

    def _distributed_optimizers(self) -> list[Any]:
        """The distributed optimizers among the (chained) optimizers of `perf.use_distributed_optimizer`."""
        from megatron.core.optimizer import distrib_optimizer

        return [opt for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer])
                if isinstance(opt, distrib_optimizer.DistributedOptimizer)]

    def _torch_adams(self) -> list[Any]:
        """The distributed optimizers that run torch's Adam (megatron-core's where neither Transformer Engine nor
        Apex is installed), whose moments and step counts exist only once it has stepped; with Transformer
        Engine's Adam the step count lives in the parameter groups, and megatron-core handles it."""
        from megatron.core.optimizer import distrib_optimizer

        return [] if distrib_optimizer.HAVE_APEX_OR_TE else self._distributed_optimizers()

    def _give_torch_adam_state(self, step: int, *, override: bool) -> None:
        """Torch's Adam state where megatron-core 0.16's `DistributedOptimizer.state_dict` (which a save and
        building the state to load both call first) asserts one step count among the parameters' states: zero
        moments where there are none yet (as Megatron's own `init_state_fn` makes them; an optimizer that has not
        stepped has that state in effect) with the step count `step`, and with `override` that step count on every
        parameter (a load copies each parameter's step from the state as it was before, not from the checkpoint)."""
        for opt in self._torch_adams():
            empty = not opt.optimizer.state
            if empty:
                opt.init_state_fn(opt.optimizer, opt.config)
            if empty or override:
                for param_state in opt.optimizer.state.values():
                    param_state["step"] = torch.tensor(float(step))

    def save(self, folder: Path, writer: BackgroundWriter | None = None) -> None:
        """Write this rank's part of the checkpoint into `folder` in Megatron's torch_dist format, through
        `rl.checkpoint`'s writer (`rl/megatron/torch_dist_save.py`); with `writer` (`ckpt.async_save`) only begin
        writing the tensors."""
        out = Path(folder) / MEGATRON_DIR
        if dist.get_rank() == 0:
            out.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        strategy = TorchDistStrategy(writer or Synchronous())
        self._give_torch_adam_state(self.step, override=False)  # saved before any step was taken
        with self._offloaded_weights_readable() as offloaded:
            dist_checkpointing.save(self._sharded_state(), str(out), sharded_strategy=strategy)
            if writer is not None and offloaded:  # the copy must be taken while the parameters point at the host's
                writer.staged()
        if dist.get_rank() == 0:
            # What `rlhpc convert megatron-to-hf` and `rlhpc export` need to read the weights on their own.
            write_torch_dist_config(out, self.hf_config, te=self.te)
            (Path(folder) / STEP_FILE).write_text(json.dumps({"step": self.step}))

    @torch.no_grad()  # the distributed optimizer copies into its main parameters in place, leaves needing grads
    def load(self, folder: Path) -> None:
        step = int(json.loads((Path(folder) / STEP_FILE).read_text())["step"])
        self._give_torch_adam_state(step, override=True)
        state = dist_checkpointing.load(self._sharded_state(is_loading=True), str(Path(folder) / MEGATRON_DIR))
        load_megatron_state(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        for opt in self._torch_adams():
            # The load gives every parameter one shared step tensor, which Adam's multi-tensor step would
            # advance once per parameter: each gets its own.
            for param_state in opt.optimizer.state.values():
                param_state["step"] = param_state["step"].clone()
        self.step = step

