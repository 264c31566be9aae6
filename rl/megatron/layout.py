"""Hugging Face ↔ Megatron-core parameter layout for the dense families the configs name: Qwen3, Qwen2, Llama
and GLM4. Plain tensor code: no megatron import, so it is tested on any machine.

Megatron fuses what Hugging Face keeps apart:
- `linear_qkv` holds q, k and v interleaved per query group (grouped-query attention): for each of the
  `num_key_value_heads` groups, that group's `heads / groups` query heads, then its key head, then its value
  head, each `head_dim` rows. Tensor parallelism then splits the rows into whole groups.
- `linear_fc1` holds the gate projection above the up projection (SwiGLU).
- The norms before attention and before the MLP are `input_layernorm` and `pre_mlp_layernorm` with the local
  layer spec, or the `layer_norm_weight` of the linear layer they are fused into with Transformer Engine's.
- GLM4's extra norms on the attention and MLP outputs live in those modules (`rl/megatron/model.py`).
- With tied embeddings the output layer has no weight of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, cat


@dataclass(frozen=True)
class Family:
    qk_norm: bool = False
    qkv_bias: bool = False
    post_norms: bool = False
    """GLM4: RMSNorm on the attention output and on the MLP output, before each residual add."""
    fused_gate_up: bool = False
    """Hugging Face keeps gate and up in one `gate_up_proj` (GLM4)."""


def family(hf_config: Any) -> Family:
    """The layout facts of a Hugging Face config's model family; an error naming `model_type` otherwise."""
    kind = hf_config.model_type
    if kind == "qwen3":
        return Family(qk_norm=True, qkv_bias=bool(getattr(hf_config, "attention_bias", False)))
    if kind == "qwen2":
        return Family(qkv_bias=True)
    if kind == "llama":
        if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
            raise ValueError("llama with attention_bias or mlp_bias: biases on every linear layer are not mapped")
        return Family()
    if kind == "glm4":
        return Family(qkv_bias=bool(getattr(hf_config, "attention_bias", True)), post_norms=True,
                      fused_gate_up=True)
    raise ValueError(f"model_type {kind!r}: the Megatron layout covers qwen3, qwen2, llama and glm4")


@dataclass(frozen=True)
class Heads:
    heads: int
    groups: int
    head_dim: int

    @classmethod
    def of(cls, hf_config: Any) -> Heads:
        heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        return cls(heads, getattr(hf_config, "num_key_value_heads", None) or heads, head_dim)


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, heads: Heads) -> Tensor:
    """Megatron's `linear_qkv` (weight or bias) from Hugging Face's q, k, v: per query group g,
    rows [q heads of g | k head g | v head g], each head `head_dim` rows."""
    rest = q.shape[1:]
    per_group = [t.reshape(heads.groups, -1, *rest) for t in (q, k, v)]
    return cat(per_group, dim=1).reshape(-1, *rest)


def split_qkv(qkv: Tensor, heads: Heads) -> tuple[Tensor, Tensor, Tensor]:
    """The inverse of `fuse_qkv`."""
    rest = qkv.shape[1:]
    q_rows = heads.heads // heads.groups * heads.head_dim
    grouped = qkv.reshape(heads.groups, q_rows + 2 * heads.head_dim, *rest)
    q, k, v = grouped.split([q_rows, heads.head_dim, heads.head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def _renames(f: Family, te: bool) -> dict[str, str]:
    """Per-layer Megatron suffix → Hugging Face suffix, for the tensors that are only renamed."""
    names = {
        "self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight": "input_layernorm.weight",
        "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
        "mlp.linear_fc1.layer_norm_weight" if te else "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
        "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    }
    if f.qk_norm:
        names |= {"self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
                  "self_attention.k_layernorm.weight": "self_attn.k_norm.weight"}
    if f.post_norms:
        names |= {"self_attention.post_self_attn_layernorm.weight": "post_self_attn_layernorm.weight",
                  "mlp.post_mlp_layernorm.weight": "post_mlp_layernorm.weight"}
    return names


Source = tuple[tuple[str, ...], Callable[..., Tensor]]
"""The Hugging Face tensors a Megatron parameter is made of, and how it is made of them."""
OUTPUT = "output_layer.weight"


def _same(t: Tensor) -> Tensor:
    return t


def _stacked(*parts: Tensor) -> Tensor:
    return cat(parts)


def megatron_sources(hf_config: Any, *, te: bool = False) -> dict[str, Source]:
    """Every whole (unsharded) Megatron-core GPTModel parameter by name → its `Source`. With tied embeddings
    the output layer is the embedding: the last pipeline stage holds a copy of it. `te`: the norm names of
    Transformer Engine's layer spec."""
    f, heads = family(hf_config), Heads.of(hf_config)
    embed = "model.embed_tokens.weight"
    out: dict[str, Source] = {"embedding.word_embeddings.weight": ((embed,), _same),
                              "decoder.final_layernorm.weight": (("model.norm.weight",), _same),
                              OUTPUT: ((embed if hf_config.tie_word_embeddings else "lm_head.weight",), _same)}
    for i in range(hf_config.num_hidden_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        for m, h in _renames(f, te).items():
            out[dst + m] = ((src + h,), _same)
        for kind in ("weight", "bias") if f.qkv_bias else ("weight",):
            out[f"{dst}self_attention.linear_qkv.{kind}"] = (
                tuple(f"{src}self_attn.{p}_proj.{kind}" for p in "qkv"), lambda q, k, v: fuse_qkv(q, k, v, heads))
        out[dst + "mlp.linear_fc1.weight"] = (
            ((src + "mlp.gate_up_proj.weight",), _same) if f.fused_gate_up
            else ((src + "mlp.gate_proj.weight", src + "mlp.up_proj.weight"), _stacked))
    return out


def hf_to_megatron(hf: Mapping[str, Tensor], hf_config: Any, *, te: bool = False) -> dict[str, Tensor]:
    """A whole Hugging Face state dict in Megatron-core GPTModel names and layout, as a model on one pipeline
    stage holds it (with tied embeddings, no output layer)."""
    return {name: make(*(hf[k] for k in keys)) for name, (keys, make) in megatron_sources(hf_config, te=te).items()
            if not (name == OUTPUT and hf_config.tie_word_embeddings)}


def megatron_to_hf(mc: Mapping[str, Tensor], hf_config: Any, *, te: bool = False) -> dict[str, Tensor]:
    """The inverse of `hf_to_megatron`; with tied embeddings `lm_head.weight` is the embedding."""
    return {k: v for name, t in mc.items() for k, v in hf_of_parameter(name, t, hf_config, te=te)}


def hf_of_parameter(name: str, tensor: Tensor, hf_config: Any, *, te: bool = False) -> list[tuple[str, Tensor]]:
    """The Hugging Face tensors one whole Megatron-core parameter holds (`megatron_to_hf` a parameter at a
    time, so that weights can leave as they are gathered); with tied embeddings the embedding is also
    `lm_head.weight` and the last pipeline stage's copy of it (`output_layer.weight`) gives nothing."""
    f = family(hf_config)
    if name == "embedding.word_embeddings.weight":
        return [("model.embed_tokens.weight", tensor)] + (
            [("lm_head.weight", tensor)] if hf_config.tie_word_embeddings else [])
    if name == OUTPUT:
        return [] if hf_config.tie_word_embeddings else [("lm_head.weight", tensor)]
    if name == "decoder.final_layernorm.weight":
        return [("model.norm.weight", tensor)]
    prefix, dot, rest = name.partition(".layers.")
    layer, _, suffix = rest.partition(".")
    if prefix != "decoder" or not dot or not layer.isdigit():
        raise KeyError(f"{name}: not a parameter of the Megatron layout")
    dst = f"model.layers.{layer}."
    renamed = _renames(f, te).get(suffix)
    if renamed is not None:
        return [(dst + renamed, tensor)]
    kind = suffix.removeprefix("self_attention.linear_qkv.")
    if kind != suffix and (kind == "weight" or (kind == "bias" and f.qkv_bias)):
        q, k, v = split_qkv(tensor, Heads.of(hf_config))
        return [(f"{dst}self_attn.{p}_proj.{kind}", t) for p, t in zip("qkv", (q, k, v))]
    if suffix == "mlp.linear_fc1.weight":
        if f.fused_gate_up:
            return [(dst + "mlp.gate_up_proj.weight", tensor)]
        gate, up = tensor.chunk(2)
        return [(dst + "mlp.gate_proj.weight", gate), (dst + "mlp.up_proj.weight", up)]
    raise KeyError(f"{name}: not a parameter of the Megatron layout")
