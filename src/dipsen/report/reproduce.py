"""``dipsen reproduce``: the whole study end to end, into one report folder.

1. Train the CNN and DiPSeN on each data set with the settings in ``dipsen/configs/DATASET.toml``
   (K=200, C=0.1, FedAvg; the in-process engine), into ``OUT/runs/KEY-MODEL``; SOCOFing twice, on its
   default hand x finger task and on gender (:data:`dipsen.report.paper.TASK_VARIANTS`, keys
   ``socofing-gender/MODEL``). Beside them, the defences of :data:`dipsen.report.defences.DEFENCES` on
   the data sets each names (``DATASET/KEY``): federated adversarial training of the CNN at the study's
   eps (``cnn-fat``), on MNIST with PGD-3 (:data:`dipsen.report.defences.MNIST_FAT`) and on CTU-13 with
   FGSM-RS, and on MNIST under Dirichlet(0.5) label skew with PGD-3 and CalFAT's calibrated loss on
   MNIST_FAT's schedule (``cnn-fat-dirichlet``, :data:`dipsen.report.defences.MNIST_FAT_LABEL_SKEW`). Every FAT run has the
   collapse guard on (``robust_collapse`` = :data:`dipsen.report.defences.FAT_COLLAPSE_DROP`; off for
   ``dipsen train``): a run whose robust accuracy collapses stops and ends with its best-robust model.
   Each run keeps the checkpoints the study reads: the final one and the orange-box attack's stale one
   (``keep_checkpoints = last-(stale_rounds + 1)``; with the guard, those of the best-robust round too).
2. Run :func:`dipsen.attack.study.study_run` on every final global model (the model the run ends with:
   ``best_robust.pt``'s after a collapse, see :class:`~dipsen.attack.target.TrainedRun`; the study
   records it as ``final_round`` and ``collapse``, and the report says which was attacked); each result
   is saved as ``OUT/runs/KEY-MODEL/study.json`` as soon as it is done.
3. Certify (:mod:`dipsen.certify`): train a CNN with Gaussian input noise for each sigma of
   :data:`SMOOTHING_SIGMAS` (``OUT/runs/KEY-cnn-smooth-SIGMA``) and certify it by randomized
   smoothing, with the L2 attack's accuracy beside it; certify each DiPSeN run by PixelDP. Each
   result is saved in its run folder (``certify.json``) as soon as it is done.
4. Write ``OUT/report.md``, ``OUT/report.html``, the PNG plots and ``OUT/results.json`` (with each run's
   training time, ``training_seconds[LABEL]``, and what the defences were trained with, ``defences``).

``train_dtype="bfloat16"`` (``--train-dtype``) trains every run (steps 1 and 3) under bfloat16 autocast
(:meth:`dipsen.federated.client.LocalTraining.autocast`: each local step's forward passes; weights, optimizer
and loss stay float32); the attacks of step 2, the certificates of step 3 and every evaluation run in float32
whatever it is. It is one of the study's recorded options, and the report states it when it is not float32.

Steps 1-3 run per model, one unit each (:mod:`dipsen.report.scheduling`): a model is trained, then
attacked and certified, before the next one; with ``ray_address`` (``--ray-address``) the units are
Ray tasks that run at once. Step 4 reads the saved files only, whichever way the units ran.

``quick=True`` trains on 2,000-example subsets for 3 rounds, watches FAT's robustness on 100 rows,
and attacks 40 examples with tiny budgets: it exercises every step in a few minutes and measures
nothing worth reporting.

Resuming (``resume=True``; ``dipsen reproduce --resume OUT``): ``OUT/options.json`` records what the
study was started with, and a resume must ask for the same. A run folder with final_metrics.json
is taken as it is, one without is resumed from its last checkpoint (the engine's resume: the
weights of an uninterrupted run), and a run with its study.json is not attacked again, so an
interrupted study loses at most one round of training or one run's attacks. A folder begun by an
earlier version whose options.json lacks an option this one records (``defences``: it had no FAT
runs) is refused: its run set differs; one that lacks only ``train_dtype`` trained in float32 and
resumes as such (:data:`OPTIONS_BEFORE`).

Time: the report's minutes are sums that do not depend on interruptions: training is the rounds'
time in each run's metrics.jsonl, attacks the wall time of each run's study, saved with it.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from functools import lru_cache, partial
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..attack.study import ProgressFactory, StudySettings, study_run
from ..attack.target import TrainedRun
from ..certify.evaluate import CertifySettings, attacked_accuracy, certify_run
from ..config import TrainConfig, load_config
from ..data import Dataset
from ..data._io import write_atomic
from ..device import resolve_device
from ..errors import DipsenError
from ..federated import FederatedTraining, RunDir, train
from .build import build_report
from .defences import DEFENCES, defences_record
from .paper import DATASETS, TASK_VARIANTS
from .scheduling import OnDone, Unit, scheduler

MODELS = ("cnn", "dipsen")
QUICK_TRAINING = {
    "rounds": 3,
    "clients": 20,
    "fraction": 0.25,
    "local_epochs": 1,
    "train_subset": 2000,
    "test_subset": 500,
    # FAT's robust monitor at a tenth of its cost (APGD-CE, 10 steps on 100 rows, not 40 on 250), as quick's attacks are
    "robust_monitor_steps": 10,
    "robust_monitor_samples": 100,
}
OPTIONS_FILE = "options.json"  # in OUT: what the study was started with
STUDY_FILE = "study.json"  # in each run folder: its study_run result
CERTIFY_FILE = "certify.json"  # in each certified run folder: its certificate and attacked accuracy
SMOOTHING_SIGMAS = {"mnist": (0.25, 0.5, 1.0), "socofing": (0.25,), "ctu13": (0.25,)}
"""Input-noise std of the smoothed CNNs the study trains and certifies, per data set (Cohen et al.'s 0.25, 0.5, 1.0)."""
CERTIFY = CertifySettings(n0=100, n=2000, samples=100, radii=(0.0, 0.25, 0.5, 0.75, 1.0, 1.5))
"""n = 2,000 draws certify radii up to 2.7 sigma at alpha 0.001: enough for the report's r = 0.5 and 1."""
QUICK_CERTIFY = CertifySettings(n0=10, n=100, samples=10, radii=(0.0, 0.25, 0.5))
OPTIONS_BEFORE = {"train_dtype": "float32"}
"""Study options added since options.json was first written, with the value that does what earlier versions did
(they trained in float32): :func:`reproduce` and ``dipsen reproduce --resume`` read an older folder with them."""
SETTINGS_BEFORE = {"every_attack_on_all": True}
"""Study settings added since options.json was first written, with the value that does what earlier versions did
(they ran every attack on every example)."""
STUDY_EVAL_EVERY = 10
"""The study's runs evaluate every 10th round and the last (``eval_every``): the report reads only the final
model and the rounds' time, and a full test-set pass every round was up to a fifth of a round's time."""


def paper_config(dataset: str, model: str, quick: bool = False, **overrides) -> TrainConfig:
    """The study's training settings for ``dataset`` and ``model`` (from the packaged TOML file)."""
    if dataset not in DATASETS:
        raise DipsenError(f"unknown data set {dataset!r}; choose from {', '.join(DATASETS)}")
    with resources.as_file(resources.files("dipsen") / "configs" / f"{dataset}.toml") as path:
        # quick's small budget wins over any override (a defence's own rounds, say)
        return load_config(
            path, {"model": model, "eval_every": STUDY_EVAL_EVERY, **overrides, **(QUICK_TRAINING if quick else {})}
        )


def study_runs(datasets: tuple[str, ...]) -> dict[str, tuple[str, dict]]:
    """Report key -> (data set, config overrides): each data set, then its task variants."""
    runs: dict[str, tuple[str, dict]] = {}
    for dataset in datasets:
        runs[dataset] = (dataset, {})
        runs.update({key: variant for key, variant in TASK_VARIANTS.items() if variant[0] == dataset})
    return runs


def study_configs(
    datasets: tuple[str, ...], quick: bool, settings: StudySettings, device: str = "auto", train_dtype: str = "float32"
) -> tuple[dict[str, TrainConfig], dict[str, TrainConfig]]:
    """The study's runs, label -> training config: those it attacks, and the smoothed CNNs it certifies.

    Attacked: CNN and DiPSeN on each data set and task variant (:func:`study_runs`), each data set's
    defences of :data:`DEFENCES` after them; all keep the final and the orange-box attack's stale
    checkpoint. Certified: a CNN trained with input noise for each sigma of :data:`SMOOTHING_SIGMAS`.
    Every run trains on ``device`` with ``train_dtype`` (a bad value is a ConfigError naming ``--train-dtype``).
    """
    keep = f"last-{settings.stale_rounds + 1}"  # the final model and the orange-box attack's stale one
    common = {"device": device, "train_dtype": train_dtype}
    attacked: dict[str, TrainConfig] = {}
    for key, (dataset, overrides) in study_runs(datasets).items():
        for model in MODELS:
            attacked[f"{key}/{model}"] = paper_config(dataset, model, quick, keep_checkpoints=keep, **common, **overrides)
        # SOCOFing has no defence: its CNN's clean accuracy (~45%) leaves robustness out of the question
        for name, defence in DEFENCES.items():
            if key == dataset and dataset in defence.datasets:
                attacked[f"{key}/{name}"] = paper_config(
                    dataset, defence.model, quick, keep_checkpoints=keep, **common, **defence.config(settings.eps, dataset)
                )
    smoothed = {
        f"{d}/cnn-smooth-{sigma:g}": paper_config(d, "cnn", quick, keep_checkpoints="last", input_noise=sigma, **common)
        for d in datasets
        for sigma in SMOOTHING_SIGMAS[d][: 1 if quick else None]  # quick: the first sigma only
    }
    return attacked, smoothed


def round_progress(progress: ProgressFactory | None, label: str, rounds: int):
    """An ``on_round`` callback for :func:`dipsen.federated.train` that advances one bar per round."""
    if progress is None:
        return None
    advance = progress(f"training {label}", rounds)
    return lambda result, start_round: advance(start_round) if result is None else advance(1)


def machine_description() -> str:
    """The machine in a few words, its CUDA GPUs too where torch sees any (the runs used them if their device was CUDA)."""
    gpus = ""
    if torch.cuda.is_available():
        gpus = f", {torch.cuda.device_count()} CUDA GPU(s) ({torch.cuda.get_device_name(0)})"
    return f"{platform.machine()} Linux, {os.cpu_count()} CPUs{gpus}, torch {torch.__version__}"


def open_output(out: Path, options: dict[str, Any], resume: bool, before: dict[str, Any] | None = None) -> None:
    """Start ``out`` as a new output folder recording ``options`` or, with ``resume``, check it records them.

    ``options`` are everything the results depend on besides the run folders' own config.json: a
    resume with others would mix two studies in one report, so it is refused. ``before``: options an
    older folder may lack, with the value it then ran with (:func:`recorded_options`).
    """
    options = json.loads(json.dumps(options))  # as they are read back: tuples become lists
    if resume:
        recorded = recorded_options(out, before)
        if missing := sorted(options.keys() - recorded.keys()):
            raise DipsenError(
                f"{out} was started by an earlier version of this command: {out / OPTIONS_FILE} records no "
                f"{', '.join(missing)}, so its runs are not this version's; start a new --out folder"
            )
        if recorded != options:
            differ = sorted(k for k in options.keys() | recorded.keys() if options.get(k) != recorded.get(k))
            raise DipsenError(f"{out} was started with other {', '.join(differ)} (see {out / OPTIONS_FILE}); resume with those")
        return
    if out.exists() and any(out.iterdir()):
        raise DipsenError(f"{out} exists and is not empty; choose a new --out folder, or continue it with --resume {out}")
    write_atomic(out / OPTIONS_FILE, lambda f: f.write(json.dumps(options, indent=1).encode()))


def recorded_options(out: Path, before: dict[str, Any] | None = None) -> dict[str, Any]:
    """The options ``out`` was started with: what ``--resume OUT`` reads back.

    Study settings recorded before a setting existed read as the value that does what that version
    did (:data:`SETTINGS_BEFORE`), and so do the options of ``before`` it lacks (:data:`OPTIONS_BEFORE`
    for a study), so such a folder resumes as it began.
    """
    file = out / OPTIONS_FILE
    try:
        options = json.loads(file.read_text())
    except FileNotFoundError:
        raise DipsenError(f"{out}: nothing to resume (no {OPTIONS_FILE})") from None
    except json.JSONDecodeError as exc:
        raise DipsenError(f"{file}: corrupt: {exc}") from None
    if isinstance(options.get("settings"), dict):
        options["settings"] = {**SETTINGS_BEFORE, **options["settings"]}
    return {**(before or {}), **options}


def train_run(folder: Path, config: TrainConfig, data: Dataset, progress: ProgressFactory | None, label: str) -> None:
    """Train the run in ``folder`` to its end: resumed from its last checkpoint if begun, else from the start with ``config``.

    A begun run goes on with the options it was started with, but on ``config``'s device (:meth:`RunDir.reconfigure`).
    """
    if (folder / "config.json").is_file():
        run, resume = RunDir.open(folder), True
        config = run.reconfigure(device=config.device)
    else:
        run, resume = RunDir.create(folder.parent, config, folder.name), False
    train(FederatedTraining(config, data), run, resume=resume, on_round=round_progress(progress, label, config.rounds))


def training_seconds(folder: Path) -> float:
    """The time of a run's rounds (client updates, aggregation, evaluation) from its metrics.jsonl."""
    return sum(r["train_seconds"] + r["eval_seconds"] for r in RunDir(folder).metrics())


def saved_result(
    folder: Path, name: str, data: Dataset | None, measure: Callable[[TrainedRun], dict], device: torch.device
) -> dict:
    """``{"seconds", "result"}`` of ``measure`` on the finished run in ``folder``, saved as ``folder/name`` once done.

    Measured only if not saved before (a resumed study), on the run with ``data`` (None: loaded
    from its config) and its models on ``device``, and always returned as read back from the file,
    so a resumed study reports exactly what an uninterrupted one would.
    """
    run = RunDir.open(folder)
    if not (folder / name).is_file():
        start = time.perf_counter()
        result = measure(TrainedRun(folder, data, device))
        run.write_json(name, {"seconds": time.perf_counter() - start, "result": result})
    return run.read_json(name)


def reproduce(
    out: Path,
    *,
    quick: bool = False,
    datasets: tuple[str, ...] = DATASETS,
    settings: StudySettings | None = None,
    progress: ProgressFactory | None = None,
    resume: bool = False,
    device: str = "auto",
    ray_address: str | None = None,
    train_dtype: str = "float32",
) -> Path:
    """Train, attack and report into ``out`` (with ``resume``: finish the study begun there); returns report.md's path.

    Each model is one unit (:mod:`dipsen.report.scheduling`): its training, then its study and its
    certificate, run here in order or, with ``ray_address``, as Ray tasks; the report reads the saved files.
    Everything computes on ``device`` (:mod:`dipsen.device`), which is not one of the study's recorded
    options: a resume may use another. Every run trains with ``train_dtype`` (float32 | bfloat16 autocast), which is
    one (the attacks and certificates run in float32 either way).
    """
    settings = settings or (StudySettings.quick() if quick else StudySettings())
    resolve_device(device)  # refused here, before any work, where it is not available
    configs, smoothed = study_configs(datasets, quick, settings, device, train_dtype)  # all errors before any work
    certify = QUICK_CERTIFY if quick else CERTIFY
    defences = defences_record(settings.eps)
    options = {
        "quick": quick,
        "datasets": datasets,
        "settings": settings.to_dict(),
        "certify": asdict(certify),
        "defences": defences,
        "train_dtype": train_dtype,
    }
    studied = list(configs)
    certified = [*smoothed, *(f"{d}/dipsen" for d in datasets)]
    configs |= smoothed
    folders = {label: out / "runs" / label.replace("/", "-") for label in configs}
    here = progress if ray_address is None else None  # a Ray task's bars would be drawn in another process
    units = [
        Unit(
            label,
            partial(
                _model_unit,
                folders[label],
                config,
                label,
                settings=settings if label in studied else None,
                certify=certify if label in certified else None,
                progress=here,
                device=device,
            ),
            cpus=config.workers or 1,
        )
        for label, config in configs.items()
    ]
    with scheduler(ray_address) as run_units:
        open_output(out, options, resume, OPTIONS_BEFORE)
        run_units(units, units_done(progress, "models", len(units)))
    records = {label: RunDir.open(folders[label]).read_json(STUDY_FILE) for label in studied}
    certificates = {label: RunDir.open(folders[label]).read_json(CERTIFY_FILE) for label in certified}
    run_seconds = {label: training_seconds(folder) for label, folder in folders.items()}
    training = sum(run_seconds.values())
    attacks = sum(record["seconds"] for record in records.values())
    certifying = sum(record["seconds"] for record in certificates.values())
    results = {
        "quick": quick,
        "machine": machine_description(),
        "settings": settings.to_dict(),
        "seconds": {"total": training + attacks + certifying, "training": training, "attacks": attacks, "certify": certifying},
        "studies": {label: record["result"] for label, record in records.items()},
        "certified": {label: record["result"] for label, record in certificates.items()},
        "training_seconds": run_seconds,
        "defences": defences,
        "train_dtype": train_dtype,
    }
    return build_report(results, out)


def _model_unit(
    folder: Path,
    config: TrainConfig,
    label: str,
    *,
    settings: StudySettings | None,
    certify: CertifySettings | None,
    progress: ProgressFactory | None,
    device: str,
) -> None:
    """One model of the study: trained to its end (resumed if begun), then studied with ``settings`` and certified
    with ``certify`` where given, on ``device`` as the process running the unit resolves it; each step only if its
    file is not saved yet."""
    where = resolve_device(device)
    data = None
    if not RunDir(folder).finished():
        data = config.load_dataset()
        train_run(folder, config, data, progress, label)
    if settings is not None:
        saved_result(folder, STUDY_FILE, data, lambda trained: study_run(trained, settings, progress), where)
    if certify is not None:
        saved_result(folder, CERTIFY_FILE, data, lambda trained: _certify(trained, certify, progress), where)


def units_done(progress: ProgressFactory | None, what: str, total: int) -> OnDone | None:
    """An ``on_done`` for :func:`~dipsen.report.scheduling.scheduler`'s units: one bar, "WHAT done", advanced per unit."""
    if progress is None:
        return None
    advance = progress(f"{what} done", total)
    return lambda unit: advance(1)


def dataset_for(config: TrainConfig) -> Dataset:
    """``config.load_dataset()``, kept for the next call with an equal config: a process that runs a study's units one
    after another (this one, or a Ray worker) loads the data set they share once. Only the last one is kept."""
    return _dataset(json.dumps(config.to_dict(), sort_keys=True))


@lru_cache(maxsize=1)
def _dataset(config: str) -> Dataset:
    return TrainConfig.from_dict(json.loads(config)).load_dataset()


def _certify(trained: TrainedRun, settings: CertifySettings, progress: ProgressFactory | None) -> dict:
    """A smoothed CNN's certificate and the L2 attack's accuracy at its radii, or a DiPSeN run's PixelDP certificate."""
    method = "smoothing" if trained.config.input_noise > 0 else "pixeldp"
    settings = replace(settings, method=method)
    advance = progress(f"certifying {trained.config.dataset} {trained.path.name}", settings.samples) if progress else None
    certificate = certify_run(trained, settings, advance)
    attacked = attacked_accuracy(trained, settings, settings.radii, draws=settings.n // 2) if method == "smoothing" else None
    return {"certificate": certificate, "attacked": attacked}
