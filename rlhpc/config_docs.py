"""The configuration reference, docs/configuration.md, rendered from the config's JSON schema.

Each section of the TOML file becomes a table of its fields: name, type, default and the field's docstring
(pydantic makes each attribute docstring the field's schema description). `rlhpc config docs -o
docs/configuration.md` writes it; tests/test_config_docs.py fails when the file is stale or a field has no
docstring.
"""

from __future__ import annotations

import json
import re
from typing import Any

from rlhpc.config import json_schema

DOCS_PATH = "docs/configuration.md"
REGENERATE = f"rlhpc config docs -o {DOCS_PATH}"
"""The command that rewrites the reference (from the repository root)."""


def sections(schema: dict[str, Any] | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(dotted section name, its schema) of every table of the file, nested ones (`slurm.container`) right
    after their parent, in the order of the fields."""
    schema = schema or json_schema()
    defs = schema["$defs"]
    out: list[tuple[str, dict[str, Any]]] = []

    def walk(prefix: str, node: dict[str, Any]) -> None:
        for name, prop in node.get("properties", {}).items():
            ref = _ref(prop)
            if ref is None:
                continue
            section = defs[ref]
            path = f"{prefix}{name}"
            out.append((path, section))
            walk(f"{path}.", section)

    walk("", schema)
    return out


def undocumented(schema: dict[str, Any] | None = None) -> list[str]:
    """Dotted names of the fields without a docstring (no description in the schema)."""
    return [f"{path}.{name}" for path, section in sections(schema)
            for name, prop in section.get("properties", {}).items() if not prop.get("description", "").strip()]


def render(schema: dict[str, Any] | None = None) -> str:
    """docs/configuration.md's text."""
    schema = schema or json_schema()
    parts = [
        "# Configuration reference",
        "",
        f"<!-- Generated from the config schema by `{REGENERATE}`; do not edit by hand. -->",
        "",
        "A run is one TOML file; `rlhpc validate FILE` checks it and `rlhpc config show FILE` prints it with "
        "every default filled in. Each `[section]` below is a table of the file; inside a section a key may "
        "drop the section's own prefix (`[rollout] temperature` means `rollout_temperature`). Relative paths "
        "are relative to the config file. \"unset\": the field is optional and left out by default.",
        "",
        " · ".join(f"[`[{path}]`](#{_anchor(path)})" for path, _ in sections(schema)),
    ]
    for path, section in sections(schema):
        parts += ["", f"## [{path}]", ""]
        if description := _text(section.get("description", "")):
            parts += [description, ""]
        required = set(section.get("required", ()))
        parts += ["| field | type | default | description |", "| --- | --- | --- | --- |"]
        for name, prop in section.get("properties", {}).items():
            default = "required" if name in required else _default(prop)
            parts.append(f"| `{name}` | {_cell(_type(prop, path, name))} | {_cell(default)} | "
                         f"{_cell(_text(prop.get('description', '')))} |")
    return "\n".join(parts) + "\n"


def _ref(prop: dict[str, Any]) -> str | None:
    for option in [prop, *prop.get("anyOf", ())]:
        if "$ref" in option:
            return option["$ref"].rsplit("/", 1)[-1]
    return None


def _anchor(path: str) -> str:
    return re.sub(r"[^a-z0-9_-]", "", path.lower())


def _text(docstring: str) -> str:
    return " ".join(docstring.split())


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _type(prop: dict[str, Any], path: str = "", name: str = "") -> str:
    if "$ref" in prop:
        return f"table ([`[{path}.{name}]`](#{_anchor(f'{path}.{name}')}))"
    if "anyOf" in prop:
        options = [o for o in prop["anyOf"] if o.get("type") != "null"]
        return " or ".join(_type(o, path, name) for o in options)
    if "enum" in prop:
        return "one of " + ", ".join(f"`{json.dumps(v)}`" for v in prop["enum"])
    kind: str = prop.get("type") or "any"
    if kind == "array":
        return f"list of {_type(prop.get('items', {}))}" if prop.get("items") else "list"
    if kind == "object":
        values = prop.get("additionalProperties")
        return f"table of {_type(values)}" if isinstance(values, dict) else "table"
    if prop.get("format") == "path":
        return "path"
    if prop.get("format") == "password":
        return "string (secret)"
    bounds = [f"{sign} {_number(prop[key])}" for key, sign in (("exclusiveMinimum", ">"), ("minimum", "≥"),
                                                               ("exclusiveMaximum", "<"), ("maximum", "≤"))
              if key in prop]
    return " ".join([{"number": "float"}.get(kind, kind), ", ".join(bounds)]).strip()


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _default(prop: dict[str, Any]) -> str:
    if "default" not in prop or prop["default"] is None:
        return "unset"
    value = prop["default"]
    if value == {}:
        return "`{}`"
    return f"`{json.dumps(value)}`"
