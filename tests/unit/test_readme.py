"""The README is a guide that runs as written: at most 300 lines, the two commands first, every `make` command
in it a real target with its variables (dry-run with `make -n`), every Python command's options real, every
link to a file of the repository alive, and no commit hash in the prose of the README or docs/."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
ENV_ASSIGNMENT = re.compile(r"^[A-Z_]+=\S+$")


def _shell_lines(text: str) -> list[str]:
    """The commands of every ```bash block: comments dropped, `a && b` split."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            command = line.split(" #")[0].strip()
            commands += [part.strip() for part in command.split("&&") if part.strip()]
    return commands


def _without_env(command: str) -> list[str]:
    words = shlex.split(command.replace("<node 1>", "node1"))
    while words and ENV_ASSIGNMENT.match(words[0]):
        words.pop(0)
    return words


def test_the_readme_is_a_guide_that_opens_with_the_two_commands() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    first = _shell_lines(text)[:3]
    assert first == ["make up", "make bench", "make test"], first


def test_every_make_command_in_the_readme_is_a_target_with_its_variables() -> None:
    commands = [_without_env(c) for c in _shell_lines(README.read_text())]
    makes = [words for words in commands if words and words[0] == "make"]
    assert len(makes) > 20
    for words in makes:
        done = subprocess.run(["make", "-n", *words[1:]], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              check=False)  # fmt: skip
        assert done.returncode == 0, (words, done.stderr[-500:])
        assert "No rule to make target" not in done.stderr, words


def test_every_python_command_in_the_readme_takes_the_options_it_is_given() -> None:
    commands = [_without_env(c) for c in _shell_lines(README.read_text())]
    pythons = [words for words in commands if words and words[0].endswith("python") and words[1] == "-m"]
    assert pythons
    for words in pythons:
        module, subcommand = words[2], words[3]
        done = subprocess.run([sys.executable, "-m", module, subcommand, "--help"], cwd=ROOT, capture_output=True,
                              text=True, timeout=120, check=False)  # fmt: skip
        assert done.returncode == 0, (words, done.stderr[-500:])
        for option in (w for w in words[4:] if w.startswith("--")):
            assert option in done.stdout, (option, words)


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_links_to_the_repository_resolve_and_no_commit_hash_is_in_the_prose(page: Path) -> None:
    text = page.read_text()
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (page.parent / target).exists(), f"{page.name} links {target}, which does not exist"
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    hashes = [h for h in re.findall(r"\b[0-9a-f]{7,40}\b", prose) if re.search(r"[a-f]", h) and re.search(r"\d", h)]
    assert not hashes, f"{page.name} names commits: {hashes}"
    assert "../shared" not in text, "a link outside the repository"
