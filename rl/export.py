"""Export a checkpoint's policy as a Hugging Face folder that `from_pretrained` loads."""

from __future__ import annotations

import shutil
from pathlib import Path

from rl import checkpoint

MEGATRON_DIR = "megatron"
"""Where the Megatron backend writes its torch_dist state inside a checkpoint folder (`iter_NNNNNNN/megatron`)."""


def load_policy(folder: Path, hf_checkpoint: Path):
    """The policy of a checkpoint folder, as a `transformers` model (architecture from hf_checkpoint)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(hf_checkpoint)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {"model": model.state_dict()}
    checkpoint.load_model_state(state, Path(folder))
    model.load_state_dict(state["model"])
    return model


def export_hf(checkpoints: Path, hf_checkpoint: Path, out: Path) -> Path:
    """Write the newest complete checkpoint under `checkpoints` to `out`: weights, config, tokenizer."""
    folder = checkpoint.latest(checkpoints)
    if folder is None:
        raise FileNotFoundError(f"no complete checkpoint under {checkpoints}")
    if (folder / MEGATRON_DIR).is_dir():  # the Megatron backend's torch_dist state
        from rl.megatron.convert import torch_dist_to_hf

        torch_dist_to_hf(folder / MEGATRON_DIR, out, tokenizer_from=hf_checkpoint)
        return folder
    model = load_policy(folder, hf_checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    copy_tokenizer(hf_checkpoint, out)
    return folder


def copy_tokenizer(hf_dir: Path, out: Path) -> None:
    """The tokenizer and generation files of a Hugging Face folder, copied into another."""
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "generation_config.json", "vocab.json", "merges.txt", "tokenizer.model"):
        if (Path(hf_dir) / name).exists():
            shutil.copy2(Path(hf_dir) / name, out / name)
