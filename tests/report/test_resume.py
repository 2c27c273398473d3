"""reproduce and sweep-sigma resume: finished runs and measurements are kept, unfinished runs resumed."""

import importlib
import json
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import asdict

import pytest

from dipsen.attack import Budget
from dipsen.attack.study import StudySettings
from dipsen.errors import DipsenError
from dipsen.federated import RunDir
from dipsen.report.defences import defences_record
from dipsen.report.sigma import sweep_sigma

REPRODUCE = importlib.import_module("dipsen.report.reproduce")  # dipsen.report.reproduce is also the function
SIGMA = importlib.import_module("dipsen.report.sigma")
TINY = StudySettings(
    samples=12,
    mc_samples=2,
    eot_draws=2,
    paper_budget=Budget(3, 1 / 3, 0),
    adaptive_budget=Budget(3, 1 / 3, 1, queries=5, hsj_iterations=1, hsj_evaluations=10),
    doubling_samples=6,
    hsj_samples=2,
    stale_rounds=1,
    attacker_samples=200,
    surrogate_epochs=1,
    sweep_eps=(0.1, 0.5),
    sweep_samples=10,
    sweep_budget=Budget(3, 1 / 3, 0),
    sweep_eot_draws=2,
)


class Killed(Exception):
    """Stands in for a kill: raised from inside the work, it leaves the folders as a kill would."""


def _counting(monkeypatch, module, name: str, kill_at: int | None = None) -> list:
    """Replace ``module.name`` by a wrapper recording its calls that raises Killed at call ``kill_at``."""
    real, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append((args, kwargs))
        if len(calls) == kill_at:
            raise Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def _stamps(folder) -> dict:
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def test_a_resumed_study_retrains_and_reattacks_nothing_finished(tmp_path, monkeypatch):
    out = tmp_path / "study"
    real_train, trained = REPRODUCE.train, []

    def train(job, run, *, resume=False, on_round=None):
        trained.append((run.path.name, resume))
        if len(trained) == 2:  # the second run is killed once its round 1 is saved

            def on_round(result, start_round):
                if result is not None:
                    raise Killed

        return real_train(job, run, resume=resume, on_round=on_round)

    monkeypatch.setattr(REPRODUCE, "train", train)
    with pytest.raises(Killed):
        REPRODUCE.reproduce(out, quick=True, datasets=("mnist",), settings=TINY)
    cnn, dipsen = out / "runs" / "mnist-cnn", out / "runs" / "mnist-dipsen"
    assert trained == [("mnist-cnn", False), ("mnist-dipsen", False)]
    assert RunDir.open(cnn).finished() and RunDir.open(cnn).config().keep_checkpoints == "last-2"
    assert (cnn / REPRODUCE.STUDY_FILE).is_file()  # a model is attacked once trained, before the next one trains
    assert not RunDir.open(dipsen).finished() and RunDir.open(dipsen).last_round() == 1
    with pytest.raises(DipsenError, match="exists and is not empty; choose a new --out folder, or continue it with --resume"):
        REPRODUCE.reproduce(out, quick=True, datasets=("mnist",), settings=TINY)
    with pytest.raises(DipsenError, match="was started with other datasets"):
        REPRODUCE.reproduce(out, quick=True, datasets=("mnist", "ctu13"), settings=TINY, resume=True)
    cnn_files = _stamps(cnn)

    studied = _counting(monkeypatch, REPRODUCE, "study_run", kill_at=2)  # killed while attacking the FAT run
    with pytest.raises(Killed):
        REPRODUCE.reproduce(out, quick=True, datasets=("mnist",), settings=TINY, resume=True)
    # resumed from round 1, the finished run and its study left alone; then the FAT run the defences section needs
    assert trained[2:] == [("mnist-dipsen", True), ("mnist-cnn-fat", False)]
    fat = out / "runs" / "mnist-cnn-fat"
    assert RunDir.open(fat).finished() and RunDir.open(fat).config().adv_train == "pgd"
    assert RunDir.open(dipsen).read_json("final_metrics.json")["rounds"] == 3
    assert [r["round"] for r in RunDir.open(dipsen).metrics()] == [1, 2, 3]
    assert (dipsen / REPRODUCE.CERTIFY_FILE).is_file() and not (fat / REPRODUCE.STUDY_FILE).exists()
    assert _stamps(cnn) == cnn_files
    assert [args[0].path.name for args, _ in studied] == ["mnist-dipsen", "mnist-cnn-fat"]

    path = REPRODUCE.reproduce(out, quick=True, datasets=("mnist",), settings=TINY, resume=True)
    # the FAT run attacked again, its training kept; then the label-skew FAT run and the smoothed CNN
    assert trained[4:] == [("mnist-cnn-fat-dirichlet", False), ("mnist-cnn-smooth-0.25", False)]
    assert [args[0].path.name for args, _ in studied[2:]] == ["mnist-cnn-fat", "mnist-cnn-fat-dirichlet"]
    assert _stamps(cnn) == cnn_files
    results = json.loads((out / "results.json").read_text())
    assert set(results["studies"]) == {"mnist/cnn", "mnist/dipsen", "mnist/cnn-fat", "mnist/cnn-fat-dirichlet"}
    assert path == out / "report.md"
    assert results["training_seconds"] == {
        label: REPRODUCE.training_seconds(out / "runs" / label.replace("/", "-"))
        for label in [*results["studies"], "mnist/cnn-smooth-0.25"]
    }
    assert results["seconds"]["training"] == pytest.approx(sum(results["training_seconds"].values()))
    recorded = results["defences"]["cnn-fat"]
    assert recorded["model"] == "cnn" and set(recorded["datasets"]) == {"mnist", "ctu13"}
    assert recorded["datasets"]["ctu13"] == {"adv_train": "fgsm-rs", "adv_mix": 0.5, "robust_collapse": 0.2, "adv_eps": TINY.eps}
    assert recorded["datasets"]["mnist"] == {
        "robust_collapse": 0.2,  # every FAT run's collapse guard
        "adv_train": "pgd",
        "adv_steps": 3,
        "adv_mix": 1.0,
        "adv_eps": TINY.eps,
        "lr_schedule": "cyclic",
        "lr": 0.004,
        "rounds": 60,
        "local_epochs": 5,
    }
    # quick mode's budget wins over the defence's own rounds and epochs
    fat_config = RunDir.open(fat).config()
    assert (fat_config.rounds, fat_config.local_epochs, fat_config.lr_schedule) == (3, 1, "cyclic")
    assert (
        "| MNIST | FAT (cnn-fat) |" in path.read_text()
        and "| MNIST | FAT under label skew (cnn-fat-dirichlet) |" in path.read_text()
    )
    skewed = results["defences"]["cnn-fat-dirichlet"]["datasets"]
    iid = {k: v for k, v in recorded["datasets"]["mnist"].items() if k != "adv_mix"}
    assert skewed == {"mnist": {**iid, "adv_loss": "calfat", "partition": "dirichlet", "dirichlet_alpha": 0.5}}
    saved = {
        label: RunDir.open(out / "runs" / label.replace("/", "-")).read_json(REPRODUCE.STUDY_FILE) for label in results["studies"]
    }
    assert results["studies"] == {label: record["result"] for label, record in saved.items()}
    assert results["seconds"]["attacks"] == pytest.approx(sum(record["seconds"] for record in saved.values()))
    assert set(results["certified"]) == {"mnist/cnn-smooth-0.25", "mnist/dipsen"}
    smoothing = results["certified"]["mnist/cnn-smooth-0.25"]
    assert smoothing["certificate"]["method"] == "smoothing" and set(smoothing["attacked"]) == {"0", "0.25", "0.5"}
    assert results["certified"]["mnist/dipsen"]["certificate"]["method"] == "pixeldp"
    assert "## What can be certified" in path.read_text()

    # a finished study resumed again: nothing trained or attacked, FAT included
    fat_files = _stamps(fat)
    REPRODUCE.reproduce(out, quick=True, datasets=("mnist",), settings=TINY, resume=True)
    assert len(trained) == 6 and len(studied) == 4 and _stamps(fat) == fat_files
    assert json.loads((out / "results.json").read_text()) == results


def test_a_folder_of_the_study_before_its_defences_is_refused(tmp_path):
    options = {"quick": True, "datasets": ["mnist"], "settings": TINY.to_dict(), "certify": asdict(REPRODUCE.QUICK_CERTIFY)}
    REPRODUCE.open_output(tmp_path, options, resume=False)  # as the version without FAT runs recorded them
    with pytest.raises(
        DipsenError,
        match=r"was started by an earlier version of this command: .*options.json records no "
        r"defences, so its runs are not this version's; start a new --out folder",
    ):
        REPRODUCE.reproduce(tmp_path, quick=True, datasets=("mnist",), settings=TINY, resume=True)
    assert not (tmp_path / "runs").exists()


def test_train_dtype_reaches_every_runs_config_and_a_resume_with_another_is_refused(tmp_path, monkeypatch):
    out, begun = tmp_path / "study", {}

    def train(job, run, *, resume=False, on_round=None):
        # what the run folder records and what its clients' steps get; killed before any round: no training here
        begun[run.path.name] = (run.config().train_dtype, job.training.train_dtype)
        raise Killed

    @contextmanager
    def serial(address):
        def run_units(units, on_done):
            for unit in units:
                with pytest.raises(Killed):
                    unit.work()
            raise Killed  # every unit begun, none trained: nothing for the report

        yield run_units

    monkeypatch.setattr(REPRODUCE, "train", train)
    monkeypatch.setattr(REPRODUCE, "scheduler", serial)
    with pytest.raises(Killed):
        REPRODUCE.reproduce(out, quick=True, datasets=("mnist",), settings=TINY, train_dtype="bfloat16")
    names = ["mnist-cnn", "mnist-dipsen", "mnist-cnn-fat", "mnist-cnn-fat-dirichlet", "mnist-cnn-smooth-0.25"]
    assert begun == {name: ("bfloat16", "bfloat16") for name in names}
    assert json.loads((out / "runs" / "mnist-cnn" / "config.json").read_text())["train_dtype"] == "bfloat16"
    assert REPRODUCE.recorded_options(out)["train_dtype"] == "bfloat16"
    with pytest.raises(DipsenError) as refused:
        REPRODUCE.reproduce(out, quick=True, datasets=("mnist",), settings=TINY, resume=True)  # float32
    assert str(refused.value) == f"{out} was started with other train_dtype (see {out / 'options.json'}); resume with those"
    with pytest.raises(Killed):  # the same dtype resumes
        REPRODUCE.reproduce(out, quick=True, datasets=("mnist",), settings=TINY, resume=True, train_dtype="bfloat16")


def test_a_study_from_before_train_dtype_resumes_in_float32_and_refuses_bfloat16(tmp_path):
    options = {
        "quick": True,
        "datasets": ["mnist"],
        "settings": TINY.to_dict(),
        "certify": asdict(REPRODUCE.QUICK_CERTIFY),
        "defences": defences_record(TINY.eps),
    }
    REPRODUCE.open_output(tmp_path, options, resume=False)  # as the version before --train-dtype recorded them
    before = REPRODUCE.OPTIONS_BEFORE
    REPRODUCE.open_output(tmp_path, {**options, "train_dtype": "float32"}, resume=True, before=before)
    with pytest.raises(DipsenError, match="was started with other train_dtype"):
        REPRODUCE.open_output(tmp_path, {**options, "train_dtype": "bfloat16"}, resume=True, before=before)
    assert "train_dtype" not in REPRODUCE.recorded_options(tmp_path)  # only where asked: a sweep has no such option


def test_a_resumed_sigma_sweep_measures_only_what_is_missing(tmp_path, monkeypatch):
    out = tmp_path / "sweep"
    measured = _counting(monkeypatch, SIGMA, "_measure", kill_at=2)  # killed while measuring sigma=0
    with pytest.raises(Killed):
        sweep_sigma(out, "mnist", [0.0], quick=True)
    assert (out / "runs" / "cnn" / SIGMA.POINT_FILE).is_file()
    assert RunDir.open(out / "runs" / "sigma-0").config().keep_checkpoints == "last"
    assert RunDir.open(out / "runs" / "sigma-0").finished_rounds() == [3]
    with pytest.raises(DipsenError, match="was started with other sigmas"):
        sweep_sigma(out, "mnist", [0.1], quick=True, resume=True)

    measured.clear()
    trained = _counting(monkeypatch, REPRODUCE, "train")
    path = sweep_sigma(out, "mnist", [0.0], quick=True, resume=True)
    assert trained == [] and [args[0].path.name for args, _ in measured] == ["sigma-0"]
    results = json.loads((out / "sigma_sweep.json").read_text())["results"]
    assert list(results) == ["cnn", "sigma=0"] and "| sigma=0 |" in path.read_text()


def _dipsen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dipsen", *args], capture_output=True, text=True, timeout=300)


def test_resume_reads_its_options_from_the_folder(tmp_path):
    REPRODUCE.open_output(tmp_path, {"dataset": "mnist", "sigmas": [0.0], "quick": True}, resume=False)
    result = _dipsen("sweep-sigma", "--resume", str(tmp_path), "--quick", "--sigmas", "0.1")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"error: --resume reads its options from {tmp_path}/options.json; drop --sigmas, --quick"
    result = _dipsen("reproduce", "--resume", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'missing'}: nothing to resume (no options.json)"
