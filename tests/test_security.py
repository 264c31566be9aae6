"""Hostile or careless input (issue #21, security): nothing from a config, a command line or a run folder runs a
command, signals a process or reads a file it was not meant to."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import MINIMAL
from rlhpc.cli import app
from rlhpc.config import ConfigError, load_config

runner = CliRunner()


def problems_of(path: Path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, list(overrides))
    return str(e.value)


@pytest.mark.parametrize("table, field", [
    ('[slurm.additional_parameters]\n"reservation=rl\\ntouch /tmp/pwned #" = "x"\n', "slurm.additional_parameters"),
    ('[slurm.additional_parameters]\n"--gres" = "gpu:1"\n', "slurm.additional_parameters"),
    ('[slurm.additional_parameters]\nreservation = "rl\\ntouch /tmp/pwned"\n', "slurm.additional_parameters"),
    ('[slurm.env]\n"A;touch /tmp/pwned;B" = "1"\n', "slurm.env"),
    ('[slurm.env]\nTOKEN = "x\\ntouch /tmp/pwned"\n', "slurm.env"),
    ('[slurm]\npartition = "gpu\\ntouch /tmp/pwned"\n', "slurm.partition"),
    ('[run]\noutput_dir = "runs/x\\ntouch /tmp/pwned"\n', "run.output_dir"),
])
def test_what_could_put_a_command_into_the_batch_script_is_refused_by_validate(write_config, table, field):
    path = write_config(MINIMAL + table)
    assert field in problems_of(path)
    result = runner.invoke(app, ["validate", str(path)], terminal_width=400)
    assert result.exit_code == 2 and field in result.output


def test_sbatch_option_names_that_slurm_knows_still_pass(write_config):
    cfg = load_config(write_config(MINIMAL + '[slurm.additional_parameters]\nreservation = "rl"\n'
                                   'mail-type = "END"\ngres = "gpu:8"\nhint = "nomultithread"\n'))
    assert cfg.slurm.additional_parameters["mail-type"] == "END"


def test_render_refuses_an_output_path_that_would_end_the_header_comment(write_config, tmp_path):
    path = write_config(MINIMAL + f'[run]\noutput_dir = "{tmp_path / "run"}"\n')
    result = runner.invoke(app, ["render", str(path), "-o", str(tmp_path / "x\ntouch pwned")], terminal_width=400)
    assert result.exit_code == 2 and "--output" in result.output and "control character" in result.output
    assert not (tmp_path / "x\ntouch pwned").exists()
