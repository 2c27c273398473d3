"""The Typer application and the consoles every command prints to (commands live in the sibling modules)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

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


# a log line at least this often while a task moves without changing its description (certify's examples)
LOG_SECONDS = 30.0


class LoggedProgress(Progress):
    """The bar for a console that is not a terminal (a log file, a pipe, a batch job's output).

    rich draws a bar there only once, when it stops: a study sent to a log would show nothing for
    hours. This one also prints a plain line whenever a task's description changes (a new round, a
    new run of a grid) and otherwise at most every ``every`` seconds while it moves.
    """

    def __init__(
        self, *columns: Any, console: Console, every: float = LOG_SECONDS, get_time: Callable[[], float] | None = None
    ) -> None:
        super().__init__(*columns, console=console, get_time=get_time)
        self.every = every
        self._said: dict[TaskID, tuple[tuple[str, bool], float]] = {}  # per task: (description, finished) logged, when

    def update(self, task_id: TaskID, **changes: Any) -> None:  # type: ignore[override]
        super().update(task_id, **changes)
        self._log(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log(task_id)

    def _log(self, task_id: TaskID) -> None:
        task = next(t for t in self.tasks if t.id == task_id)
        state = (task.description, task.finished)
        said, when = self._said.get(task_id, (None, -math.inf))
        now = self.get_time()
        if state == said and now - when < self.every:
            return
        self._said[task_id] = (state, now)
        if task.total is None:
            done = f"{task.completed:g}"
        elif task.completed == int(task.completed):
            done = f"{task.completed:g}/{task.total:g}"
        else:  # a fraction of a unit done (a grid's runs, counted by rounds)
            done = f"{task.percentage:.0f}%"
        elapsed = time.strftime("%H:%M:%S", time.gmtime(task.elapsed or 0))
        self.console.print(f"{task.description}  {done}  {elapsed}", markup=False, highlight=False)


def progress_bar(remaining: bool = True, on: Console = console) -> Progress:
    """The bar every long command draws: description, bar, done/total, elapsed (and remaining) time.

    Off a terminal, a :class:`LoggedProgress`: the same bar at the end, and plain lines as it goes.
    """
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    columns += [TimeRemainingColumn()] if remaining else []
    return Progress(*columns, console=on) if on.is_terminal else LoggedProgress(*columns, console=on)


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
