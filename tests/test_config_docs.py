"""The configuration reference (docs/configuration.md) is the schema's, and every field has a docstring."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict
from typer.testing import CliRunner

from rlhpc.cli import app
from rlhpc.config import json_schema
from rlhpc.config_docs import DOCS_PATH, REGENERATE, render, sections, undocumented

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_field_has_a_docstring():
    missing = undocumented()
    assert not missing, (
        f"config fields without a docstring: {', '.join(missing)}. Add a one-line attribute docstring under each "
        "field (rl/config.py, hpc/config.py): what rlhpc does with it, its unit, what its default means; it is "
        f"the field's description in `rlhpc config schema` and {DOCS_PATH}")


def test_the_configuration_reference_is_current():
    committed = (ROOT / DOCS_PATH).read_text(encoding="utf-8") if (ROOT / DOCS_PATH).exists() else ""
    assert committed == render(), (
        f"{DOCS_PATH} is stale (the config's fields or docstrings changed): regenerate it with `{REGENERATE}` "
        "from the repository root, and commit it")


def test_the_reference_has_every_section_and_field():
    text = render()
    for path, section in sections():
        assert f"\n## [{path}]\n" in text
        for name in section["properties"]:
            assert f"| `{name}` |" in text
    assert {"slurm.container", "rollout", "ray"} <= {path for path, _ in sections()}


def test_a_field_without_a_docstring_is_found():
    class Part(BaseModel):
        model_config = ConfigDict(use_attribute_docstrings=True)
        said: int = 1
        """A field with a docstring."""
        unsaid: int = 2

    class Whole(BaseModel):
        part: Part = Part()

    assert undocumented(Whole.model_json_schema()) == ["part.unsaid"]


def test_types_and_defaults_as_the_reference_shows_them():
    text = render(json_schema())
    assert "| `rollout_top_p` | float > 0, ≤ 1 | `1.0` |" in text
    assert "| `rollout_batch_size` | integer > 0 | required |" in text
    assert "| `engine` | one of `\"torch\"`, `\"sglang\"` | `\"torch\"` |" in text
    assert "| `label_key` | string | unset |" in text


def test_config_docs_writes_the_reference(tmp_path):
    out = tmp_path / "docs" / "configuration.md"
    result = CliRunner().invoke(app, ["config", "docs", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text(encoding="utf-8") == render()
    printed = CliRunner().invoke(app, ["config", "docs"])
    assert printed.exit_code == 0 and printed.output == render()
