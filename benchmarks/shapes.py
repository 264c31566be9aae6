"""Real model shapes with random weights, built here (nothing can be downloaded), for the benchmarks that need a
real size: a Hugging Face folder with rlhpc's character tokenizer, loaded through `from_pretrained` as a real
checkpoint is."""

from __future__ import annotations

from pathlib import Path

QWEN3 = {
    "0.6b": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
}


def build_model(folder: Path, shape: str) -> int:
    """A Qwen3 of `shape` with random weights (seed 0), saved in bf16 with the tokenizer; its parameters' bytes."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from rl.tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    config = Qwen3Config(**QWEN3[shape], max_position_embeddings=4096, dtype="bfloat16",
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters())
