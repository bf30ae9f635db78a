"""The top-level command line: help text teaches the MODEL forms, unknown commands fail."""
import subprocess
import sys

import pytest

from moefx.cli import main


def test_help_lists_model_forms(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for form in ("config.json", ".gguf", "package.module:factory", "smollm2"):
        assert form in out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: moefx" in capsys.readouterr().out


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_version_through_python_m():
    out = subprocess.run(
        [sys.executable, "-m", "moefx.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("moefx ")
