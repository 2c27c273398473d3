"""The documentation's generated reference: the CLI as a click command, and every config key as a Markdown table.

``command`` is what ``mkdocs-click`` renders (docs/reference/cli.md); :func:`config_table` is what the
documentation build (docs/hooks.py) writes into docs/reference/config.md, from :data:`dipsen.config.SCHEMA`,
:class:`~dipsen.config.TrainConfig`'s defaults and ``dipsen train``'s option help, so neither can drift from
the code.
"""

from __future__ import annotations

import click
import typer.main

from ..config import SCHEMA, Rule, TrainConfig
from . import app

command: click.Command = typer.main.get_command(app)


def accepts(rule: Rule) -> str:
    """What a key accepts, in words: its choices, or its type and range; "or none" where it may be unset."""
    text = "one of " + ", ".join(f"`{c}`" for c in rule.choices()) if rule.choices is not None else rule.describe()
    return text + " (or none)" if rule.optional else text


def default(name: str) -> str:
    """The built-in value of a key as TOML would spell it; ``none`` for an unset one (its meaning says what that means)."""
    value = TrainConfig.__dataclass_fields__[name].default
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def _train_options() -> dict[str, click.Option]:
    assert isinstance(command, click.Group)
    return {p.name: p for p in command.commands["train"].params if isinstance(p, click.Option) and p.name}


def config_table() -> str:
    """Every key of the training config: its flag, what it accepts, its default and its meaning (the flag's help)."""
    options = _train_options()
    rows = ["| key | flag | accepts | default | meaning |", "|---|---|---|---|---|"]
    for name, rule in SCHEMA.items():
        option = options.get(name)
        flag = f"`{option.opts[0]}`" if option is not None else "—"
        meaning = " ".join((option.help or "—").split()) if option is not None else "—"
        rows.append(f"| `{name}` | {flag} | {accepts(rule)} | `{default(name)}` | {meaning.replace('|', '&#124;')} |")
    return "\n".join(rows) + "\n"
