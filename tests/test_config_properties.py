"""Property-based: generated TOML configs, `--set` values and command lines, fed to `rlhpc validate`, `config`
and `render` in-process, end in an exit code and error lines, never a traceback; and a value a field's own
validation refuses is never accepted, whichever way it comes in. Bounded and derandomized, so CI runs the same
examples every time."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError
from typer.testing import CliRunner

from conftest import MINIMAL
from rlhpc.cli import app
from rlhpc.config import HOOK_FIELDS, Config, _section_models, load_config

EXAMPLES = settings(max_examples=120, derandomize=True, database=None, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

FIELDS = [(section, name) for section, model in _section_models(Config).items() for name in model.model_fields]

SAFE_FIELDS = [(s, n) for s, n in FIELDS
               if s not in ("run", "ckpt") and n not in HOOK_FIELDS and "path" not in n and "data" not in n]
"""What a command line may set where `render` writes: never where the run folder or any file lies, nor a hook
(imported by `validate --strict`)."""

INT64 = st.integers(-(2**63), 2**63 - 1)
SCALARS = st.one_of(
    st.booleans(), INT64, st.sampled_from([0, -1, 1, 2**31, 10**12]),
    st.floats(), st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-300, 1e300]),
    st.text(max_size=12), st.sampled_from(["", "auto", "nan", "1", "a\nb", "x;y", "$(id)", "~/x", "/"]),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(min_size=1, max_size=6), SCALARS,
                                                                             max_size=2))


def inline(value: Any) -> str:
    """`value` as the TOML text after `key =`."""
    return tomli_w.dumps({"v": value}).partition("=")[2].strip()


LITERALS = st.one_of(st.one_of(SCALARS, st.lists(SCALARS, max_size=3)).map(inline), st.text(max_size=16))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A valid config whose run folder lies in a folder of the test's own."""
    folder = tmp_path_factory.mktemp("props")
    (folder / "train.jsonl").write_text('{"input": "1+1=", "label": "2"}\n')
    (folder / "model").mkdir()
    path = folder / "run.toml"
    path.write_text(MINIMAL + f'\n[run]\noutput_dir = "{folder / "runs"}"\n')
    load_config(path)
    return path


def invoke(args: list[str]):
    result = CliRunner().invoke(app, args)
    # typer's usage errors and rlhpc's own end in SystemExit; anything else escaped the one error path
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.output)
    assert result.exit_code in (0, 2), (args, result.exit_code, result.output)
    assert "Traceback" not in result.output, (args, result.output)
    return result


def as_set(literal: str) -> Any:
    """What `--set key=literal` gives the field: the literal read as TOML, else the text itself."""
    try:
        return tomllib.loads(f"v = {literal.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        return literal.strip()


def alone(base: Path, section: str, name: str, value: Any) -> BaseModel | None:
    """The valid config's section with `value` assigned to `name` by the field's own validation (with the
    section's own checks), or None if it refuses the value."""
    current = getattr(load_config(base), section)
    try:
        return type(current).__pydantic_validator__.validate_assignment(
            current.model_copy(), name, value, context={"base_dir": base.parent.resolve()})
    except (ValidationError, ValueError, TypeError):
        return None


def same(a: Any, b: Any) -> bool:
    return a == b or repr(a) == repr(b)  # NaN inside free-form values is not equal to itself


def check_field(base: Path, config: Path, result, section: str, name: str, value: Any,
                overrides: list[str] = ()) -> None:
    """Refused alone → refused, naming the field; accepted by the command → the field holds the value."""
    expected = alone(base, section, name, value)
    if expected is None:
        assert result.exit_code == 2 and f"{section}.{name}" in result.output, (section, name, value, result.output)
    elif result.exit_code == 0:
        loaded = getattr(load_config(config, list(overrides)), section)
        assert same(getattr(loaded, name), getattr(expected, name)), (section, name, value)


@EXAMPLES
@given(field=st.sampled_from(FIELDS), literal=LITERALS)
def test_set_values(base, field, literal):
    section, name = field
    override = f"{section}.{name}={literal}"
    result = invoke(["validate", str(base), "--set", override])
    check_field(base, base, result, section, name, as_set(literal), [override])


@EXAMPLES
@given(field=st.sampled_from(FIELDS), value=VALUES,
       stray=st.one_of(st.none(), st.tuples(st.sampled_from([*_section_models(Config), "nowhere"]),
                                            st.from_regex(r"[a-z_]{1,12}", fullmatch=True), SCALARS)))
def test_toml_files(base, field, value, stray):
    section, name = field
    data = tomllib.loads(base.read_text())
    data.setdefault(section, {})[name] = value
    if stray is not None:  # a second key, often unknown: every problem is reported, none hides another
        stray_section, key, stray_value = stray
        data.setdefault(stray_section, {}).setdefault(key, stray_value)
    path = base.with_name("mutated.toml")
    path.write_text(tomli_w.dumps(data))
    result = invoke(["validate", str(path)])
    check_field(base, path, result, section, name, value)


@EXAMPLES
@given(content=st.one_of(st.binary(max_size=64), st.text(max_size=64)))
def test_arbitrary_files(base, content):
    path = base.with_name("garbage.toml")
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert invoke(["validate", str(path)]).exit_code == 2 or tomllib.loads(path.read_text())


@EXAMPLES
@given(data=st.data())
def test_command_lines(base, data):
    folder = base.parent
    before = base.read_text()
    command = data.draw(st.sampled_from([["validate"], ["config", "show"], ["config", "schema"], ["render"]]))
    config = data.draw(st.sampled_from([str(base), str(folder / "missing.toml"), str(folder), str(folder / "model")]))
    overrides = data.draw(st.lists(st.tuples(st.sampled_from(SAFE_FIELDS), LITERALS), max_size=2))
    options = data.draw(st.lists(st.one_of(
        st.tuples(st.sampled_from(["--nodes", "-N"]), st.one_of(st.integers(-2, 10**6).map(str), st.text(max_size=4))),
        st.tuples(st.sampled_from(["-o", "--output"]), st.sampled_from(
            [str(folder / "out.sh"), "/nonexistent-rlhpc/x.sh", str(folder)])),
        st.sampled_from([("--strict",), ("--force",), ("--no-such-option",), ("--set", "no-equals-sign")]),
    ), max_size=3))
    args = [*command, *([] if command == ["config", "schema"] else [config])]
    for (section, name), literal in overrides:
        args += ["--set", f"{section}.{name}={literal}"]
    for option in options:
        args += list(option)
    invoke(args)
    assert base.read_text() == before, "a command wrote over the user's own config"
