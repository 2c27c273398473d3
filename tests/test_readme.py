"""README's commands are true to the code: every ``dipsen ...`` line parses, with values the config accepts,
and every script it names exists with the flags it is given."""

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer.main

from dipsen.cli import app
from dipsen.config import load_config

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def _commands(program: str) -> list[str]:
    """``program ...`` lines of README's bash blocks (continuations joined, comments cut) and inline code spans."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith(program + " "):
                found.append(line)
    spans = (" ".join(span.split()) for span in re.findall(rf"`({re.escape(program)} [^`]+)`", README))
    found += [span for span in spans if " --" in span or program == "python"]  # not names alone (`dipsen attack`)
    return sorted(set(found))


def _concrete(line: str) -> list[str]:
    """The synopsis made runnable: ``{a,b}`` takes ``a``, ``[...]`` (optional parts) is kept."""
    line = re.sub(r"\{([^,}]+)(,[^}]*)?\}", r"\1", line)
    return shlex.split(line.replace("[", " ").replace("]", " "))[1:]


def _dry_run(args: list[str]) -> tuple[str, dict]:
    """Parse ``dipsen ARGS`` as the CLI does (click converts every value) but call nothing: (command, values)."""
    called: list[tuple[str, dict]] = []
    root = typer.main.get_command(app)

    def stub(command: click.Command) -> None:
        if isinstance(command, click.Group):
            for sub in command.commands.values():
                stub(sub)
        else:
            command.callback = lambda **values: called.append((command.name or "", values))

    stub(root)
    root.main(args, prog_name="dipsen", standalone_mode=False)
    if "--help" in args:
        return "help", {}
    (call,) = called
    return call


DIPSEN_LINES = _commands("dipsen")


def test_readme_shows_the_main_commands():
    assert any(line.startswith("dipsen train") for line in DIPSEN_LINES)
    assert any(line.startswith("dipsen attack") for line in DIPSEN_LINES)
    assert any(line.startswith("dipsen reproduce") for line in DIPSEN_LINES)


@pytest.mark.parametrize("line", DIPSEN_LINES)
def test_every_dipsen_command_in_the_readme_parses(monkeypatch, line):
    monkeypatch.chdir(ROOT)  # README's paths are relative to the repository
    name, values = _dry_run(_concrete(line))
    if name == "train" and values["resume"] is None:
        options = {k: v for k, v in values.items() if k not in ("config", "out", "resume")}
        load_config(values["config"], options)  # the values the training would run with pass validation


SCRIPT_LINES = [line for line in _commands("python") if line.split()[1].startswith(("benchmarks/", "scripts/"))]


def test_readme_names_the_benchmark_scripts():
    assert len(SCRIPT_LINES) >= 5


@pytest.mark.parametrize("line", SCRIPT_LINES)
def test_every_script_in_the_readme_exists_with_its_flags(line):
    script, *args = shlex.split(line)[1:]
    assert (ROOT / script).is_file()
    flags = [a for a in args if a.startswith("--")]
    if flags:  # the script's own parser lists them
        shown = _script_help(script)
        assert not [f for f in flags if f not in shown.split()], shown


@functools.cache
def _script_help(script: str) -> str:
    """``python SCRIPT --help``, once per script (README names some several times; each start-up costs seconds)."""
    shown = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    return shown.stdout
