"""A Megatron-core GPTModel built from a Hugging Face config (Qwen3, Qwen2, Llama, GLM4) and `[perf]`.

Transformer Engine's layer spec when it is installed (its fused norm + linear layers, THD attention), the
local spec otherwise; `rl/megatron/layout.py` names the parameters of both. GLM4 norms the attention and MLP
outputs before each residual add, which Megatron's layer lacks: two small subclasses add those norms.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from rl.megatron.layout import Heads, family

if TYPE_CHECKING:
    from rl.config import PerfConfig


def has_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def check_layer_spec(perf: PerfConfig, *, te: bool) -> None:
    """Refuse what only Transformer Engine's layers can run, naming the setting."""
    if perf.context_parallel_size > 1 and not te:
        raise ValueError("perf.context_parallel_size > 1 needs Transformer Engine (its THD attention splits "
                         "sequences over context-parallel ranks)")
    if perf.sequence_parallel and perf.tensor_model_parallel_size > 1 and not te:
        raise ValueError("perf.sequence_parallel needs Transformer Engine: Megatron's torch norms refuse sequence "
                         "parallelism. Install transformer-engine, or set perf.sequence_parallel = false")


def _rope(hf_config: Any) -> dict[str, Any]:
    """GPTModel's rotary arguments from either transformers' `rope_parameters` (v5) or `rope_theta` /
    `rope_scaling` (v4)."""
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"rotary_base": theta,
                           "rotary_percent": params.get("partial_rotary_factor",
                                                        getattr(hf_config, "partial_rotary_factor", 1.0))}
    if kind == "llama3":
        out |= {"rope_scaling": True, "rope_scaling_factor": params["factor"]}
    elif kind != "default":
        raise ValueError(f"rope_type {kind!r}: only the default and llama3 rotary embeddings are mapped")
    return out


def transformer_config(hf_config: Any, perf: PerfConfig, **overrides: Any) -> TransformerConfig:
    """Architecture from the Hugging Face config, parallelism, recomputation and precision from `[perf]`."""
    f, heads = family(hf_config), Heads.of(hf_config)
    bf16 = perf.bf16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    kwargs: dict[str, Any] = dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=heads.heads,
        num_query_groups=heads.groups,
        kv_channels=heads.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=f.qkv_bias,
        qk_layernorm=f.qk_norm,
        rotary_interleaved=f.post_norms,  # GLM4 rotates interleaved pairs
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        # What pipeline stages send each other (Megatron refuses pipeline parallelism without it).
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        tensor_model_parallel_size=perf.tensor_model_parallel_size,
        pipeline_model_parallel_size=perf.pipeline_model_parallel_size,
        context_parallel_size=perf.context_parallel_size,
        expert_model_parallel_size=perf.expert_model_parallel_size,
        expert_tensor_parallel_size=perf.expert_tensor_parallel_size,
        sequence_parallel=perf.sequence_parallel and perf.tensor_model_parallel_size > 1,
        recompute_granularity=perf.recompute_granularity,
        recompute_method=perf.recompute_method if perf.recompute_granularity == "full" else None,
        recompute_num_layers=perf.recompute_num_layers if perf.recompute_granularity == "full" else None,
        use_cpu_initialization=not torch.cuda.is_available(),
        # Packed micro-batches differ in length; pipeline stages then exchange their shapes first.
        variable_seq_lengths=perf.pipeline_model_parallel_size > 1,
        moe_token_dispatcher_type="alltoall",
    )
    return TransformerConfig(**(kwargs | overrides))


class _PostNorm(MegatronModule):
    """A norm on the module's output before the residual add, under GLM4's parameter name `norm_name`.
    Mixed in before a Megatron module, whose `__init__` and `forward` it extends."""

    norm_name: str

    def __init__(self, config: TransformerConfig, submodules: Any, *args: Any, post_norm: Any, **kwargs: Any):
        super().__init__(config, submodules, *args, **kwargs)
        setattr(self, self.norm_name, build_module(post_norm, config=config, hidden_size=config.hidden_size,
                                                   eps=config.layernorm_epsilon))

    def forward(self, *args: Any, **kwargs: Any):
        out, bias = super().forward(*args, **kwargs)
        return getattr(self, self.norm_name)(out), bias


class PostNormSelfAttention(_PostNorm, SelfAttention):
    norm_name = "post_self_attn_layernorm"


class PostNormMLP(_PostNorm, MLP):
    norm_name = "post_mlp_layernorm"

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None
                           ) -> dict[str, Any]:
        """MLP's own asks each child for its sharded state dict, which the norm, a plain torch (or Transformer
        Engine) module in either layer spec, has not: it crashed every save and conversion of a GLM4 model. The
        norm's is Megatron's default for such modules (replicated over tensor-parallel ranks), as Attention's
        children get."""
        from megatron.core.transformer.utils import sharded_state_dict_default

        norm = self._modules.pop(self.norm_name)
        try:
            state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        finally:
            self._modules[self.norm_name] = norm
        return state | sharded_state_dict_default(norm, f"{prefix}{self.norm_name}.", sharded_offsets, metadata)


def layer_spec(hf_config: Any, *, te: bool) -> ModuleSpec:
    f = family(hf_config)
    if te:
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        spec, norm = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=f.qk_norm), TENorm
    else:
        from megatron.core.models.backends import LocalSpecProvider

        spec = get_gpt_layer_local_spec(qk_layernorm=f.qk_norm, normalization="RMSNorm")
        norm = LocalSpecProvider().layer_norm(rms_norm=True, for_qk=False)
    if f.post_norms:
        layer = spec.submodules
        for name, cls in (("self_attention", PostNormSelfAttention), ("mlp", PostNormMLP)):
            inner = getattr(layer, name)
            setattr(layer, name, ModuleSpec(module=cls, params={**inner.params, "post_norm": norm},
                                            submodules=inner.submodules))
    return spec


def build_model(hf_config: Any, perf: PerfConfig, *, te: bool, pre_process: bool = True,
                post_process: bool = True, **overrides: Any) -> GPTModel:
    """This pipeline stage's GPTModel (the whole model without pipeline parallelism), on the current device."""
    config = transformer_config(hf_config, perf, **overrides)
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(hf_config, te=te),
        vocab_size=hf_config.vocab_size,
        max_sequence_length=hf_config.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
        position_embedding_type="rope",
        **_rope(hf_config),
    )
