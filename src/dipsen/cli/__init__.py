"""Command-line interface: a thin layer over dipsen's packages, one module per command group.

``app`` (app.py) holds the Typer application; train.py (train, show), data.py (data ...),
robustness.py (attack, reproduce, sweep-sigma), certify.py (certify) and poison.py (poison-study)
register their commands on it when imported here. User errors (bad files, bad values, bad run folders, flags click cannot
parse) are printed as one line, without traceback, with exit status 2.
"""

from __future__ import annotations

import importlib
import sys

import click
from rich.markup import escape

from ..errors import DipsenError
from .app import app, console, err_console

for _commands in ("train", "data", "robustness", "certify", "poison"):  # each registers its commands on app, in --help order
    importlib.import_module(f".{_commands}", __name__)

__all__ = ["app", "console", "main"]


def main() -> None:
    """Run the CLI; every user error, a flag click cannot parse included, is one line and exit code 2."""
    try:
        code = app(standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError:
        sys.exit(2)  # the help has been printed
    except click.UsageError as exc:
        where = f"{exc.ctx.command_path}: " if exc.ctx is not None else ""
        _fail(f"{where}{exc.format_message()} (see --help)")
    except click.Abort:
        _fail("aborted", 130)
    except DipsenError as exc:
        _fail(str(exc))
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str, code: int = 2) -> None:
    # escaped: a message's own brackets (pip install 'dipsen[tracking]') are text, not rich markup
    err_console.print(f"[red]error:[/] {escape(message)}", highlight=False, markup=True)
    sys.exit(code)
