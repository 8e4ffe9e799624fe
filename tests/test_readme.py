"""The README's examples run, and every command has help text and a README entry."""

import re
import shlex
from pathlib import Path

import pytest

from loratool.cli import COMMANDS, cli, main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _examples() -> list[str]:
    block = README.split("## Examples", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip().startswith("loratool ")]


def test_readme_starts_with_the_two_setup_commands():
    first = README.split("```bash", 1)[1].split("```", 1)[0].strip().splitlines()
    assert first[0].endswith("loratool demo")
    assert first[1].endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert first[1] in ci


def test_readme_examples_run(tmp_path, monkeypatch):
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    (tmp_path / "loratool").symlink_to(ROOT / "loratool")  # the shipped assets (tiny dataset)
    monkeypatch.chdir(tmp_path)
    examples = _examples()
    assert len(examples) >= 10
    for line in examples:
        assert main(shlex.split(line)[1:]) == 0, line


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help_and_a_readme_entry(name):
    command = cli.get_command(None, name)
    assert command.help and "Not implemented" not in command.help
    assert re.search(rf"`loratool {name}\b", README), f"README does not mention loratool {name}"
