"""Stand-ins that let megatron-core 0.16 run its training path on a host without CUDA, for the tests only.

Each replaces one megatron-core call that demands CUDA even where the work itself is device-neutral; rlhpc's
code and Megatron's modules otherwise run as they are:

1. `tensor_parallel.model_parallel_cuda_manual_seed` seeds `torch.cuda`'s generators: skipped (torch's CPU
   generator is seeded by the worker).
2. `CudaRNGStatesTracker.fork` switches to a CUDA generator around attention dropout: a no-op context
   (dropout is 0 in every rlhpc model, so the fork changes nothing on a GPU either).
3. `torch.cuda.current_device()` (rotary embedding's `inv_freq`, the optimizer's scalars): "cpu".
4. Factory calls with `device="cuda"` (the causal mask, the optimizer's loss scale and overflow buffers, the
   gradient norm's zero): made on the host, through a `TorchFunctionMode`.
5. `clip_grad_by_total_norm_fp32` asserts `param.grad.type() == 'torch.cuda.FloatTensor'`: under the same mode a
   host fp32 tensor answers that name (the clipping itself is device-neutral).
6. `Tensor.cuda()` on the tied embedding before pipeline stages all-reduce it
   (`LanguageModule.setup_embeddings_and_output_layer`): the tensor stays where it is.
7. `torch.cuda.synchronize()` before the torch_dist writer copies tensors (`filesystem_async.preload_tensors`):
   nothing to wait for on the host.
8. `Tensor.pin_memory()` where the distributed optimizer's parameter buffers move to the host
   (`_ParamAndGradBuffer.offload_to_cpu`): page-locking is for CUDA's copies and needs an accelerator; a plain
   copy instead, as pinning makes one (the buffer's own storage is freed next).
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode


def _is_cuda(device) -> bool:
    return device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda") or (
        isinstance(device, str) and device.startswith("cuda:"))


class _CudaOnHost(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.pin_memory:
            return args[0].clone()
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        out = func(*args, **kwargs)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and out == "torch.FloatTensor":
            return "torch.cuda.FloatTensor"
        return out


def install() -> None:
    """Put the stand-ins in place for the rest of this process (a test's own spawned rank)."""
    from megatron.core import tensor_parallel
    from megatron.core.tensor_parallel import random as megatron_random

    tensor_parallel.model_parallel_cuda_manual_seed = lambda *args, **kwargs: None
    megatron_random.model_parallel_cuda_manual_seed = tensor_parallel.model_parallel_cuda_manual_seed
    megatron_random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    _CudaOnHost().__enter__()
