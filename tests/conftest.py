from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from rl.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-qwen3")


@pytest.fixture
def write_config(tmp_path):
    """Write a TOML config (with data files that exist) into tmp_path and return its path."""
    (tmp_path / "train.jsonl").write_text('{"input": "1+1=", "label": "2"}\n')
    (tmp_path / "model").mkdir(exist_ok=True)

    def write(text: str, name: str = "run.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


MINIMAL = """\
[ckpt]
hf_checkpoint = "model"

[rollout]
prompt_data = "train.jsonl"
label_key = "label"
rm_type = "math"
rollout_batch_size = 4
n_samples_per_prompt = 2
"""
