"""``dipsen certify``: certified robustness of a run's final global model (see dipsen.certify)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import DipsenError
from .app import DEVICE_HELP, app, console, device_option, progress_bar


@app.command()
def certify(
    run_dir: Annotated[Path, typer.Argument(help="A trained run folder.")],
    method: Annotated[str, typer.Option(help="smoothing (Cohen et al.) | pixeldp (the noise layer's certificate)")] = "smoothing",
    sigma: Annotated[
        float | None, typer.Option(help="Smoothing noise std (default: the run's --input-noise).", show_default=False)
    ] = None,
    n0: Annotated[int, typer.Option(help="Draws that select the class (smoothing).")] = 100,
    n: Annotated[int, typer.Option(help="Draws that bound its probability.")] = 10_000,
    alpha: Annotated[float, typer.Option(help="Each certificate fails with probability at most alpha.")] = 0.001,
    samples: Annotated[int, typer.Option(help="Seeded test examples (the ones dipsen attack uses).")] = 500,
    radii: Annotated[str, typer.Option(help="Comma-separated L2 radii of the table.")] = "0,0.25,0.5,0.75,1,1.5,2",
    seed: Annotated[int, typer.Option()] = 0,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
) -> None:
    """Certify a run's final global model: certified accuracy per L2 radius, JSON and PNG in the run folder."""
    from ..attack import TrainedRun
    from ..certify.evaluate import CertifySettings, certify_run
    from ..data._io import write_atomic
    from ..report import plots

    where = device_option(device)
    try:
        radius_values = tuple(float(r) for r in radii.split(",") if r.strip())
    except ValueError:
        raise DipsenError(f"--radii must be comma-separated numbers, got {radii!r}") from None
    settings = CertifySettings(method, sigma, n0, n, alpha, samples, radius_values, seed).validate()
    trained = TrainedRun(run_dir, device=where)
    settings.resolve(trained)  # the values that depend on the run, before any work
    with progress_bar() as progress:
        task = progress.add_task(f"certifying ({method})", total=samples)
        record = certify_run(trained, settings, lambda done: progress.advance(task, done))
    name = f"certify-{method}"
    label = f"{record['model']}, {method}" + (f" sigma={record['sigma']:g}" if method == "smoothing" else "")
    title = f"{record['dataset']}: certified accuracy"
    plots.certified_accuracy({label: record["certified_accuracy"]}, title, trained.path / f"{name}.png")
    write_atomic(trained.path / f"{name}.json", lambda f: f.write(json.dumps(record, indent=1).encode()))
    table = Table(title=f"{label}: {record['samples']} examples, n={n}, alpha={alpha:g}")
    for column in ("L2 radius", "L-inf equivalent", "certified accuracy"):
        table.add_column(column, justify="right")
    for r, value in record["certified_accuracy"].items():
        table.add_row(r, f"{record['linf_radius'][r]:.4f}", f"{value:.3f}")
    console.print(table)
    console.print(
        f"accuracy of the certified predictions {record['accuracy']:.3f}, abstained {record['abstain_rate']:.3f}; "
        f"{record['forward_passes_per_second']:.0f} noisy forward passes/s"
    )
    console.print(f"saved: {trained.path / (name + '.json')} and .png")
