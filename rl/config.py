"""Typed configuration of a GRPO run: the learning sections of the TOML file.

Each section mirrors one of slime's argument groups (MODEL_ARGS, CKPT_ARGS, ROLLOUT_ARGS, EVAL_ARGS,
PERF_ARGS, GRPO_ARGS, OPTIMIZER_ARGS, SGLANG_ARGS) with slime's names in snake_case and slime's
defaults; `[run]` holds what belongs to this toolkit. The pydantic field defaults here are the one
source of defaults. Cluster sections (`[slurm]`, `[ray]`) live in `hpc.config`; the whole file is
assembled and loaded by `rlhpc.config`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationInfo, field_validator,
                      model_validator)

PositiveInt = Annotated[int, Field(gt=0)]

KNOWN_RM_TYPES = ("math", "deepscaler", "dapo", "f1", "gpqa", "remote_rm")
GROUP_ESTIMATORS = ("grpo", "gspo", "reinforce_plus_plus_baseline")
"""Estimators whose advantage is a reward less its group's mean: zero for a group of one."""


class ConfigFieldsError(ValueError):
    """A check that involves several fields; `fields` are dotted paths such as `rollout.rollout_batch_size`."""

    def __init__(self, fields: tuple[str, ...], message: str):
        super().__init__(message)
        self.fields = fields


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    # Relative paths are relative to the config file, so a config means the same from any directory.
    value = value.expanduser()
    base = (info.context or {}).get("base_dir")
    if not value.is_absolute() and base is not None:
        value = Path(base) / value
    return Path(os.path.normpath(value))


ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]


def _resolve_hook_file(value: str, info: ValidationInfo) -> str:
    file, _, function = value.rpartition(":")
    return f"{_resolve_path(Path(file), info)}:{function}" if file.endswith(".py") else value


PROMPT_SUFFIXES = (".jsonl", ".parquet")


def _prompt_file(value: Path) -> Path:
    if value.suffix not in PROMPT_SUFFIXES:
        raise ValueError(f"{str(value)!r} is neither .jsonl nor .parquet (slime's prompt data formats)")
    return value


PromptPath = Annotated[ConfigPath, AfterValidator(_prompt_file)]
"""A prompt or evaluation data file, JSONL or Parquet (`rl.data`), told apart by its suffix."""

HookPath = Annotated[str, Field(pattern=r"^([A-Za-z_][\w.]*[:.]|[^:]+\.py:)[A-Za-z_]\w*$"),
                     AfterValidator(_resolve_hook_file)]
"""A Python function named as `package.module:function` (or slime's dotted `package.module.function`), or
as `path/to/file.py:function` (relative to the config file, as verl's `custom_reward_function.path`)."""


DEFAULT_MAX_RESPONSE_LEN = 1024
"""Tokens a response may have when `rollout.rollout_max_response_len` is unset (slime leaves it to SGLang, whose
own default is 128: too short for reasoning)."""


class Section(BaseModel):
    # nan passes every range check (all comparisons are false) and inf most: refuse both in every float field.
    # A field's docstring is its description in the schema (`rlhpc config schema`, docs/configuration.md).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              use_attribute_docstrings=True)


class ModelConfig(Section):
    """Architecture of the policy, in slime's MODEL_ARGS terms. The model is built from `ckpt.hf_checkpoint`'s
    config.json; each field set here must agree with it (a mismatch is refused, naming both values), so a
    section copied from slime's model scripts is checked against the weights it will train."""

    family: Literal["qwen3", "qwen2", "llama", "glm4"] | None = None
    """Model family, checked against config.json's `model_type`; unchecked when unset."""
    num_layers: PositiveInt | None = None
    """Transformer layers, checked against config.json's `num_hidden_layers`; unchecked when unset."""
    hidden_size: PositiveInt | None = None
    """Hidden size, checked against config.json's `hidden_size`; unchecked when unset."""
    ffn_hidden_size: PositiveInt | None = None
    """MLP inner size, checked against config.json's `intermediate_size`; unchecked when unset."""
    num_attention_heads: PositiveInt | None = None
    """Attention heads, checked against config.json's `num_attention_heads`; unchecked when unset."""
    num_query_groups: PositiveInt | None = None
    """Key/value heads (GQA groups), checked against config.json's `num_key_value_heads`; unchecked when unset."""
    kv_channels: PositiveInt | None = None
    """Size of one attention head, checked against config.json's `head_dim` (else hidden_size / heads); unchecked when
    unset."""
    vocab_size: PositiveInt | None = None
    """Vocabulary size, checked against config.json's `vocab_size`; unchecked when unset."""
    max_position_embeddings: PositiveInt | None = None
    """Longest sequence, checked against config.json's `max_position_embeddings`; unchecked when unset."""
    rotary_base: float | None = None
    """RoPE base, checked against config.json's `rope_theta`; unchecked when unset."""
    norm_epsilon: float | None = None
    """Epsilon of the norm layers, checked against config.json's `rms_norm_eps`; unchecked when unset."""
    normalization: Literal["RMSNorm", "LayerNorm"] | None = None
    """Norm layer kind; RMSNorm where config.json has `rms_norm_eps`; unchecked when unset."""
    swiglu: bool | None = None
    """SwiGLU MLP, checked against config.json's `hidden_act` being silu; unchecked when unset."""
    qk_layernorm: bool | None = None
    """Norm on queries and keys (true for qwen3 checkpoints only); unchecked when unset."""
    disable_bias_linear: bool | None = None
    """No bias in the linear layers (config.json's `mlp_bias` false or absent); unchecked when unset."""
    untie_embeddings_and_output_weights: bool | None = None
    """Separate output layer from the input embedding (config.json's `tie_word_embeddings` false); unchecked when
    unset."""


class CkptConfig(Section):
    """Where the run's weights come from and where its checkpoints go (slime's CKPT_ARGS)."""

    hf_checkpoint: ConfigPath
    """Hugging Face folder: tokenizer and model metadata (and the initial weights of the torch backend)."""
    ref_load: ConfigPath | None = None
    """Reference model checkpoint; also the initial checkpoint when `load` is empty."""
    load: ConfigPath | None = None
    """Actor checkpoint to resume from; usually equal to `save`."""
    save: ConfigPath | None = None
    """Checkpoint folder; the run folder's checkpoints/ when unset."""
    save_interval: PositiveInt | None = None
    """Rollouts between checkpoint saves."""
    keep_last: PositiveInt | None = None
    """Keep only this many complete checkpoints (None keeps all)."""
    async_save: bool = False
    """Write checkpoints in the background while training goes on (slime's --async-save), with either backend (the
    same files as a synchronous save); a checkpoint becomes the latest only once every rank's files are written
    and sealed."""


class RolloutConfig(Section):
    """Prompts, batch sizes, sampling, rewards and the engines in service (slime's ROLLOUT_ARGS). rollout_batch_size ×
    n_samples_per_prompt = global_batch_size × num_steps_per_rollout must hold."""

    # data
    prompt_data: PromptPath
    """Training prompts: a JSONL or Parquet file (by its suffix), one prompt per line or row; relative to the config
    file."""
    input_key: str = "input"
    """Key of the prompt in each row: a string, or OpenAI-format messages with apply_chat_template."""
    label_key: str | None = None
    """Key of the label the reward is graded against; unset: no label (the reward sees None)."""
    metadata_key: str = "metadata"
    """Key of a row's optional metadata object, handed to reward and generate functions (its `rm_type` overrides
    rm_type)."""
    apply_chat_template: bool = False
    """Render each prompt with the tokenizer's chat template (a bare string is taken as one user message)."""
    apply_chat_template_kwargs: dict[str, Any] = {}
    """Extra keyword arguments to the tokenizer's apply_chat_template, e.g. `{ enable_thinking = false }`."""
    rollout_shuffle: bool = False
    """Draw prompts in a fresh seeded order each epoch; off: in file order."""
    rollout_seed: int = 42
    """Seed of the prompt order when rollout_shuffle is on (each epoch's order depends on it and the epoch alone)."""
    num_rollout: PositiveInt | None = None
    """Rollouts to run in all; unset: num_epoch passes over the prompts (one when that is unset too)."""
    num_epoch: PositiveInt | None = None
    """Passes over the prompt data, used when num_rollout is unset; unset: one."""
    # batch sizes
    rollout_batch_size: PositiveInt
    """Prompts per rollout (the groups that are trained on)."""
    n_samples_per_prompt: PositiveInt = 1
    """Responses sampled per prompt: the group size of GRPO's baseline (1 only with a non-group estimator)."""
    global_batch_size: PositiveInt | None = None
    """Samples per optimizer step; derived from the batch constraint when absent."""
    num_steps_per_rollout: PositiveInt = 1
    """Optimizer steps per rollout; 1 is on-policy training."""
    balance_data: bool = False
    """Share each optimizer step's samples among data-parallel ranks by token count, longest first; off: contiguous
    slices."""
    over_sampling_batch_size: PositiveInt | None = None
    """Dynamic sampling: prompts per round, each round's groups kept while they pass the filter until rollout_batch_size
    have; unset: off."""
    dynamic_sampling_filter_path: HookPath | None = None
    """Dynamic sampling's group filter `f(args, samples) -> bool`; unset: keep groups whose rewards are not all
    equal."""
    partial_rollout: bool = False
    """With dynamic sampling: abort the groups still generating once enough have passed and continue them in the next
    rollout."""
    buffer_filter_path: HookPath | None = None
    """Partial rollout: `f(args, rollout_id, buffer, num_samples)` choosing the buffered groups to continue; unset:
    oldest first."""
    custom_generate_function_path: HookPath | None = None
    """Function producing one sample's response (e.g. multi-turn with tools); unset: one plain generation."""
    # sampling
    engine: Literal["torch", "sglang"] = "torch"
    """Rollout engine: `torch` (a Hugging Face model in a Ray actor, one device each, CPU or GPU) or `sglang`
    (SGLang servers on GPUs)."""
    rollout_max_prompt_len: PositiveInt | None = None
    """Prompts of more tokens are left out when the data is read (slime's `--rollout-max-prompt-len`)."""
    rollout_max_response_len: PositiveInt | None = None
    """Most tokens generated per response (SGLang's max_new_tokens); 1024 when unset."""

    rollout_temperature: Annotated[float, Field(gt=0)] = 1.0
    """Sampling temperature of the rollout; 1.0 samples from the policy as it is."""
    rollout_top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    """Nucleus sampling: keep the most likely tokens up to this probability mass; 1.0 is off."""
    rollout_top_k: int = -1
    """Sample among the k most likely tokens; -1 is off."""
    rollout_stop: list[str] = []
    """Strings that end a response (SGLang's `stop`): it keeps the tokens up to the one completing the string,
    its text ends before the string."""
    rollout_stop_token_ids: list[int] = []
    """Token ids that end a response, besides the tokenizer's end-of-sequence token."""
    rollout_skip_special_tokens: bool = False
    """Leave special tokens out of a response's text (what reward functions read); its tokens keep them."""
    update_weight_buffer_size: PositiveInt = 512 * 1024**2
    """Bytes of weights per bucket from the trainer to the engines (slime's `--update-weight-buffer-size`); a
    larger tensor goes alone."""
    stream_interval: PositiveInt = 8
    """Torch engine: decode steps between its messages of the samples that have ended (SGLang's
    `--stream-interval`). 1 sends each as it ends, so partial rollout aborts soonest; each message costs the
    driver about as much as several decode steps of a small model, hence 8."""
    # reward
    rm_type: str | None = None
    """Built-in reward: math, deepscaler, dapo, f1, gpqa (a `boxed_` prefix grades the last \\boxed{} only) or
    remote_rm."""
    custom_rm_path: HookPath | None = None
    """Overrides rm_type. Sync or async; per sample `f(args, sample)` or, with group_rm, per batch."""
    group_rm: bool = False
    """Call custom_rm_path once per batch, `f(args, samples)` returning one reward per sample, instead of per sample."""
    rm_url: str | None = None
    """Reward server of rm_type = "remote_rm": each sample is POSTed as JSON {prompt, response, label}."""
    rm_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    """Seconds one request to rm_url may take."""
    rm_max_retries: Annotated[int, Field(ge=0)] = 5
    """Retries of a failed request to rm_url (no answer, 5xx, 408/425/429), with exponential backoff; 0: none."""
    rm_deadline_s: Annotated[float, Field(gt=0)] = 300.0
    """Seconds one sample's reward may take in all, retries and their backoff included."""
    reward_key: str | None = None
    """The entry of a dict reward (custom_rm_path's or rm_url's answer) to train on, as slime's `--reward-key`."""
    # engines in service
    use_fault_tolerance: bool = False
    """Replace an engine that dies or fails its health check, and issue its requests again."""
    rollout_health_check_interval: Annotated[float, Field(gt=0)] = 30.0
    """Seconds between health checks of the engines that are generating."""
    rollout_health_check_timeout: Annotated[float, Field(gt=0)] = 30.0
    """Seconds an engine may take to answer a health check before it counts as failed (with use_fault_tolerance)."""
    rollout_health_check_first_wait: Annotated[float, Field(ge=0)] = 0.0
    """Seconds into a generation before the first health check (on top of the interval)."""
    # async training (slime's train_async.py)
    async_train: bool = False
    """Generate the next rollouts while the trainer trains on the current one (slime's train_async.py); off: one after
    the other."""
    update_weights_interval: PositiveInt = 1
    """Async training: trained rollouts between weight updates of the engines; 1 updates after each."""
    async_buffer_size: PositiveInt = 4
    """Async training: rollouts generated ahead of the one in training; a sample's policy is then at most
    async_buffer_size + update_weights_interval − 1 versions old."""

    @field_validator("rollout_top_k")
    @classmethod
    def _top_k(cls, v: int) -> int:
        if v != -1 and v < 1:
            raise ValueError("must be -1 (off) or a positive number of tokens")
        return v

    @field_validator("rm_url")
    @classmethod
    def _rm_url(cls, v: str | None) -> str | None:
        # urllib would also open file:// and ftp:// URLs: a reward "server" reading local files.
        if v is not None and (urlsplit(v).scheme.lower() not in ("http", "https") or not urlsplit(v).netloc):
            raise ValueError(f"{v!r} is not an http:// or https:// URL")
        return v

    @field_validator("rm_type")
    @classmethod
    def _rm_type(cls, v: str | None) -> str | None:
        if v is None:
            return v
        base = v.removeprefix("boxed_")
        if base not in KNOWN_RM_TYPES:
            raise ValueError(f"unknown reward type {v!r}; known: {', '.join(KNOWN_RM_TYPES)} (optionally boxed_*)")
        return v

    @property
    def max_response_len(self) -> int:
        """`rollout_max_response_len` in force."""
        return self.rollout_max_response_len or DEFAULT_MAX_RESPONSE_LEN


class EvalConfig(Section):
    """Evaluation inherits the rollout's sampling parameters; each field set here overrides one."""

    eval_interval: PositiveInt | None = None
    """Rollouts between evaluations on eval_prompt_data; unset: no evaluation during training."""
    eval_prompt_data: dict[str, PromptPath] = {}
    """Named datasets: `{ aime = "/data/aime-2024.jsonl" }` (slime's `name path` pairs are accepted too)."""
    eval_input_key: str | None = None
    """Key of the prompt in the evaluation files; rollout.input_key when unset."""
    eval_label_key: str | None = None
    """Key of the label in the evaluation files; rollout.label_key when unset."""
    n_samples_per_eval_prompt: PositiveInt = 1
    """Responses sampled per evaluation prompt: the n of the reported pass@n (a reward > 0 counts as correct)."""
    eval_temperature: Annotated[float, Field(ge=0)] | None = None
    """Sampling temperature of evaluation; rollout_temperature when unset."""
    eval_top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    """Nucleus sampling of evaluation; rollout_top_p when unset."""
    eval_top_k: int | None = None
    """Top-k of evaluation (-1 is off); rollout_top_k when unset."""
    eval_max_response_len: PositiveInt | None = None
    """Most tokens generated per evaluation response; rollout_max_response_len (else 1024) when unset."""
    skip_eval_before_train: bool = False
    """Do not evaluate before the first rollout of a new run (a resumed run never does)."""

    @field_validator("eval_prompt_data", mode="before")
    @classmethod
    def _name_path_pairs(cls, v: Any) -> Any:
        if isinstance(v, list):
            if len(v) % 2 or not all(isinstance(x, str) for x in v):
                raise ValueError('give datasets as a table of name = path, e.g. { aime = "/data/aime.jsonl" }')
            return dict(zip(v[::2], v[1::2]))
        return v


class PerfConfig(Section):
    """Training backend, placement of the training workers, parallelism and micro-batches (slime's PERF_ARGS)."""

    train_backend: Literal["torch", "megatron"] = "torch"
    """Training backend: `torch` (Hugging Face model, DDP or FSDP2) or `megatron` (Megatron-core, its parallelisms)."""
    torch_data_parallel: Literal["ddp", "fsdp2"] = "ddp"
    """Torch backend with several workers: `ddp` replicates the model, `fsdp2` shards it (fully_shard)."""
    # placement
    actor_num_nodes: PositiveInt = 1
    """Nodes the training workers span (at most slurm.nodes)."""
    actor_num_gpus_per_node: PositiveInt = 8
    """Training workers per node, one GPU each (one process each on CPU)."""
    colocate: bool = False
    """Rollout engines run on the training GPUs, which hand their memory over in turn; off: on GPUs of their own
    (sglang.rollout_num_gpus)."""
    offload_train: bool = True
    """Colocated: while the engines generate, training memory waits on the host (slime's `--offload-train`,
    on with `--colocate`): the optimizer's state; with Megatron also the weights, fp32 main parameters and
    gradient buffers."""
    # parallelism
    tensor_model_parallel_size: PositiveInt = 1
    """Megatron backend: tensor-parallel degree (each layer's weights split over this many GPUs); the torch backend
    ignores it."""
    pipeline_model_parallel_size: PositiveInt = 1
    """Megatron backend: pipeline-parallel degree (the layers split into this many stages); the torch backend ignores
    it."""
    context_parallel_size: PositiveInt = 1
    """Megatron backend: context-parallel degree (each sequence split over this many GPUs; needs Transformer Engine)."""
    expert_model_parallel_size: PositiveInt = 1
    """Megatron backend: expert-parallel degree for MoE layers; the torch backend ignores it."""
    expert_tensor_parallel_size: PositiveInt = 1
    """Megatron backend: tensor-parallel degree within each expert; the torch backend ignores it."""
    sequence_parallel: bool = False
    """Megatron backend, with tensor parallelism: split activations along the sequence too (needs Transformer
    Engine)."""
    use_distributed_optimizer: bool = False
    """Megatron backend: shard the optimizer state over the data-parallel ranks."""
    bf16: bool = True
    """Train in bf16 where the GPU supports it (torch: autocast; Megatron: bf16 parameters); fp32 on CPU."""
    cpu_threads: PositiveInt | None = None
    """Torch threads of each worker and engine on CPU; by default the node's CPUs shared among them.
    Fixing it makes CPU runs bitwise reproducible across machines with different core counts."""
    # batching
    micro_batch_size: PositiveInt = 1
    """Sequences per micro-batch (one forward and backward pass); ignored with use_dynamic_batch_size."""
    use_dynamic_batch_size: bool = False
    """Pack micro-batches by token budget (max_tokens_per_gpu) instead of micro_batch_size sequences; the loss is the
    same."""
    max_tokens_per_gpu: PositiveInt | None = None
    """Token budget of a micro-batch with use_dynamic_batch_size; a longer sequence forms its own, never truncated."""
    log_probs_max_tokens_per_gpu: PositiveInt | None = None
    """Token budget of a micro-batch in passes without backward (old and reference log-probs); max_tokens_per_gpu
    when unset. Needs use_dynamic_batch_size."""
    # activation recomputation
    recompute_granularity: Literal["full", "selective"] | None = None
    """Megatron backend: activation recomputation, `full` (whole layers) or `selective` (attention core); unset:
    none."""
    recompute_method: Literal["uniform", "block"] | None = None
    """Megatron backend, with full recomputation: `uniform` or `block` distribution of the recomputed layers."""
    recompute_num_layers: PositiveInt | None = None
    """Megatron backend, with full recomputation: layers per recomputed chunk (uniform) or recomputed layers per
    pipeline stage (block)."""


class GrpoConfig(Section):
    """The RL objective: advantage estimator, clipping, KL and entropy terms (slime's GRPO_ARGS)."""

    advantage_estimator: Literal["grpo", "gspo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "ppo"] = "grpo"
    """How advantages are computed: grpo, gspo (sequence-level ratio), reinforce_plus_plus,
    reinforce_plus_plus_baseline, or ppo (critic)."""
    use_kl_loss: bool = False
    """Load the reference model and report the KL to it; it enters the loss only with kl_loss_coef > 0."""
    kl_loss_coef: Annotated[float, Field(ge=0)] = 0.0
    """Weight of the KL-to-reference term in the loss (needs use_kl_loss); 0 only monitors it."""
    kl_loss_type: Literal["k1", "k2", "k3", "low_var_kl"] = "k1"
    """KL estimator, of the loss term and of kl_coef's reward penalty: k1, k2, k3 or low_var_kl."""
    kl_coef: Annotated[float, Field(ge=0)] = 0.0
    """KL penalty folded into the reward (REINFORCE++); exclusive with kl_loss_coef."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus subtracted from the loss; 0 is off."""
    eps_clip: Annotated[float, Field(gt=0)] = 0.2
    """PPO clip range of the ratio below 1 (1 − eps_clip), and above 1 when eps_clip_high is unset."""
    eps_clip_high: Annotated[float, Field(gt=0)] | None = None
    """Upper clip range; symmetric (= eps_clip) when unset."""
    eps_clip_c: Annotated[float, Field(gt=1)] | None = None
    """Dual-clip PPO lower bound of the ratio for negative advantages."""
    value_clip: Annotated[float, Field(gt=0)] = 0.2
    """PPO: clip range of the critic's new values around its old ones in the value loss."""
    gamma: Annotated[float, Field(ge=0, le=1)] = 1.0
    """Discount of future token rewards (PPO's GAE, REINFORCE++ returns); 1.0 is none."""
    lambd: Annotated[float, Field(ge=0, le=1)] = 1.0
    """PPO: GAE's lambda; 1.0 gives Monte Carlo returns less the value."""
    normalize_advantages: bool = False
    """Whiten the advantages over all response tokens of the rollout (required by the reinforce_plus_plus
    estimators)."""
    disable_grpo_std_normalization: bool = False
    """GRPO/GSPO: subtract the group's mean reward only, without dividing by its std (Dr. GRPO)."""
    calculate_per_token_loss: bool = False
    """Average the loss over all tokens of the global batch; off: over each sample's tokens, then over samples."""
    use_tis: bool = False
    """Truncated importance sampling: weigh each token's policy loss by the trainer's over the engine's probability."""
    tis_clip: Annotated[float, Field(gt=0)] = 2.0
    """Upper bound of the truncated importance weight."""
    tis_clip_low: Annotated[float, Field(ge=0)] = 0.0
    """Lower bound of the truncated importance weight; 0 is none."""
    use_rollout_logprobs: bool = False
    """The engine's log-probs of the response tokens stand for the old policy's in the ratio (slime's
    `--use-rollout-logprobs`): no recomputing pass before training, at the price of the engine's numerical
    difference from the trainer entering the ratio."""


class OptimizerConfig(Section):
    """Optimizer and learning-rate schedule (slime's OPTIMIZER_ARGS)."""

    optimizer: Literal["adam", "sgd"] = "adam"
    """`adam` (AdamW: decoupled weight decay) or `sgd`."""
    lr: Annotated[float, Field(gt=0)] = 1e-6
    """Peak learning rate, after warmup."""
    critic_lr: Annotated[float, Field(gt=0)] | None = None
    """Learning rate of PPO's critic; lr when unset."""
    min_lr: Annotated[float, Field(ge=0)] = 0.0
    """Learning rate at the end of a linear or cosine decay."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule after warmup: constant, linear or cosine (from lr down to min_lr)."""
    lr_warmup_iters: Annotated[int, Field(ge=0)] = 0
    """Optimizer steps of linear warmup from lr / lr_warmup_iters up to lr; 0: none."""
    lr_decay_iters: PositiveInt | None = None
    """Optimizer steps over which lr decays; the whole run when unset."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    """Weight decay coefficient (decoupled, as AdamW's)."""
    adam_beta1: Annotated[float, Field(ge=0, lt=1)] = 0.9
    """Adam's decay rate of the gradient's running mean."""
    adam_beta2: Annotated[float, Field(ge=0, lt=1)] = 0.98
    """Adam's decay rate of the squared gradient's running mean."""
    adam_eps: Annotated[float, Field(gt=0)] = 1e-8
    """Adam's epsilon in the denominator."""
    clip_grad: Annotated[float, Field(ge=0)] = 1.0
    """Global gradient-norm clip; 0 disables it."""
    max_consecutive_nonfinite_steps: PositiveInt = 3
    """Optimizer steps in a row skipped for a non-finite loss or gradient norm before the run stops."""


class SglangConfig(Section):
    """The rollout engines' GPUs and SGLang's server options (slime's SGLANG_ARGS)."""

    rollout_num_gpus_per_engine: PositiveInt = 1
    """GPUs per engine (SGLang's tp_size)."""
    rollout_num_gpus: PositiveInt | None = None
    """GPUs for all engines; ignored with colocate."""
    sglang_mem_fraction_static: Annotated[float, Field(gt=0, lt=1)] | None = None
    """Fraction of each GPU's memory SGLang holds for weights and KV cache (e.g. 0.8 when colocated); SGLang's choice
    when unset."""
    sglang_log_level: str = "warning"
    """Log level of the SGLang servers (SGLang's `--log-level`)."""
    sglang_server_concurrency: PositiveInt = 512
    """Requests in flight per engine: SGLang's `--max-running-requests` and the client's parallel requests."""
    sglang_cuda_graph_bs: list[PositiveInt] | None = None
    """Decode batch sizes captured as CUDA graphs (SGLang's `--cuda-graph-bs-decode`)."""
    sglang_disable_cuda_graph: bool = False
    """Run decode and prefill without CUDA graphs (slower, less memory, faster start)."""
    sglang_enable_deterministic_inference: bool = True
    """SGLang honours each sample's seed only with this (batch-invariant kernels, slower): off, samples are not
    reproducible, so neither a resumed run nor an engine's reissued requests draw the same samples again."""
    sglang_context_length: PositiveInt | None = None
    """Longest sequence (prompt + response, tokens) an SGLang server accepts; the model's own when unset."""
    sglang_router_strategy: Literal["cache_aware", "round_robin", "random", "power_of_two"] | None = None
    """slime's `--sglang-router-strategy`: refused until rlhpc runs sglang-router (its pool spreads requests)."""
    sglang_server_args: dict[str, Any] = {}
    """Any other SGLang server argument, forwarded as `--key value` (slime's `--sglang-*` forwarding)."""


class RunConfig(Section):
    """What belongs to rlhpc itself: the run's name and folder, its seed, metrics logging and the watchdog's
    timeouts."""

    # pydantic's own message of an error here would quote the section's input, wandb_key with it
    model_config = ConfigDict(**Section.model_config, hide_input_in_errors=True)

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")] | None = None
    """Run name; the config file's stem when unset."""
    output_dir: ConfigPath | None = None
    """Run folder; `runs/<name>` when unset."""
    seed: int = 1234
    """Seed of the run: each sample's sampling seed, and the trainers' torch seeds (plus the rank)."""
    use_tensorboard: bool = True
    """Also write each rollout's metrics as TensorBoard events under the run folder's tensorboard/."""
    # Weights & Biases (slime's wandb arguments): rl.wandb_run
    use_wandb: bool = False
    """Log each rollout's metrics to W&B too: one W&B run per rlhpc run, resumed by every requeue and resume."""
    wandb_project: str | None = None
    """W&B project; W&B's own default (WANDB_PROJECT, else "uncategorized") when unset."""
    wandb_group: str | None = None
    """W&B group, and the W&B run's name; the run name when unset."""
    wandb_team: str | None = None
    """W&B entity (team or user); the key's default entity when unset."""
    wandb_mode: Literal["online", "offline", "disabled"] | None = None
    """online uploads, offline writes only wandb_dir (`wandb sync` uploads later), disabled logs nothing;
    WANDB_MODE, else online, when unset."""
    wandb_dir: ConfigPath | None = None
    """Folder under which W&B writes its files (wandb/); the run folder when unset (slime: the working directory)."""
    wandb_key: SecretStr | None = Field(default=None, exclude=True)
    """W&B API key, online only: never written to config.toml or the batch script (WANDB_API_KEY or `wandb login`
    serve as well)."""
    wandb_host: str | None = None
    """W&B server URL, for a self-hosted W&B; W&B's cloud when unset."""
    disable_wandb_random_suffix: bool = False
    """Name the W&B group and run exactly wandb_group; by default a random suffix (the W&B run's id) is added."""
    node_timeout_s: Annotated[float, Field(gt=0)] = 120.0
    """A node gone from the job's Ray cluster this long ends the job (requeued)."""
    hang_timeout_s: Annotated[float, Field(gt=0)] = 1800.0
    """No new phase of the driver (progress.json) this long: every process's stacks are written to the run
    folder and the job ends (requeued). Longer than the slowest legitimate phase (a long generation, a save)."""

    @model_validator(mode="after")
    def _wandb_fields_need_use_wandb(self) -> RunConfig:
        if not self.use_wandb and (given := sorted(f for f in self.model_fields_set if f.startswith(
                ("wandb_", "disable_wandb_")) and getattr(self, f) != type(self).model_fields[f].default)):
            raise ConfigFieldsError((*(f"run.{f}" for f in given), "run.use_wandb"),
                                    f"{', '.join(given)} has no effect without use_wandb = true")
        return self

    @field_validator("output_dir")
    @classmethod
    def _run_folder(cls, v: Path | None) -> Path | None:
        # The run folder is written into the batch script, its name into a comment line.
        if v is not None and any(ord(c) < 32 or ord(c) == 127 for c in str(v)):
            raise ValueError(f"{str(v)!r} contains a control character; name a folder without one")
        if v is not None and v.parent == v:
            raise ValueError(f"{str(v)!r} is the root of the file system; name a folder of the run's own")
        return v


class RLConfig(BaseModel):
    """The learning part of a run's configuration, checked as a whole."""

    model_config = ConfigDict(extra="forbid", validate_assignment=False)

    model: ModelConfig = ModelConfig()
    ckpt: CkptConfig
    rollout: RolloutConfig
    eval: EvalConfig = EvalConfig()
    perf: PerfConfig = PerfConfig()
    grpo: GrpoConfig = GrpoConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    sglang: SglangConfig = SglangConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _agrees_with_checkpoint(self) -> RLConfig:
        """`[model]` agrees with `ckpt.hf_checkpoint`'s config.json field by field, and the longest sequence
        the rollout asks for fits the model's positions; unchecked while there is no config.json here."""
        from rl.architecture import CONFIG_JSON, model_mismatches, read_hf_config

        source = self.ckpt.hf_checkpoint / CONFIG_JSON
        try:
            hf = read_hf_config(self.ckpt.hf_checkpoint)
        except ValueError as e:
            raise ConfigFieldsError(("ckpt.hf_checkpoint",), str(e)) from None
        if hf is None:
            return self
        if wrong := model_mismatches(self.model.model_dump(), hf, source):
            raise ConfigFieldsError(tuple(f"model.{name}" for name, _ in wrong),
                                    "; ".join(message for _, message in wrong))
        positions = hf.get("max_position_embeddings")
        prompt = self.rollout.rollout_max_prompt_len
        for field, response in (("rollout.rollout_max_response_len", self.rollout.rollout_max_response_len),
                                ("eval.eval_max_response_len", self.eval.eval_max_response_len)):
            if not isinstance(positions, int) or response is None or (prompt or 1) + response <= positions:
                continue
            name = field.partition(".")[2]
            if prompt is None:
                raise ConfigFieldsError((field,), f"{name} = {response} leaves no room for a prompt within the "
                                        f"model's max_position_embeddings = {positions} ({source})")
            raise ConfigFieldsError((field, "rollout.rollout_max_prompt_len"),
                                    f"rollout_max_prompt_len + {name} = {prompt} + {response} is more than the "
                                    f"model's max_position_embeddings = {positions} ({source})")
        return self

    @model_validator(mode="after")
    def _batch_constraint(self) -> RLConfig:
        """rollout_batch_size × n_samples_per_prompt = global_batch_size × num_steps_per_rollout."""
        r = self.rollout
        samples = r.rollout_batch_size * r.n_samples_per_prompt
        if r.global_batch_size is None:
            if samples % r.num_steps_per_rollout:
                raise ConfigFieldsError(
                    ("rollout.rollout_batch_size", "rollout.n_samples_per_prompt", "rollout.num_steps_per_rollout"),
                    f"rollout_batch_size × n_samples_per_prompt = {samples} samples cannot be split into "
                    f"num_steps_per_rollout = {r.num_steps_per_rollout} equal optimizer steps",
                )
            r.global_batch_size = samples // r.num_steps_per_rollout
        elif samples != r.global_batch_size * r.num_steps_per_rollout:
            raise ConfigFieldsError(
                (
                    "rollout.rollout_batch_size",
                    "rollout.n_samples_per_prompt",
                    "rollout.global_batch_size",
                    "rollout.num_steps_per_rollout",
                ),
                "the batch constraint rollout_batch_size × n_samples_per_prompt = global_batch_size × "
                f"num_steps_per_rollout does not hold: {r.rollout_batch_size} × {r.n_samples_per_prompt} = {samples}"
                f" but {r.global_batch_size} × {r.num_steps_per_rollout} = "
                f"{r.global_batch_size * r.num_steps_per_rollout}",
            )
        return self

    @model_validator(mode="after")
    def _consistency(self) -> RLConfig:
        r, g, p, e = self.rollout, self.grpo, self.perf, self.eval
        checks: list[tuple[bool, tuple[str, ...], str]] = [
            (
                g.eps_clip_high is not None and g.eps_clip_high < g.eps_clip,
                ("grpo.eps_clip_high", "grpo.eps_clip"),
                f"eps_clip_high = {g.eps_clip_high} is below eps_clip = {g.eps_clip}; the upper clip range must be "
                "at least the lower one",
            ),
            (
                p.colocate and r.async_train,
                ("perf.colocate", "rollout.async_train"),
                "colocated mode is not supported for async training: training and rollout cannot overlap on the "
                "same GPUs. Drop colocate and give the engines their own GPUs (sglang.rollout_num_gpus)",
            ),
            (
                p.use_dynamic_batch_size and p.max_tokens_per_gpu is None,
                ("perf.max_tokens_per_gpu", "perf.use_dynamic_batch_size"),
                "max_tokens_per_gpu must be set when use_dynamic_batch_size is on",
            ),
            (
                p.log_probs_max_tokens_per_gpu is not None and not p.use_dynamic_batch_size,
                ("perf.log_probs_max_tokens_per_gpu", "perf.use_dynamic_batch_size"),
                "log_probs_max_tokens_per_gpu is a token budget: it needs use_dynamic_batch_size = true",
            ),
            (
                e.eval_interval is not None and not e.eval_prompt_data,
                ("eval.eval_prompt_data", "eval.eval_interval"),
                "eval_interval is set but no evaluation dataset is given",
            ),
            (
                g.use_rollout_logprobs and g.use_tis,
                ("grpo.use_rollout_logprobs", "grpo.use_tis"),
                "use_tis corrects for the engine's log-probs differing from the trainer's old ones; with "
                "use_rollout_logprobs they are the same, so there is nothing to correct: choose one",
            ),
            (
                r.n_samples_per_prompt == 1 and g.advantage_estimator in GROUP_ESTIMATORS,
                ("rollout.n_samples_per_prompt", "grpo.advantage_estimator"),
                f"advantage_estimator = {g.advantage_estimator!r} compares each response with the others of its "
                "prompt: with n_samples_per_prompt = 1 every advantage is 0 and nothing is learned; sample several "
                "responses per prompt (e.g. 8)",
            ),
            (
                g.kl_loss_coef != 0 and not g.use_kl_loss,
                ("grpo.kl_loss_coef", "grpo.use_kl_loss"),
                f"kl_loss_coef = {g.kl_loss_coef} has no effect without use_kl_loss = true: set it, or drop "
                "kl_loss_coef",
            ),
            (
                g.kl_coef != 0 and g.kl_loss_coef != 0,
                ("grpo.kl_coef", "grpo.kl_loss_coef"),
                "only one of kl_coef (reward penalty) and kl_loss_coef (loss term) can be non-zero",
            ),
            (
                g.advantage_estimator.startswith("reinforce_plus_plus") and not g.normalize_advantages,
                ("grpo.normalize_advantages", "grpo.advantage_estimator"),
                f"advantage_estimator = {g.advantage_estimator!r} requires normalize_advantages = true",
            ),
            (
                r.over_sampling_batch_size is not None and r.over_sampling_batch_size < r.rollout_batch_size,
                ("rollout.over_sampling_batch_size", "rollout.rollout_batch_size"),
                "over_sampling_batch_size must be at least rollout_batch_size",
            ),
            *(
                (
                    r.over_sampling_batch_size is None and bool(getattr(r, name)),
                    (f"rollout.{name}", "rollout.over_sampling_batch_size"),
                    f"{name} acts on the groups of over-sampling: set over_sampling_batch_size too",
                )
                for name in ("dynamic_sampling_filter_path", "partial_rollout", "buffer_filter_path")
            ),
            (
                r.rm_type is None and r.custom_rm_path is None,
                ("rollout.rm_type", "rollout.custom_rm_path"),
                f"no reward: set rm_type (one of {', '.join(KNOWN_RM_TYPES)}) or custom_rm_path",
            ),
            (
                r.rm_type == "remote_rm" and not r.rm_url,
                ("rollout.rm_url", "rollout.rm_type"),
                "rm_type = 'remote_rm' needs rm_url",
            ),
            (
                self.sglang.sglang_router_strategy is not None,
                ("sglang.sglang_router_strategy",),
                "no sglang-router yet: rlhpc's engine pool spreads the requests over the engines itself (leave it "
                "unset)",
            ),
            (
                r.engine == "sglang" and self.sglang.rollout_num_gpus_per_engine > p.actor_num_gpus_per_node,
                ("sglang.rollout_num_gpus_per_engine", "perf.actor_num_gpus_per_node"),
                f"an engine of {self.sglang.rollout_num_gpus_per_engine} GPUs would span nodes of "
                f"{p.actor_num_gpus_per_node}: multi-node SGLang engines (--nnodes) are not supported yet",
            ),
            (
                p.train_backend == "megatron" and g.advantage_estimator == "ppo",
                ("grpo.advantage_estimator", "perf.train_backend"),
                "advantage_estimator = 'ppo': the critic is trained by the torch backend only",
            ),
            (
                _engines_split_unevenly(r, self.sglang, p),
                ("sglang.rollout_num_gpus_per_engine", "perf.actor_num_gpus_per_node"),
                f"colocated engines of {self.sglang.rollout_num_gpus_per_engine} GPUs do not divide the "
                f"{p.actor_num_gpus_per_node} training GPUs of a node: each engine spans GPUs of one node",
            ),
        ]
        for failed, fields, message in checks:
            if failed:
                raise ConfigFieldsError(fields, message)
        return self

    @property
    def eps_clip_high(self) -> float:
        """The upper clip range in force: eps_clip_high, or eps_clip when unset (symmetric)."""
        return self.grpo.eps_clip if self.grpo.eps_clip_high is None else self.grpo.eps_clip_high

    def missing_paths(self) -> list[tuple[str, Path]]:
        """Input paths that do not exist here, as (field, path). Output paths (save) are created."""
        wanted: list[tuple[str, Path | None]] = [
            ("ckpt.hf_checkpoint", self.ckpt.hf_checkpoint),
            ("ckpt.ref_load", self.ckpt.ref_load),
            ("rollout.prompt_data", self.rollout.prompt_data),
            *((f"eval.eval_prompt_data.{k}", v) for k, v in self.eval.eval_prompt_data.items()),
        ]
        return [(f, p) for f, p in wanted if p is not None and not p.exists()]

    def prompt_files(self) -> list[tuple[str, Path, str, str | None]]:
        """(field, path, input key, label key) of each prompt file: the training data, then each evaluation set
        (whose keys default to the training data's)."""
        r, e = self.rollout, self.eval
        return [("rollout.prompt_data", r.prompt_data, r.input_key, r.label_key),
                *((f"eval.eval_prompt_data.{name}", path, e.eval_input_key or r.input_key,
                   e.eval_label_key or r.label_key) for name, path in e.eval_prompt_data.items())]

    def run_dir(self) -> Path:
        """`run.output_dir`, else runs/<run name> under the working directory."""
        return Path(self.run.output_dir or Path("runs") / (self.run.name or "run")).absolute()

    def save_dir(self, run_dir: Path) -> Path:
        """`ckpt.save`, else the run folder's checkpoints/."""
        return Path(self.ckpt.save) if self.ckpt.save else Path(run_dir) / "checkpoints"

    def num_rollout_for(self, dataset_size: int) -> int:
        """Rollouts to run: num_rollout, else num_epoch passes over the data (slime's rule), else one epoch."""
        if self.rollout.num_rollout is not None:
            return self.rollout.num_rollout
        return (self.rollout.num_epoch or 1) * math.ceil(dataset_size / self.rollout.rollout_batch_size)


def _engines_split_unevenly(rollout: RolloutConfig, sglang: SglangConfig, perf: PerfConfig) -> bool:
    """Colocated engines cover every training GPU, each within a node (`rl/placement.py`)."""
    if not perf.colocate or rollout.engine != "sglang":
        return False
    return perf.actor_num_gpus_per_node % sglang.rollout_num_gpus_per_engine != 0
