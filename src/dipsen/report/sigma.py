"""``dipsen sweep-sigma``: the noise/accuracy trade-off of DiPSeN, with the CNN as reference.

Trains DiPSeN at each noise multiplier sigma (and the CNN once), then measures on the same
examples: clean accuracy, paper-protocol PGD (1 draw) and adaptive PGD through EOT (mean rule).
Writes ``sigma_sweep.json``, ``sigma_sweep.png`` and ``sigma_sweep.md`` into ``out``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..attack.evaluate import AttackSetup, RobustnessEvaluation
from ..attack.study import ProgressFactory, StudySettings
from ..attack.target import TrainedRun
from ..data import load_dataset
from ..errors import DipsenError
from ..federated import FederatedTraining, RunDir, train
from . import plots
from .render import Block, Heading, Paragraph, Table, to_markdown
from .reproduce import machine_description, paper_config, round_progress


def sweep_sigma(
    out: Path, dataset: str, sigmas: list[float], *, quick: bool = False, progress: ProgressFactory | None = None
) -> Path:
    """Train and attack DiPSeN at each sigma; returns the path of sigma_sweep.md."""
    if not sigmas or any(s < 0 for s in sigmas):
        raise DipsenError(f"--sigmas must be a non-empty list of numbers >= 0, got {sigmas}")
    if out.exists() and any(out.iterdir()):
        raise DipsenError(f"{out} exists and is not empty; choose a new --out folder")
    settings = StudySettings.quick() if quick else StudySettings()
    start = time.perf_counter()
    data = load_dataset(dataset, seed=0)
    measured: dict[str, dict] = {}
    for label, model, overrides in [("cnn", "cnn", {}), *[(f"sigma={s:g}", "dipsen", {"sigma": s}) for s in sorted(sigmas)]]:
        config = paper_config(dataset, model, quick, **overrides)
        run = RunDir.create(out / "runs", config)
        train(FederatedTraining(config, data), run, on_round=round_progress(progress, label, config.rounds))
        measured[label] = _measure(TrainedRun(run.path, data), settings, progress, label)
    seconds = time.perf_counter() - start
    results = {
        "dataset": dataset,
        "machine": machine_description(),
        "quick": quick,
        "settings": settings.to_dict(),
        "seconds": seconds,
        "results": measured,
    }
    (out / "sigma_sweep.json").write_text(json.dumps(results, indent=1))
    sweep = [measured[k] for k in measured if k != "cnn"]
    cnn = measured["cnn"]
    plots.sigma_curves(
        [m["sigma"] for m in sweep],
        {
            "clean (1 draw)": [m["clean"] for m in sweep],
            "paper-protocol PGD (1 draw)": [m["paper_pgd"] for m in sweep],
            "EOT PGD (mean of draws)": [m["adaptive_pgd"] for m in sweep],
        },
        {"CNN clean": cnn["clean"], "CNN PGD": cnn["adaptive_pgd"]},
        out / "sigma_sweep.png",
        f"{dataset}: DiPSeN accuracy against sigma (eps {settings.eps})",
    )
    rows = [
        [label, f"{m['clean']:.3f}", f"{m['clean_mc']:.3f}", f"{m['paper_pgd']:.3f}", f"{m['adaptive_pgd']:.3f}"]
        for label, m in measured.items()
    ]
    blocks: list[Block] = [
        Heading(f"Noise/accuracy trade-off on {dataset}", 1),
        Paragraph(
            f"Measured on {machine_description()} in {seconds / 60:.1f} min; {settings.samples} examples, "
            f"eps {settings.eps}." + (" **quick mode**: not a result." if quick else "")
        ),
        Table(
            [
                "model",
                "clean: 1 draw",
                f"clean: mean of {settings.mc_samples}",
                "paper PGD: 1 draw",
                f"EOT PGD: mean of {settings.mc_samples}",
            ],
            rows,
        ),
        Paragraph("![accuracy against sigma](sigma_sweep.png)"),
    ]
    (out / "sigma_sweep.md").write_text(to_markdown(blocks))
    return out / "sigma_sweep.md"


def _measure(trained: TrainedRun, settings: StudySettings, progress: ProgressFactory | None, label: str) -> dict:
    evaluation = RobustnessEvaluation(trained, settings.samples, mc_samples=settings.mc_samples, seed=settings.seed)

    def run(setup: AttackSetup):
        total = len(evaluation.data.y_eval)
        return evaluation.run(setup, progress(f"{label}: {setup.label}", total) if progress else None)

    clean = evaluation.clean()
    paper = run(AttackSetup("pgd", settings.eps, budget=settings.paper_budget))
    adaptive = run(
        AttackSetup("pgd", settings.eps, gradient="eot", eot_draws=settings.eot_draws, budget=settings.adaptive_budget)
    )
    return {
        "sigma": trained.config.sigma if evaluation.target.noise is not None else None,
        "run": str(trained.path),
        "clean": clean.accuracy("single"),
        "clean_mc": clean.accuracy("mc"),
        "paper_pgd": paper.accuracy("single"),
        "adaptive_pgd": adaptive.accuracy("mc"),
    }
