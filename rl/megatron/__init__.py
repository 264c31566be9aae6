"""The Megatron-core training backend and the Hugging Face ↔ Megatron weight layout (GPU production path).

Only `layout` and `context_parallel` (pure host code, which `rl.batch` lays micro-batches out with) are
importable without megatron-core; the rest imports it, and is imported only when
`perf.train_backend = "megatron"` or a conversion asks for it.
"""
