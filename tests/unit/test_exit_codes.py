"""A command that stops on an error exits with its kind's code (2: what the user gave is wrong, 3: no stack
is up, 4: this machine lacks a tool) and says why in one line, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadgen.__main__ import main as loadgen_main
from services.contracts.errors import ConfigError, MissingTool, StackNotUp, TierlabError
from services.stack.containers import NoDockerAccess
from services.stack.docker import DockerUnavailable


def test_each_kind_of_error_has_its_exit_code() -> None:
    assert TierlabError("x").exit_code == 1
    assert ConfigError("x").exit_code == 2
    assert StackNotUp("x").exit_code == 3
    assert MissingTool("x").exit_code == 4
    assert isinstance(NoDockerAccess("x"), MissingTool) and isinstance(DockerUnavailable("x"), MissingTool)


def test_no_stack_exits_3_and_says_make_up(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = loadgen_main(["run", "--spec", "quick", "--state", str(tmp_path / "stack.json"),
                         "--results", str(tmp_path / "results")])  # fmt: skip
    assert code == 3
    printed = capsys.readouterr()
    assert "no stack is up" in printed.out + printed.err and "make up" in printed.out + printed.err
    assert "Traceback" not in printed.out + printed.err


def test_the_loadgen_with_a_bad_spec_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "spec.yaml").write_text("name: broken\nscenarios: 12\n")
    code = loadgen_main(["run", "--spec", str(tmp_path / "spec.yaml"), "--state", str(tmp_path / "stack.json"),
                         "--results", str(tmp_path / "results")])  # fmt: skip
    assert code == 2
