"""The Typer application and the consoles every command prints to (commands live in the sibling modules)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..errors import ConfigError

if TYPE_CHECKING:
    import torch

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


DEVICE_HELP = (
    "auto | cpu | cuda: where the models run (auto: CUDA if torch sees a GPU, else the CPU; cuda without one is an "
    "error). The CUDA path is untested on a GPU."
)


def device_option(name: str) -> torch.device:
    """The device of a command's ``--device NAME`` (:func:`dipsen.device.resolve_device`); its error names the flag."""
    from ..device import resolve_device  # imports torch: not at the CLI's start

    try:
        return resolve_device(name)
    except ConfigError as exc:
        raise ConfigError(f"--{exc}", "device") from None
