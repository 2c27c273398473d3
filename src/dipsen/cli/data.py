"""``dipsen data``: manage the embedded data sets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import console, data_app


@data_app.command("build-socofing-cache")
def build_socofing_cache_cmd(
    source: Annotated[Path, typer.Argument(help="SOCOFing Real folder or SOCOFing_Real.tar.gz")],
    out: Annotated[Path, typer.Option(help="Output .npz; use it with --data-dir (the embedded cache is never overwritten).")],
) -> None:
    """Regenerate the compact SOCOFing cache from the original BMP files."""
    from ..data import socofing

    path = socofing.build_socofing_cache(source, out)
    console.print(f"wrote {path}")
