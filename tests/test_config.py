from __future__ import annotations

import json
import tomllib

import pytest

from conftest import CONFIGS, MINIMAL
from hpc.config import slurm_time_minutes
from rlhpc.config import Config, ConfigError, dump_toml, json_schema, load_config


def problems_of(path, overrides=()):
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    return e.value


def test_qwen3_4b_reproduces_the_seed_example():
    cfg = load_config(CONFIGS / "qwen3_4b.toml")
    assert cfg.perf.colocate and cfg.perf.actor_num_gpus_per_node == 8 and cfg.perf.actor_num_nodes == 1
    assert cfg.perf.tensor_model_parallel_size == 2 and cfg.perf.sequence_parallel
    assert cfg.perf.use_dynamic_batch_size and cfg.perf.max_tokens_per_gpu == 9216
    assert (cfg.perf.recompute_granularity, cfg.perf.recompute_method, cfg.perf.recompute_num_layers) == (
        "full", "uniform", 1)
    r = cfg.rollout
    assert (r.rollout_batch_size, r.n_samples_per_prompt, r.global_batch_size, r.num_rollout) == (32, 8, 256, 3000)
    assert r.rm_type == "deepscaler" and r.apply_chat_template and r.rollout_shuffle and r.balance_data
    assert r.rollout_max_response_len == 8192 and r.input_key == "prompt" and r.label_key == "label"
    g = cfg.grpo
    assert (g.advantage_estimator, g.use_kl_loss, g.kl_loss_type, g.eps_clip, g.eps_clip_high) == (
        "grpo", True, "low_var_kl", 0.2, 0.28)
    assert cfg.eval.eval_interval == 20 and set(cfg.eval.eval_prompt_data) == {"aime"}
    assert cfg.eval.n_samples_per_eval_prompt == 16 and cfg.eval.eval_max_response_len == 16384
    assert cfg.sglang.rollout_num_gpus_per_engine == 2 and cfg.sglang.sglang_mem_fraction_static == 0.7
    assert cfg.ckpt.save_interval == 20 and cfg.model.rotary_base == 1_000_000


def test_glm4_and_tiny_configs_load():
    glm = load_config(CONFIGS / "glm4_9b.toml")
    assert glm.perf.context_parallel_size == 2 and glm.perf.max_tokens_per_gpu == 4608
    assert glm.rollout.global_batch_size == 128 and glm.eval.eval_interval == 5
    tiny = load_config(CONFIGS / "tiny_cpu.toml")
    assert tiny.rollout.engine == "torch" and tiny.perf.train_backend == "torch"
    assert tiny.rollout.prompt_data.exists()


def test_defaults_are_slimes(write_config):
    cfg = load_config(write_config(MINIMAL))
    o, g, r = cfg.optimizer, cfg.grpo, cfg.rollout
    assert (o.optimizer, o.lr, o.lr_decay_style, o.weight_decay, o.adam_beta1, o.adam_beta2, o.clip_grad) == (
        "adam", 1e-6, "constant", 0.1, 0.9, 0.98, 1.0)
    assert (g.advantage_estimator, g.use_kl_loss, g.kl_loss_coef, g.kl_loss_type, g.entropy_coef) == (
        "grpo", False, 0.0, "k1", 0.0)
    assert (g.eps_clip, g.eps_clip_high, g.calculate_per_token_loss, g.use_tis) == (0.2, None, False, False)
    assert cfg.eps_clip_high == 0.2  # symmetric when unset
    assert (r.rollout_temperature, r.rollout_top_p, r.rollout_top_k, r.num_steps_per_rollout) == (1.0, 1.0, -1, 1)
    assert (r.apply_chat_template, r.rollout_shuffle, r.input_key) == (False, False, "input")
    p = cfg.perf
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size) == (1, 1, 1)
    assert (p.expert_model_parallel_size, p.sequence_parallel, p.use_dynamic_batch_size) == (1, False, False)
    assert cfg.sglang.rollout_num_gpus_per_engine == 1 and cfg.eval.n_samples_per_eval_prompt == 1
    assert cfg.ckpt.save_interval is None and cfg.run.seed == 1234 and cfg.run.name == "run"


def test_global_batch_size_is_derived(write_config):
    cfg = load_config(write_config(MINIMAL + "num_steps_per_rollout = 2\n"))
    assert cfg.rollout.global_batch_size == 4


def test_batch_constraint_names_the_four_fields_and_the_line(write_config):
    path = write_config(MINIMAL + "global_batch_size = 5\n")
    err = problems_of(path)
    assert len(err.problems) == 1
    text = str(err)
    for field in ("rollout.rollout_batch_size", "rollout.n_samples_per_prompt", "rollout.global_batch_size",
                  "rollout.num_steps_per_rollout"):
        assert field in text
    assert f"{path}:8:" in text  # rollout_batch_size's line
    assert "4 × 2 = 8" in text and "5 × 1 = 5" in text


def test_steps_that_do_not_divide_the_batch(write_config):
    err = problems_of(write_config(MINIMAL + "num_steps_per_rollout = 3\n"))
    assert "num_steps_per_rollout = 3" in str(err)


def test_unknown_key_gets_did_you_mean_and_line(write_config):
    path = write_config(MINIMAL + "n_sample_per_prompt = 3\n")
    err = problems_of(path)
    assert f"{path}:10: rollout.n_sample_per_prompt: unknown key" in str(err)
    assert "did you mean 'rollout.n_samples_per_prompt'" in str(err)


def test_unknown_section_gets_did_you_mean(write_config):
    err = problems_of(write_config(MINIMAL + "[optimiser]\nlr = 1e-5\n"))
    assert "unknown key 'optimiser' in the top level; did you mean 'optimizer'" in str(err)


@pytest.mark.parametrize(
    ("overrides", "fields", "reason"),
    [
        (["grpo.eps_clip=0.3", "grpo.eps_clip_high=0.2"], "grpo.eps_clip_high / grpo.eps_clip", "below eps_clip"),
        (["grpo.kl_loss_type='k4'"], "grpo.kl_loss_type", "'k1', 'k2', 'k3' or 'low_var_kl'"),
        (["perf.colocate=true", "rollout.async_train=true"], "perf.colocate / rollout.async_train", "not supported"),
        (["perf.use_dynamic_batch_size=true"], "perf.max_tokens_per_gpu", "must be set"),
        (["grpo.kl_coef=0.1", "grpo.use_kl_loss=true", "grpo.kl_loss_coef=0.1"], "grpo.kl_coef / grpo.kl_loss_coef",
         "only one of"),
        (["grpo.kl_loss_coef=0.1"], "grpo.kl_loss_coef / grpo.use_kl_loss", "no effect without use_kl_loss"),
        (["rollout.n_samples_per_prompt=1", "rollout.rollout_batch_size=8"],
         "rollout.n_samples_per_prompt / grpo.advantage_estimator", "every advantage is 0"),
        (["rollout.n_samples_per_prompt=1", "rollout.rollout_batch_size=8", "grpo.advantage_estimator='gspo'"],
         "rollout.n_samples_per_prompt / grpo.advantage_estimator", "'gspo'"),
        (["grpo.use_rollout_logprobs=true", "grpo.use_tis=true"], "grpo.use_rollout_logprobs / grpo.use_tis",
         "nothing to correct"),
        (["rollout.over_sampling_batch_size=2"], "rollout.over_sampling_batch_size", "at least rollout_batch_size"),
        (["rollout.rm_type='remote_rm'"], "rollout.rm_url", "needs rm_url"),
        (["rollout.partial_rollout=true"], "rollout.partial_rollout / rollout.over_sampling_batch_size",
         "set over_sampling_batch_size too"),
        (["rollout.top_k=0"], "rollout.rollout_top_k", "-1 (off)"),
        (["sglang.sglang_router_strategy='round_robin'"], "sglang.sglang_router_strategy", "no sglang-router yet"),
        (["rollout.engine='sglang'", "sglang.rollout_num_gpus_per_engine=16"],
         "sglang.rollout_num_gpus_per_engine / perf.actor_num_gpus_per_node", "multi-node SGLang engines"),
        (["perf.train_backend='megatron'", "grpo.advantage_estimator='ppo'"],
         "grpo.advantage_estimator / perf.train_backend", "torch backend only"),
        (["perf.log_probs_max_tokens_per_gpu=64"], "perf.log_probs_max_tokens_per_gpu / perf.use_dynamic_batch_size",
         "needs use_dynamic_batch_size"),
    ],
)
def test_cross_field_checks(write_config, overrides, fields, reason):
    err = problems_of(write_config(MINIMAL), overrides)
    assert fields in str(err) and reason in str(err)


def test_reinforce_plus_plus_needs_normalized_advantages(write_config):
    err = problems_of(write_config(MINIMAL + "[grpo]\nadvantage_estimator = \"reinforce_plus_plus\"\n"))
    assert "grpo.normalize_advantages" in str(err)


def test_no_reward_is_an_error(write_config):
    err = problems_of(write_config(MINIMAL.replace('rm_type = "math"\n', "")))
    assert "rollout.rm_type / rollout.custom_rm_path" in str(err)
    err = problems_of(write_config(MINIMAL.replace('"math"', '"maths"')))
    assert "unknown reward type 'maths'" in str(err)


def test_eval_datasets_are_name_to_path(write_config, tmp_path):
    cfg = load_config(write_config(MINIMAL + '[eval]\neval_prompt_data = ["aime", "aime.jsonl", "math", "m.jsonl"]\n'))
    assert cfg.eval.eval_prompt_data == {"aime": tmp_path / "aime.jsonl", "math": tmp_path / "m.jsonl"}
    err = problems_of(write_config(MINIMAL + '[eval]\neval_prompt_data = ["aime"]\n'))
    assert "eval.eval_prompt_data" in str(err) and "name = path" in str(err)
    err = problems_of(write_config(MINIMAL + "[eval]\neval_interval = 5\n"))
    assert "no evaluation dataset" in str(err)


def test_missing_required_field_and_toml_syntax(write_config):
    err = problems_of(write_config(MINIMAL.replace("rollout_batch_size = 4\n", "")))
    assert "rollout.rollout_batch_size: required, but not given" in str(err)
    path = write_config(MINIMAL + "broken = \n")
    err = problems_of(path)
    assert f"{path}:10: (syntax): not valid TOML" in str(err)


def test_relative_paths_are_relative_to_the_config(write_config, tmp_path):
    cfg = load_config(write_config(MINIMAL))
    assert cfg.rollout.prompt_data == tmp_path / "train.jsonl"
    assert cfg.ckpt.hf_checkpoint == tmp_path / "model"
    assert cfg.missing_paths() == []
    cfg = load_config(write_config(MINIMAL.replace('"model"', '"nowhere"')))
    assert cfg.missing_paths() == [("ckpt.hf_checkpoint", tmp_path / "nowhere")]


def test_overrides_are_typed_and_validated(write_config):
    path = write_config(MINIMAL)
    cfg = load_config(path, ["rollout.temperature=0.7", "run.name=my-run", "sglang.mem_fraction_static=0.5",
                             "eval.eval_prompt_data={a = 'a.jsonl'}"])
    assert cfg.rollout.rollout_temperature == 0.7 and cfg.run.name == "my-run"
    assert cfg.sglang.sglang_mem_fraction_static == 0.5 and "a" in cfg.eval.eval_prompt_data
    err = problems_of(path, ["rollout.temperature=hot"])
    assert str(err).startswith("--set rollout.temperature=hot: rollout.rollout_temperature: Input should be a valid")
    err = problems_of(path, ["rollout.global_batch_size=3"])
    assert str(err).startswith("--set rollout.global_batch_size=3:")
    err = problems_of(path, ["rollout"])
    assert "expected --set section.key=value" in str(err)


def test_section_prefix_may_be_dropped_in_the_file(write_config):
    cfg = load_config(write_config(MINIMAL + "temperature = 0.5\ntop_k = 20\n"))
    assert cfg.rollout.rollout_temperature == 0.5 and cfg.rollout.rollout_top_k == 20


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config(CONFIGS / "qwen3_4b.toml")
    text = dump_toml(cfg)
    assert Config.model_validate(tomllib.loads(text)) == cfg
    assert "global_batch_size = 256" in text and "lr = 1e-06" in text


def test_json_schema_covers_every_section():
    schema = json_schema()
    assert {"model", "ckpt", "rollout", "eval", "perf", "grpo", "optimizer", "sglang", "slurm", "ray", "run"} <= set(
        schema["properties"])
    json.dumps(schema)


@pytest.mark.parametrize(("text", "minutes"), [("30", 30), ("30:01", 31), ("4:00:00", 240), ("1-00", 1440),
                                                 ("1-02:03", 1563), ("0:00:01", 1)])
def test_slurm_time_limits(text, minutes):
    assert slurm_time_minutes(text) == minutes


def test_slurm_section_is_checked(write_config):
    err = problems_of(write_config(MINIMAL + '[slurm]\ntime = "forever"\nsignal = "KILL"\n'))
    assert "slurm.time" in str(err) and "slurm.signal" in str(err)


def test_a_grace_as_long_as_the_time_limit_is_refused_at_its_line(write_config):
    err = problems_of(write_config(MINIMAL + '[slurm]\ntime = "2"\nsignal_grace_s = 120\n'))
    assert "slurm.signal_grace_s" in str(err) and "run.toml:12:" in str(err)
    assert "not shorter than the time limit" in str(err)
    assert load_config(write_config(MINIMAL + '[slurm]\ntime = "3"\nsignal_grace_s = 120\n')).slurm.working_s == 60


def test_model_section_is_checked_against_the_checkpoint(write_config, tiny_model_dir, tmp_path):
    """`[model]` (slime's MODEL_ARGS) must state the architecture of `ckpt.hf_checkpoint`: fields that agree
    load, one that disagrees is refused naming the field and both values."""
    import shutil

    shutil.copy(tiny_model_dir / "config.json", tmp_path / "model" / "config.json")
    agreeing = ["model.family='qwen3'", "model.num_layers=2", "model.num_query_groups=2", "model.qk_layernorm=true",
                "model.swiglu=true", "model.untie_embeddings_and_output_weights=false", "model.normalization='RMSNorm'"]
    load_config(write_config(MINIMAL), agreeing)
    err = str(problems_of(write_config(MINIMAL), ["model.num_layers=36"]))
    assert "model.num_layers = 36, but" in err and "config.json says 2" in err
    err = str(problems_of(write_config(MINIMAL), ["model.rotary_base=1000000"]))
    assert "model.rotary_base = 1000000.0, but" in err and "says 10000.0" in err


@pytest.mark.parametrize("field", ["grpo.entropy_coef", "optimizer.lr", "rollout.rollout_temperature",
                                   "rollout.rm_timeout_s", "run.hang_timeout_s", "model.rotary_base",
                                   "ray.join_timeout_s"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_refused_in_every_section(write_config, field, value):
    err = problems_of(write_config(MINIMAL), [f"{field}={value}"])
    assert field in str(err) and "finite" in str(err)


def test_the_default_grace_is_checked_against_a_short_time_limit(write_config):
    """`time = "1"` leaves 60 s, less than the default 120 s grace, although the grace is not written out."""
    err = problems_of(write_config(MINIMAL + '[slurm]\ntime = "1"\n'))
    assert "slurm.signal_grace_s" in str(err) and "120 s is not shorter than the time limit" in str(err)


@pytest.mark.parametrize("time", ["0", "00:00:00", "0-0"])
def test_a_zero_time_limit_is_refused(write_config, time):
    """sbatch takes --time=0 for no limit at all."""
    err = problems_of(write_config(MINIMAL), [f"slurm.time='{time}'"])
    assert "slurm.time" in str(err) and "no time at all" in str(err)


def test_lengths_beyond_the_models_positions_are_refused(write_config, tiny_model_dir, tmp_path):
    """The tiny model has 256 positions: a response of 256 leaves no room for a prompt, 200 + 100 is too long."""
    import shutil

    shutil.copy(tiny_model_dir / "config.json", tmp_path / "model" / "config.json")
    load_config(write_config(MINIMAL), ["rollout.rollout_max_prompt_len=56", "rollout.rollout_max_response_len=200"])
    err = str(problems_of(write_config(MINIMAL), ["rollout.rollout_max_response_len=1000000000000"]))
    assert "rollout.rollout_max_response_len" in err and "no room for a prompt" in err
    assert "max_position_embeddings = 256" in err
    err = str(problems_of(write_config(MINIMAL), ["rollout.max_prompt_len=200", "eval.eval_max_response_len=100"]))
    assert "eval.eval_max_response_len / rollout.rollout_max_prompt_len" in err and "200 + 100" in err


def test_an_unreadable_checkpoint_config_is_an_error_line(write_config, tmp_path):
    (tmp_path / "model" / "config.json").write_text("{not json")
    err = str(problems_of(write_config(MINIMAL)))
    assert "ckpt.hf_checkpoint" in err and "config.json: cannot read the model's config" in err
