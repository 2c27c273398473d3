"""The Typer application and the consoles every command prints to (commands live in the sibling modules)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="Federated CNN / DiPSeN training and robustness evaluation.",
)
data_app = typer.Typer(no_args_is_help=True, help="Manage the embedded data sets.")
app.add_typer(data_app, name="data")
console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def progress_bar(remaining: bool = True) -> Progress:
    """The bar every long command draws: description, bar, done/total, elapsed (and remaining) time."""
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    return Progress(*columns, *([TimeRemainingColumn()] if remaining else []), console=console)
