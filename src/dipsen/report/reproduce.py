"""``dipsen reproduce``: the whole study end to end, into one report folder.

1. Train the CNN and DiPSeN on each data set with the settings in ``dipsen/configs/DATASET.toml``
   (K=200, C=0.1, FedAvg; the in-process engine), into ``OUT/runs``; SOCOFing twice, on its default
   hand x finger task and on gender (:data:`dipsen.report.paper.TASK_VARIANTS`, keys ``socofing-gender/MODEL``).
2. Run :func:`dipsen.attack.study.study_run` on every final global model.
3. Write ``OUT/report.md``, ``OUT/report.html``, the PNG plots and ``OUT/results.json``.

``quick=True`` trains on 2,000-example subsets for 3 rounds and attacks 40 examples with tiny
budgets: it exercises every step in a few minutes and measures nothing worth reporting.
"""

from __future__ import annotations

import os
import platform
import time
from importlib import resources
from pathlib import Path

import torch

from ..attack.study import ProgressFactory, StudySettings, study_run
from ..attack.target import TrainedRun
from ..config import load_config
from ..errors import DipsenError
from ..federated import FederatedTraining, RunDir, train
from .build import build_report
from .paper import DATASETS, TASK_VARIANTS

MODELS = ("cnn", "dipsen")
QUICK_TRAINING = {"rounds": 3, "clients": 20, "fraction": 0.25, "local_epochs": 1, "train_subset": 2000, "test_subset": 500}


def paper_config(dataset: str, model: str, quick: bool = False, **overrides):
    """The study's training settings for ``dataset`` and ``model`` (from the packaged TOML file)."""
    if dataset not in DATASETS:
        raise DipsenError(f"unknown data set {dataset!r}; choose from {', '.join(DATASETS)}")
    with resources.as_file(resources.files("dipsen") / "configs" / f"{dataset}.toml") as path:
        return load_config(path, {"model": model, **(QUICK_TRAINING if quick else {}), **overrides})


def study_runs(datasets: tuple[str, ...]) -> dict[str, tuple[str, dict]]:
    """Report key -> (data set, config overrides): each data set, then its task variants."""
    runs: dict[str, tuple[str, dict]] = {}
    for dataset in datasets:
        runs[dataset] = (dataset, {})
        runs.update({key: variant for key, variant in TASK_VARIANTS.items() if variant[0] == dataset})
    return runs


def round_progress(progress: ProgressFactory | None, label: str, rounds: int):
    """An ``on_round`` callback for :func:`dipsen.federated.train` that advances one bar per round."""
    if progress is None:
        return None
    advance = progress(f"training {label}", rounds)
    return lambda result, start_round: advance(1) if result is not None else None


def machine_description() -> str:
    return f"{platform.machine()} Linux, {os.cpu_count()} CPUs, torch {torch.__version__}"


def reproduce(
    out: Path,
    *,
    quick: bool = False,
    datasets: tuple[str, ...] = DATASETS,
    settings: StudySettings | None = None,
    progress: ProgressFactory | None = None,
) -> Path:
    """Train, attack and report into ``out``; returns the path of report.md."""
    if out.exists() and any(out.iterdir()):
        raise DipsenError(f"{out} exists and is not empty; choose a new --out folder")
    runs = study_runs(datasets)
    # all errors before any work
    configs = {(key, m): paper_config(d, m, quick, **overrides) for key, (d, overrides) in runs.items() for m in MODELS}
    settings = settings or (StudySettings.quick() if quick else StudySettings())
    start = time.perf_counter()
    trained: dict[str, TrainedRun] = {}
    for key in runs:
        for model in MODELS:
            config = configs[key, model]
            data = config.load_dataset()
            label = f"{key}/{model}"
            run = RunDir.create(out / "runs", config)
            train(FederatedTraining(config, data), run, on_round=round_progress(progress, label, config.rounds))
            trained[label] = TrainedRun(run.path, data)
    training_seconds = time.perf_counter() - start
    studies = {key: study_run(run, settings, progress) for key, run in trained.items()}
    total = time.perf_counter() - start
    results = {
        "quick": quick,
        "machine": machine_description(),
        "settings": settings.to_dict(),
        "seconds": {"total": total, "training": training_seconds, "attacks": total - training_seconds},
        "studies": studies,
    }
    return build_report(results, out)
