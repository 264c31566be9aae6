"""The policy's architecture as its Hugging Face `config.json` states it, in the `[model]` section's terms
(slime's MODEL_ARGS), so that a `[model]` copied from slime's model scripts is checked against the weights it
will train: a field that disagrees with the checkpoint is an error naming both values, before anything runs.
Both backends build the model from the checkpoint's config; `[model]` is the user's statement of it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

CONFIG_JSON = "config.json"


def _rotary_base(hf: dict[str, Any]) -> float | None:
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    return params.get("rope_theta", hf.get("rope_theta"))


def hf_architecture(hf: dict[str, Any]) -> dict[str, Any]:
    """`[model]` field → its value in a Hugging Face config.json (of the dense families rlhpc maps)."""
    heads = hf.get("num_attention_heads")
    return {
        "family": hf.get("model_type"),
        "num_layers": hf.get("num_hidden_layers"),
        "hidden_size": hf.get("hidden_size"),
        "ffn_hidden_size": hf.get("intermediate_size"),
        "num_attention_heads": heads,
        "num_query_groups": hf.get("num_key_value_heads") or heads,
        "kv_channels": hf.get("head_dim") or (hf["hidden_size"] // heads if heads and "hidden_size" in hf else None),
        "vocab_size": hf.get("vocab_size"),
        "max_position_embeddings": hf.get("max_position_embeddings"),
        "rotary_base": _rotary_base(hf),
        "norm_epsilon": hf.get("rms_norm_eps"),
        "normalization": "RMSNorm" if "rms_norm_eps" in hf else None,
        "swiglu": hf.get("hidden_act") == "silu",
        "qk_layernorm": hf.get("model_type") == "qwen3",
        "disable_bias_linear": not hf.get("mlp_bias", False),
        "untie_embeddings_and_output_weights": not hf.get("tie_word_embeddings", True),
    }


def _same(ours: Any, theirs: Any) -> bool:
    if isinstance(ours, float) or isinstance(theirs, float):
        return theirs is not None and math.isclose(float(ours), float(theirs), rel_tol=1e-9)
    return ours == theirs


def read_hf_config(hf_dir: Path) -> dict[str, Any] | None:
    """The checkpoint's config.json; None when the folder has none yet (paths that exist only on the compute
    nodes). A file that is there but unreadable is a ValueError naming it."""
    path = Path(hf_dir) / CONFIG_JSON
    if not path.is_file():
        return None
    try:
        hf = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the model's config: {e}") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return hf


def model_mismatches(model: dict[str, Any], hf: dict[str, Any], source: Path) -> list[tuple[str, str]]:
    """(field, message) for each set `[model]` field that the checkpoint's config.json `hf` (read from
    `source`) contradicts."""
    stated = hf_architecture(hf)
    return [(name, f"model.{name} = {value!r}, but {source} says {stated[name]!r}")
            for name, value in model.items() if value is not None and not _same(value, stated[name])]
