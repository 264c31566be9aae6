"""Hugging Face folder ↔ Megatron torch_dist checkpoint (`rlhpc convert`), the step slime runs as
`convert_hf_to_torch_dist.py` before training.

One process builds the model on the host (tensor and pipeline parallel size 1; writing needs a GPU, see
`one_process`) and writes or reads it through `megatron.core.dist_checkpointing`. A Megatron run's own
checkpoints (`iter_NNNNNNN/megatron`) carry the same metadata and convert the same way. torch_dist stores every
tensor whole with its global shape, so the checkpoint loads under any parallel layout: each rank reads its own slices.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from rl.config import PerfConfig
from rl.megatron.layout import hf_to_megatron, megatron_to_hf
from rl.ports import free_port

HF_CONFIG = "hf_config.json"
"""The Hugging Face config the checkpoint was converted from, kept beside it (Megatron's own files say nothing
of the architecture)."""
TE_MARK = "layer_spec.json"


@contextmanager
def one_process() -> Iterator[None]:
    """Megatron's parallel state for this process alone (every parallel size 1), over NCCL where CUDA is and
    gloo elsewhere. The model stays on the host."""
    from megatron.core import parallel_state

    owned = not dist.is_initialized()
    if owned:
        port = free_port("127.0.0.1")
        if torch.cuda.is_available():
            torch.cuda.set_device(0)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    parallel_state.initialize_model_parallel(1, 1)
    try:
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if owned:
            dist.destroy_process_group()


def _host_model(hf_config, *, te: bool):
    from rl.megatron.model import build_model

    return build_model(hf_config, PerfConfig(bf16=False), te=te, use_cpu_initialization=True)


def load_megatron_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole Megatron-named state dict; every parameter must be there (only Transformer Engine's
    `_extra_state` may be missing)."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    if missing or result.unexpected_keys:
        raise ValueError(f"layout does not match the Megatron model: missing {missing}, "
                         f"unexpected {result.unexpected_keys}")


def hf_to_torch_dist(hf_dir: Path, out: Path, *, te: bool = False) -> None:
    """Write the Hugging Face model in `hf_dir` as a torch_dist checkpoint in `out` (a new folder)."""
    from megatron.core import dist_checkpointing
    from transformers import AutoConfig, AutoModelForCausalLM

    from rl.checkpoint import Synchronous
    from rl.megatron.torch_dist_save import TorchDistStrategy

    hf_config = AutoConfig.from_pretrained(hf_dir)
    hf_state = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).state_dict()
    with one_process():
        model = _host_model(hf_config, te=te)
        load_megatron_state(model, hf_to_megatron(hf_state, hf_config, te=te))
        out.mkdir(parents=True, exist_ok=False)
        dist_checkpointing.save({"model": model.sharded_state_dict()}, str(out),
                                sharded_strategy=TorchDistStrategy(Synchronous()))
    write_torch_dist_config(out, hf_config, te=te)


def write_torch_dist_config(folder: Path, hf_config, *, te: bool) -> None:
    """Beside a torch_dist checkpoint: the Hugging Face config and layer spec its tensors are laid out for."""
    hf_config.to_json_file(folder / HF_CONFIG)
    (folder / TE_MARK).write_text(json.dumps({"transformer_engine": te}))


def torch_dist_config(folder: Path):
    """The Hugging Face config and layer spec (Transformer Engine or not) a converted checkpoint was made with."""
    from transformers import AutoConfig

    if not (folder / HF_CONFIG).exists():
        raise FileNotFoundError(f"{folder / HF_CONFIG}: not a checkpoint written by `rlhpc convert hf-to-megatron`")
    te = json.loads((folder / TE_MARK).read_text())["transformer_engine"] if (folder / TE_MARK).exists() else False
    return AutoConfig.from_pretrained(folder / HF_CONFIG), te


def read_torch_dist(folder: Path, hf_config, *, te: bool) -> dict[str, torch.Tensor]:
    """The whole Megatron state dict of a converted checkpoint, read on the host."""
    from megatron.core import dist_checkpointing

    with one_process():
        model = _host_model(hf_config, te=te)
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(folder))
        load_megatron_state(model, loaded["model"])
        return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def torch_dist_to_hf(folder: Path, out: Path, *, tokenizer_from: Path | None = None) -> None:
    """Write the torch_dist checkpoint in `folder` as a Hugging Face folder `out` that `from_pretrained` loads."""
    from transformers import AutoModelForCausalLM

    from rl.export import copy_tokenizer

    hf_config, te = torch_dist_config(folder)
    state = megatron_to_hf(read_torch_dist(folder, hf_config, te=te), hf_config, te=te)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    model.load_state_dict(state, strict=True)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer_from is not None:
        copy_tokenizer(tokenizer_from, out)
