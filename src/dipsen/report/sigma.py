"""``dipsen sweep-sigma``: the noise/accuracy trade-off of DiPSeN, with the CNN as reference.

Trains DiPSeN at each noise multiplier sigma (and the CNN once), then measures on the same
examples: clean accuracy, paper-protocol PGD (1 draw), adaptive PGD through EOT (mean rule) and the
certified accuracy at L2 radii :data:`RADII` of the PixelDP certificate of the model's own noise layer
(``dipsen certify --method pixeldp``, with ``dipsen reproduce``'s certify settings; None for a model
without noise: the CNN and sigma 0).
Writes ``sigma_sweep.json``, ``sigma_sweep.png`` and ``sigma_sweep.md`` into ``out``; the runs go to
``OUT/runs/cnn`` and ``OUT/runs/sigma-S`` (keeping their last checkpoint only: the measurements read
nothing else), each run's measurements to its ``sigma_sweep_point.json`` as soon as they are done.
``resume=True`` (``dipsen sweep-sigma --resume OUT``) finishes a sweep begun in ``out`` as
:func:`dipsen.report.reproduce.reproduce` finishes a study: same options, finished runs and
measurements kept, unfinished runs resumed. A sweep begun by a version without certificates is
refused (its options.json records no ``certify``): its point files lack them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path

from ..attack.evaluate import AttackSetup, RobustnessEvaluation
from ..attack.study import ProgressFactory, StudySettings
from ..attack.target import TrainedRun
from ..certify.evaluate import CertifySettings, certify_run
from ..certify.pixeldp import l2_size
from ..config import TrainConfig
from ..device import resolve_device
from ..errors import DipsenError
from ..federated import RunDir
from ..models import calibrate_noise
from . import plots
from .render import Block, Heading, Paragraph, Table, to_markdown
from .reproduce import (
    CERTIFY,
    QUICK_CERTIFY,
    dataset_for,
    machine_description,
    open_output,
    paper_config,
    saved_result,
    train_run,
    training_seconds,
    units_done,
)
from .scheduling import Unit, scheduler

POINT_FILE = "sigma_sweep_point.json"  # in each run folder: its measurements
RADII = ("0.5", "1")
"""L2 radii at which each point's certified accuracy is measured (keys of ``certify_run``'s ``certified_accuracy``)."""


def sweep_sigma(
    out: Path,
    dataset: str,
    sigmas: list[float],
    *,
    quick: bool = False,
    progress: ProgressFactory | None = None,
    resume: bool = False,
    device: str = "auto",
    ray_address: str | None = None,
) -> Path:
    """Train and attack DiPSeN at each sigma (``resume``: finish the sweep begun in ``out``); returns sigma_sweep.md's path.

    Each point (a run and its measurements) is one unit (:mod:`dipsen.report.scheduling`), run here in
    order or, with ``ray_address``, as a Ray task; the table and plot read the saved measurements.
    Everything computes on ``device`` (:mod:`dipsen.device`), not one of the sweep's recorded options.
    """
    if not sigmas or any(s < 0 for s in sigmas):
        raise DipsenError(f"--sigmas must be a non-empty list of numbers >= 0, got {sigmas}")
    sigmas = sorted(sigmas)
    resolve_device(device)  # refused here, before any work, where it is not available
    # the sweep's attacks each run on every example, with no cascade (recorded so, as by earlier versions)
    settings = replace(StudySettings.quick() if quick else StudySettings(), every_attack_on_all=True)
    certify = replace(
        QUICK_CERTIFY if quick else CERTIFY,
        method="pixeldp",
        samples=settings.samples,
        seed=settings.seed,
        radii=tuple(map(float, RADII)),
    )
    points = [("cnn", "cnn", {}), *[(f"sigma={s:g}", "dipsen", {"sigma": s}) for s in sigmas]]
    configs = {
        label: paper_config(dataset, model, quick, keep_checkpoints="last", device=device, **kw) for label, model, kw in points
    }
    options = {"dataset": dataset, "sigmas": sigmas, "quick": quick, "settings": settings.to_dict(), "certify": asdict(certify)}
    folders = {label: out / "runs" / label.replace("=", "-") for label in configs}
    here = progress if ray_address is None else None  # a Ray task's bars would be drawn in another process
    units = [
        Unit(
            label,
            partial(_point, folders[label], config, configs["cnn"], label, settings, certify, here, device),
            cpus=config.workers or 1,
        )
        for label, config in configs.items()
    ]
    with scheduler(ray_address) as run_units:
        open_output(out, options, resume)
        run_units(units, units_done(progress, "points", len(units)))
    records = {label: RunDir.open(folder).read_json(POINT_FILE) for label, folder in folders.items()}
    seconds = sum(training_seconds(folder) for folder in folders.values()) + sum(r["seconds"] for r in records.values())
    measured = {label: record["result"] for label, record in records.items()}
    results = {
        "dataset": dataset,
        "machine": machine_description(),
        "quick": quick,
        "settings": settings.to_dict(),
        "certify": asdict(certify),
        "seconds": seconds,
        "results": measured,
    }
    (out / "sigma_sweep.json").write_text(json.dumps(results, indent=1))
    sweep = [measured[k] for k in measured if k != "cnn"]
    cnn = measured["cnn"]
    ceiling = l2_size(1.0, calibrate_noise(1.0, delta=configs[points[-1][0]].dp_delta))  # at eps 1, per unit of sigma
    plots.sigma_curves(
        [m["sigma"] for m in sweep],
        {
            "clean (1 draw)": [m["clean"] for m in sweep],
            "paper-protocol PGD (1 draw)": [m["paper_pgd"] for m in sweep],
            "EOT PGD (mean of draws)": [m["adaptive_pgd"] for m in sweep],
            **{f"certified, L2 r = {r} (PixelDP)": [m["certified"][r] for m in sweep] for r in RADII},
        },
        {"CNN clean": cnn["clean"], "CNN PGD": cnn["adaptive_pgd"]},
        out / "sigma_sweep.png",
        f"{dataset}: DiPSeN accuracy against sigma (L-inf eps {settings.eps}, L2 r)",
    )
    rows = [
        [
            label,
            *(f"{m[k]:.3f}" for k in ("clean", "clean_mc", "paper_pgd", "adaptive_pgd")),
            *("—" if m["certified"][r] is None else f"{m['certified'][r]:.3f}" for r in RADII),
        ]
        for label, m in measured.items()
    ]
    blocks: list[Block] = [
        Heading(f"Noise/accuracy trade-off on {dataset}", 1),
        Paragraph(
            f"Measured on {machine_description()} in {seconds / 60:.1f} min; {settings.samples} examples, "
            f"L-inf eps {settings.eps}." + (" **quick mode**: not a result." if quick else "")
        ),
        Paragraph(
            "Certified: the share of examples whose PixelDP-certified prediction (the noise layer's own certificate, "
            f"`dipsen certify --method pixeldp`) is correct at L2 radius r or more, from n = {certify.n} noise draws "
            f"per example at alpha {certify.alpha:g} (n0 = {certify.n0} is not used: the n draws give both the "
            f"prediction and its bounds); '—': no noise, no certificate. PixelDP certifies no radius above "
            f"{ceiling:.3f} sigma here (eps = 1 of the Gaussian mechanism). An L2 certificate is a different "
            "threat model from the L-inf attacks: neither figure bounds the other."
        ),
        Table(
            [
                "model",
                "clean: 1 draw",
                f"clean: mean of {settings.mc_samples}",
                "paper PGD: 1 draw",
                f"EOT PGD: mean of {settings.mc_samples}",
                *(f"certified: L2 r = {r}" for r in RADII),
            ],
            rows,
        ),
        Paragraph("![accuracy against sigma](sigma_sweep.png)"),
    ]
    (out / "sigma_sweep.md").write_text(to_markdown(blocks))
    return out / "sigma_sweep.md"


def _point(
    folder: Path,
    config: TrainConfig,
    data: TrainConfig,
    label: str,
    settings: StudySettings,
    certify: CertifySettings,
    progress: ProgressFactory | None,
    device: str,
) -> None:
    """One point of the sweep: its run trained to its end (resumed if begun) unless finished, then measured unless
    saved on ``device``, on the data set ``data`` (a config) loads: every point's, as they differ in model and sigma only."""
    dataset = dataset_for(data)
    if not RunDir(folder).finished():
        train_run(folder, config, dataset, progress, label)
    measure = partial(_measure, settings=settings, certify=certify, progress=progress, label=label)
    saved_result(folder, POINT_FILE, dataset, measure, resolve_device(device))


def _measure(
    trained: TrainedRun, settings: StudySettings, certify: CertifySettings, progress: ProgressFactory | None, label: str
) -> dict:
    evaluation = RobustnessEvaluation(trained, settings.samples, mc_samples=settings.mc_samples, seed=settings.seed)

    def run(setup: AttackSetup):
        total = len(evaluation.data.y_eval)
        return evaluation.run(setup, progress(f"{label}: {setup.label}", total) if progress else None)

    clean = evaluation.clean()
    paper = run(AttackSetup("pgd", settings.eps, budget=settings.paper_budget))
    adaptive = run(
        AttackSetup("pgd", settings.eps, gradient="eot", eot_draws=settings.eot_draws, budget=settings.adaptive_budget)
    )
    certified = dict.fromkeys(RADII)  # None: no noise layer (the CNN, sigma 0), nothing to certify
    if evaluation.randomized:
        advance = progress(f"{label}: PixelDP certificate", certify.samples) if progress else None
        certified = certify_run(trained, certify, advance)["certified_accuracy"]
    return {
        "sigma": trained.config.sigma if evaluation.target.noise is not None else None,
        "run": str(trained.path),
        "clean": clean.accuracy("single"),
        "clean_mc": clean.accuracy("mc"),
        "paper_pgd": paper.accuracy("single"),
        "adaptive_pgd": adaptive.accuracy("mc"),
        "certified": certified,
    }
