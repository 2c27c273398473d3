"""README's and the documentation site's commands are true to the code: every ``dipsen ...`` line of every page
parses, with values the command accepts, every script named exists with the flags it is given, the defaults the
pages state are the config's, and the run folder holds the files and JSON keys its reference page names."""

import functools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer.main

from dipsen.cli import app
from dipsen.config import SCHEMA, TrainConfig, load_config

ROOT = Path(__file__).parents[1]
# README and every page of the site, not the committed study outputs (docs/study-*, docs/poison-study-*)
PAGES = [ROOT / "README.md"] + sorted(
    p for p in (ROOT / "docs").rglob("*.md") if not p.relative_to(ROOT / "docs").parts[0].startswith(("study-", "poison-study-"))
)
README = "\n\n".join(p.read_text() for p in PAGES)


def _commands(program: str) -> list[str]:
    """``program ...`` lines of the pages' bash blocks (continuations joined, comments cut) and inline code spans."""
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


def _validate(name: str, values: dict) -> None:
    """Check the values as the command does before it runs anything (a DipsenError or ConfigError if it would refuse)."""
    from dipsen.errors import DipsenError
    from dipsen.report.scheduling import check_address

    if values.get("ray_address") is not None:
        check_address(values["ray_address"])

    if name == "train" and values["resume"] is None:
        options = {k: v for k, v in values.items() if k not in ("config", "out", "resume")}
        load_config(values["config"], options)  # the values the training would run with pass validation
    elif name == "attack":
        from dipsen.attack import ADAPTIVE_BUDGET, PAPER_BUDGET, AttackSetup

        assert values["protocol"] in ("paper", "adaptive"), values["protocol"]
        budget = PAPER_BUDGET if values["protocol"] == "paper" else ADAPTIVE_BUDGET
        gradient = values["gradient"] or ("eot" if values["protocol"] == "adaptive" else "draw")
        sweep = [float(e) for e in values["eps_sweep"].split(",")] if values["eps_sweep"] else [values["eps"]]
        for eps in sweep:
            AttackSetup(values["attack"], eps, values["threat"], gradient, values["eot_draws"], budget)
    elif name == "certify":
        from dipsen.certify.evaluate import CertifySettings

        radii = tuple(float(r) for r in values["radii"].split(","))
        settings = (values["method"], values["sigma"], values["n0"], values["n"], values["alpha"], values["samples"], radii)
        CertifySettings(*settings, values["seed"]).validate()
    elif name == "poison-study" and values["resume"] is None:
        from dipsen.report.poisoning import DEFAULT_AGGREGATORS, DEFAULT_ATTACKS, DEFAULT_FRACTIONS, study_options

        names = ("model", "rounds", "clients", "fraction", "local_epochs", "train_subset", "test_subset", "partition")
        train = {k: values[k] for k in (*names, "dirichlet_alpha")}
        split = lambda text: text.split(",") if text else None  # noqa: E731
        fractions = [float(f) for f in values["fractions"].split(",")] if values["fractions"] else DEFAULT_FRACTIONS
        aggregators = split(values["aggregators"]) or DEFAULT_AGGREGATORS
        attacks = split(values["attacks"]) or DEFAULT_ATTACKS
        dataset = values["dataset"] or "mnist"
        study_options(dataset, attacks, aggregators, fractions, target_accuracy=values["target_accuracy"], train=train)
    elif name == "reproduce":
        from dipsen.report.paper import DATASETS

        assert set((values["datasets"] or ",".join(DATASETS)).split(",")) <= set(DATASETS), values["datasets"]
        load_config(None, {"train_dtype": values["train_dtype"]})  # the dtype every run of the study trains with
    elif name == "sweep-sigma" and values["resume"] is None:
        if values["dataset"] not in (None, "mnist", "socofing", "ctu13"):
            raise DipsenError(f"unknown data set {values['dataset']}")
        for sigma in (values["sigmas"] or "0").split(","):
            SCHEMA["sigma"].check("sigma", float(sigma))


@pytest.mark.parametrize("line", DIPSEN_LINES)
def test_every_dipsen_command_on_every_page_parses_and_validates(monkeypatch, line):
    monkeypatch.chdir(ROOT)  # the pages' paths are relative to the repository
    name, values = _dry_run(_concrete(line))
    _validate(name, values)


def _leaves(command: click.Command) -> set[str]:
    if isinstance(command, click.Group):
        return {name for sub in command.commands.values() for name in _leaves(sub)}
    return {command.name or ""}


def test_the_pages_show_every_command():
    shown = {_dry_run(_concrete(line))[0] for line in DIPSEN_LINES} - {"help"}
    assert shown == _leaves(typer.main.get_command(app))


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


def _stated_defaults() -> list[tuple[str, str]]:
    """(flag, default) from the pages' ``| option | default | meaning |`` tables; a cell of n flags has n defaults."""
    stated = []
    for table in re.findall(r"\| option \| default \| meaning \|\n\|---\|---\|---\|\n((?:\|.*\n)+)", README):
        for row in table.splitlines():
            flags_cell, default_cell = (cell.strip() for cell in row.strip("|").split(" | ")[:2])
            flags = re.findall(r"`(--[a-z0-9-]+)`", flags_cell)
            defaults = [d.strip() for d in default_cell.split(", ")]
            if len(flags) == len(defaults):
                stated += zip(flags, defaults, strict=True)
    return stated


def _literal(text: str) -> object:
    """A stated default as a value, or ``...`` where the page describes it in words ("one per core")."""
    words = {"none": None, "off": False, "on": True}
    if text in words:
        return words[text]
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return text if re.fullmatch(r"[a-z0-9-]+", text) else ...


def test_every_default_the_pages_state_is_the_configs():
    checked = 0
    for flag, text in _stated_defaults():
        key = flag[2:].replace("-", "_")
        value = _literal(text)
        if key not in SCHEMA or value is ...:
            continue
        default = TrainConfig.__dataclass_fields__[key].default
        if isinstance(default, str):
            value = text
        elif isinstance(value, str):
            continue  # a word for a computed default ("derived", "all")
        if isinstance(value, float) and not isinstance(default, bool) and default is not None:
            assert float(default) == value, (flag, text, default)
        else:
            assert default == value, (flag, text, default)
        checked += 1
    assert checked >= 30  # the options tables state most defaults in a checkable form


def test_the_config_reference_lists_every_key_with_its_default():
    from dipsen.cli.reference import config_table, default

    table = config_table()
    for key in SCHEMA:
        assert f"| `{key}` |" in table and f"| `{default(key)}` |" in table
    assert "<!-- generated: config table -->" in (ROOT / "docs/reference/config.md").read_text()


def _json_keys(value: object) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _json_keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _json_keys(v)}
    return set()


def test_the_run_folder_holds_the_files_and_keys_its_page_names(mnist, tmp_path):
    """A one-round run with adversarial training (for best_robust.pt and robust_accuracy) on a small subset."""
    from dipsen.federated import RunDir
    from dipsen.federated.engine import FederatedTraining, train

    page = (ROOT / "docs/reference/run-folder.md").read_text()
    (tree,) = re.findall(r"```\n(runs/.*?)```", page, re.S)
    small = dict(dataset="mnist", model="cnn", clients=4, fraction=0.5, rounds=1, train_subset=400, test_subset=100, workers=1)
    config = TrainConfig(**small, adv_train="fgsm-rs", robust_monitor_steps=2, robust_monitor_samples=20).validate()
    run = RunDir.create(tmp_path, config)
    train(FederatedTraining(config, mnist), run)
    files = [p.relative_to(run.path).as_posix() for p in run.path.rglob("*") if p.is_file()]
    keys = set()
    for name in files:
        if name.endswith(".json"):
            keys |= _json_keys(json.loads((run.path / name).read_text()))
        elif name.endswith(".jsonl"):
            keys |= {k for line in (run.path / name).read_text().splitlines() for k in _json_keys(json.loads(line))}
    named_files = re.findall(r"^  (\S+)", tree, re.M)
    for name in named_files:
        if name == "flower.log":  # Flower runs only
            continue
        pattern = re.escape(name).replace("NNNN", r"\d{4}")
        assert any(re.fullmatch(pattern, f) for f in files), (name, files)
    keys |= set(__import__("torch").load(run.path / "best_robust.pt", weights_only=True))
    named_keys = set(re.findall(r"(?<![-\w])([a-z]+(?:_[a-z0-9]+)+)(?![\w.])", tree)) - {"keep_checkpoints"}
    assert named_keys and not named_keys - keys, sorted(named_keys - keys)
