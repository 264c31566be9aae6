"""A Hugging Face folder's tensors read one at a time, by name, from its safetensors files.

Every training rank builds its own shards from the Hugging Face weights. Loading the whole model per rank
(`from_pretrained`) costs 8 ranks × the fp32 model of host memory per node; reading each tensor when its
Megatron parameter is filled keeps one parameter's sources in memory at a time, and a pipeline stage reads
only its own layers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@contextmanager
def hf_tensors(folder: Path) -> Iterator[Callable[[str], torch.Tensor]]:
    """`read(name)`: the tensor `name` of the folder's weights in float32. A folder without safetensors weights
    is an error naming it (`.bin` checkpoints: convert them with `save_pretrained` first)."""
    from safetensors import safe_open

    folder = Path(folder)
    if (folder / INDEX).exists():
        files = {name: folder / file for name, file in json.loads((folder / INDEX).read_text())["weight_map"].items()}
    elif (folder / SINGLE).exists():
        files = None
    else:
        raise FileNotFoundError(f"{folder}: no {SINGLE} or {INDEX} (the Megatron backend reads safetensors weights;"
                                " re-save the model with `save_pretrained`)")
    with ExitStack() as stack:
        handles: dict[Path, safe_open] = {}

        def read(name: str) -> torch.Tensor:
            path = folder / SINGLE if files is None else files.get(name)
            if path is None:
                raise KeyError(f"{folder / INDEX} names no tensor {name!r}")
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            return handles[path].get_tensor(name).to(torch.float32)

        yield read
