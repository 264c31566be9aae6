"""The run's TOML file: the whole-file model, loading with `--set` overrides, and errors a person can act on.

Errors name the file, the line, the field path (`rollout.n_samples_per_prompt`) and the reason; unknown
keys get a did-you-mean. Inside a section a key may drop the section's own prefix: `[rollout] temperature`
means `rollout_temperature` and `[sglang] mem_fraction_static` means `sglang_mem_fraction_static`.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import BaseModel, ValidationError, model_validator
from pydantic_core import ErrorDetails

from hpc.config import RayConfig, SlurmConfig
from rl.config import ConfigFieldsError, RLConfig


class Config(RLConfig):
    """A run's whole configuration: the learning sections plus the cluster ones."""

    slurm: SlurmConfig = SlurmConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _actors_fit_allocation(self) -> Config:
        if self.perf.actor_num_nodes > self.slurm.nodes:
            raise ConfigFieldsError(
                ("perf.actor_num_nodes", "slurm.nodes"),
                f"the training workers span {self.perf.actor_num_nodes} nodes but the job allocates "
                f"{self.slurm.nodes}; raise slurm.nodes (--nodes) or lower perf.actor_num_nodes")
        return self


@dataclass(frozen=True)
class Problem:
    field: str
    message: str
    line: int | None = None
    origin: str | None = None
    """Where the value came from when not the file: the `--set` override."""


class ConfigError(Exception):
    """An invalid configuration: every problem found, each with its field, file and line."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        out = []
        for p in self.problems:
            where = p.origin or (f"{self.source}:{p.line}" if p.line else self.source)
            out.append(f"{where}: {p.field}: {p.message}")
        return out


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read, override and validate a run's TOML file. Raises ConfigError naming every problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(str(path), [Problem("(file)", f"cannot read the config: {e.strerror}")]) from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), [Problem("(file)", "not a text file (a TOML config is UTF-8 text)")]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        line = getattr(e, "lineno", None) or _line_from_message(str(e))
        raise ConfigError(str(path), [Problem("(syntax)", f"not valid TOML: {e}", line)]) from None
    origins: dict[str, str] = {}
    for item in overrides:
        key = apply_override(data, item)
        origins[key] = f"--set {item}"
    data = _expand_section_prefixes(data, Config)
    origins = {_canonical_path(k, Config): v for k, v in origins.items()}
    run = data.setdefault("run", {})
    if isinstance(run, dict):
        run.setdefault("name", path.stem)
    try:
        return Config.model_validate(data, context={"base_dir": path.parent.resolve()})
    except ValidationError as e:
        raise ConfigError(str(path), _problems(e, text, origins)) from None


HOOK_FIELDS = ("custom_rm_path", "custom_generate_function_path", "dynamic_sampling_filter_path",
               "buffer_filter_path")


def input_problems(cfg: Config) -> list[Problem]:
    """What `validate --strict` finds beyond the config: hooks that do not load and prompt files that do not
    read, as the run would load and read them (a path missing here is `missing_paths`'s to report)."""
    from rl.data import DataError, PromptDataset
    from rl.hooks import load_function

    r, problems = cfg.rollout, []
    for name in HOOK_FIELDS:
        if (hook := getattr(r, name)) is None:
            continue
        try:
            load_function(hook)
        except ValueError as e:
            problems.append(Problem(f"rollout.{name}", str(e)))
        except Exception as e:  # the hook's module itself failed while it was imported
            problems.append(Problem(f"rollout.{name}", f"hook {hook!r}: {type(e).__name__}: {e}"))
    tokenizer = None
    if r.apply_chat_template and cfg.ckpt.hf_checkpoint.exists():
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(cfg.ckpt.hf_checkpoint)
        except Exception as e:  # transformers raises OSError, ValueError or its own for a folder it cannot read
            problems.append(Problem("ckpt.hf_checkpoint", f"cannot load the tokenizer for the chat template: {e}"))
    for field, path, input_key, label_key in cfg.prompt_files():
        if not path.exists() or (r.apply_chat_template and tokenizer is None):
            continue
        try:
            PromptDataset(path, input_key=input_key, label_key=label_key, metadata_key=r.metadata_key,
                          tokenizer=tokenizer, apply_chat_template=r.apply_chat_template,
                          chat_template_kwargs=r.apply_chat_template_kwargs)
        except DataError as e:
            problems.append(Problem(field, str(e)))
    return problems


def apply_override(data: dict[str, Any], item: str) -> str:
    """Apply one `section.key=value` to the raw TOML data; the value is read as TOML, else as a string."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", key):
        raise ConfigError("--set", [Problem(key or item, "expected --set section.key=value", origin=f"--set {item}")])
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError("--set", [Problem(key, f"{part} is not a table", origin=f"--set {item}")])
        node = child
    node[leaf] = value
    return key


def dump_toml(config: BaseModel) -> str:
    """The resolved configuration as TOML, every default filled (unset optional fields are left out)."""
    return tomli_w.dumps(config.model_dump(mode="json", exclude_none=True))


def json_schema() -> dict[str, Any]:
    return Config.model_json_schema()


def _section_models(model: type[BaseModel]) -> dict[str, type[BaseModel]]:
    out = {}
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out[name] = ann
    return out


def _expand_section_prefixes(data: dict[str, Any], model: type[BaseModel]) -> dict[str, Any]:
    """`[rollout] temperature` → `rollout_temperature` where only the prefixed name is a field."""
    sections = _section_models(model)
    for name, section in sections.items():
        table = data.get(name)
        if not isinstance(table, dict):
            continue
        data[name] = {_prefixed(name, k, section): v for k, v in table.items()}
    return data


def _prefixed(section: str, key: str, model: type[BaseModel]) -> str:
    if key not in model.model_fields and f"{section}_{key}" in model.model_fields:
        return f"{section}_{key}"
    return key


def _canonical_path(dotted: str, model: type[BaseModel]) -> str:
    section, _, rest = dotted.partition(".")
    sub = _section_models(model).get(section)
    if sub is None or "." in rest:
        return dotted
    return f"{section}.{_prefixed(section, rest, sub)}"


def _problems(error: ValidationError, text: str, origins: dict[str, str]) -> list[Problem]:
    problems = []
    for err in error.errors():
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, ConfigFieldsError):
            fields = cause.fields
            message = str(cause)
        else:
            fields = (".".join(str(p) for p in err["loc"]) or "(top)",)
            message = _message(err)
        line = next((ln for f in fields if (ln := locate(text, f)) is not None), None)
        origin = next((origins[f] for f in fields if f in origins), None)
        problems.append(Problem(" / ".join(fields), message, line, origin))
    return problems


def _message(err: ErrorDetails) -> str:
    if err["type"] == "extra_forbidden":
        *parent, key = [str(p) for p in err["loc"]]
        candidates = _keys_at(parent)
        close = difflib.get_close_matches(str(key), candidates, n=1, cutoff=0.6)
        hint = f"; did you mean {'.'.join([*parent, close[0]])!r}?" if close else ""
        where = f"[{'.'.join(parent)}]" if parent else "the top level"
        return f"unknown key {key!r} in {where}{hint}"
    if err["type"] == "missing":
        return "required, but not given"
    value = err.get("input")
    shown = "" if isinstance(value, (dict, list)) or value is None else f" (got {value!r})"
    return f"{err['msg']}{shown}"


def _keys_at(parent: list[str]) -> list[str]:
    model: type[BaseModel] = Config
    for part in parent:
        section = _section_models(model).get(part)
        if section is None:
            return []
        model = section
    return list(model.model_fields)


def locate(text: str, dotted: str) -> int | None:
    """1-based line where `dotted` (section.key) is set in the TOML text; the section header if the key is not."""
    section, _, key = dotted.partition(".")
    key = key.split(".")[0]
    current, header_line = None, None
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if m := re.match(r"^\[\s*([^\]]+?)\s*\]", stripped):
            current = m.group(1)
            if current == section:
                header_line = n
            continue
        if m := re.match(r"^([A-Za-z0-9_.\"-]+)\s*=", stripped):
            k = m.group(1).strip('"')
            if current == section and k in (key, key.removeprefix(f"{section}_")):
                return n
            if current is None and k in (f"{section}.{key}", section):
                return n
    return header_line


def _line_from_message(message: str) -> int | None:
    m = re.search(r"line (\d+)", message)
    return int(m.group(1)) if m else None
