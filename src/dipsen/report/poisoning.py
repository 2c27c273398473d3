"""``dipsen poison-study``: the defences against simulated malicious clients, each judged by its worst case.

Runs the grid attack x defence x f (the share of malicious clients; see
:mod:`dipsen.federated.poisoning`) on one data set: every run is ``dipsen train`` with
``--aggregator A [--pre-aggregation P] --malicious-fraction f --malicious-attack ATTACK`` on the
same base settings (the data set's packaged TOML with the CNN and :data:`STUDY_SETTINGS`, or
``--config`` as it is, then the study's flags). A defence is a rule of
:data:`~dipsen.federated.aggregate.RULES` or a pre-aggregation then a rule (``nnm+median``).
f = 0 is the attack-free reference and runs once per defence, not once per attack. In every run,
the attack-free ones too (a server cannot know whether it is attacked), the rules told the
number of malicious clients (``--byzantine``: the Krum family, DnC, NNM) are told how many a
round's m hold with probability :data:`BYZANTINE_COVERAGE` at the study's largest f
(:func:`byzantine_for`; at most what the defence accepts at m), and trimmed-mean cuts at least
that share at each end (``--trim-fraction``, at most :data:`MAX_TRIM_FRACTION`); so the
attack-free row is the price of that configuration. Each run records how often one of its rounds
holds more attackers than that (``p_more_than_byzantine``). Every other aggregator setting
(``clip_norm``, ``max_client_weight``, ``cc_tau``, ...) is the base's.

A defence is judged as the evasion study judges a model: by its worst case (:func:`worst_cases`),
the lowest final test accuracy over every attack at that f and no attack at all (the malicious
clients may also behave honestly), beside the naive attacks' worst (what the rules were designed
against) and the adaptive attacks' worst (those built against them).

Writes into ``out``: ``options.json`` (what the study was started with), ``runs/NAME`` (one run
folder per grid point, NAME = ``ATTACK-fF-DEFENCE``, ``none-f0-DEFENCE`` for f = 0),
``poisoning.json`` (per run: final and best test accuracy, the rounds to reach
``target_accuracy`` if one is given, every round's test accuracy and its test rows, what a filtering
rule admitted (:func:`admission`), the run folder relative to ``out``; the worst case per defence
and f), ``poisoning.md`` (the worst-case table, then final test accuracy: rows attack x f, the
attack-free row first; columns defences; then the filtering rules' admissions), ``poisoning-heatmap.png`` (defence x
attack, one panel per f, each defence's worst boxed), ``poisoning.png`` (test accuracy against
round, one panel per attack at the largest f, one line per defence, the attack-free runs dashed)
and, where the study ran a backdoor, ``poisoning-success.png`` (its attack success rate against
round, the attack window shaded: a window ending before the last round shows how long the
backdoor persists; :func:`backdoor_worst_cases` records the rate at the window's end).

``target_accuracy`` is a reading of the test accuracy after the fact: the runs do not stop on it
and hold nothing out, so every run trains its full ``rounds``. Every round of every run is evaluated on
the whole test set (``round_eval_size`` 0, not the round slice of ``dipsen train``): its figures are the
study's. ``resume=True`` (``dipsen poison-study --resume OUT``) finishes a study begun in ``out`` as ``dipsen reproduce --resume``
does: the recorded options, finished runs kept, unfinished ones resumed from their last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from ..attack.study import ProgressFactory
from ..config import TrainConfig, load_config
from ..data._io import write_atomic
from ..device import resolve_device
from ..errors import ConfigError, DipsenError
from ..federated import RunDir
from ..federated.aggregate import AGGREGATORS, BYZANTINE_AGGREGATORS, PRE_AGGREGATIONS, min_updates, trim_count
from ..federated.poisoning import ATTACKS, BACKDOOR_ATTACKS, NAIVE_ATTACKS, malicious_count
from .render import Block, Heading, Paragraph, Table, to_markdown
from .reproduce import (
    OPTIONS_FILE,
    dataset_for,
    machine_description,
    open_output,
    recorded_options,
    train_run,
    training_seconds,
)
from .scheduling import Unit, scheduler

DATASETS = ("mnist", "ctu13")
# the naive attacks every robust rule was designed against, then those built against the rules
DEFAULT_ATTACKS = ("model-replacement", "sign-flip", *(a for a in ATTACKS if a not in NAIVE_ATTACKS + BACKDOOR_ATTACKS))
DEFAULT_AGGREGATORS = AGGREGATORS
# a defence is a rule, or a pre-aggregation then a rule: "nnm+centered-clipping"
DEFENCES = AGGREGATORS + tuple(f"{pre}+{rule}" for pre in PRE_AGGREGATIONS if pre != "none" for rule in AGGREGATORS)
MAX_TRIM_FRACTION = 0.45  # trim_fraction must stay below 1/2: something must be left to average
DEFAULT_FRACTIONS = (0.0, 0.2)
RESULTS_FILE, TABLE_FILE, PLOT_FILE = "poisoning.json", "poisoning.md", "poisoning.png"
HEATMAP_FILE = "poisoning-heatmap.png"
SUCCESS_PLOT_FILE = "poisoning-success.png"  # only where the study ran a backdoor
# the study's flags that set training options (each a TrainConfig field)
TRAIN_FLAGS = (
    "model", "rounds", "clients", "fraction", "local_epochs", "train_subset", "test_subset", "partition", "dirichlet_alpha",
    "device",
)  # fmt: skip
DEFAULT_MODEL = "cnn"  # the study is about the federation, not the defence: the packaged TOML's model is not used
# what the study changes in the packaged TOML besides the model, to keep a grid of ~100 runs in hours on 2 cores:
# MNIST on 20,000 training rows (100 per client) and 2,000 test images, for 20 rounds, where attack-free FedAvg
# gains less than a point over the next 10 (IID: 0.954 at round 20, 0.963 at 30; README, "Poisoning study")
STUDY_SETTINGS: dict[str, dict[str, Any]] = {"mnist": {"rounds": 20, "train_subset": 20000, "test_subset": 2000}, "ctu13": {}}
# the rules are told the count of malicious clients a round holds with this probability (byzantine_for)
BYZANTINE_COVERAGE = 0.99

# on_progress(description, runs done (a fraction within the current run), runs in all)
OnProgress = Callable[[str, float, int], None]


@dataclass(frozen=True)
class PoisonRun:
    """One grid point: its attack (None at f = 0), f, aggregator, run folder name and validated config."""

    attack: str | None
    fraction: float
    aggregator: str
    name: str
    config: TrainConfig

    @property
    def label(self) -> str:
        return f"{self.attack or 'none'} f={self.fraction:g} {self.aggregator}"


def _choices(values: Sequence[str], allowed: Sequence[str], option: str, shown: Sequence[str] | None = None) -> list[str]:
    """``values`` stripped, deduplicated and checked against ``allowed`` (the error lists ``shown``, by default all)."""
    shown = ", ".join(shown or allowed)
    chosen = list(dict.fromkeys(v.strip() for v in values if v.strip()))
    if not chosen:
        raise DipsenError(f"{option} needs at least one of {shown}")
    unknown = [v for v in chosen if v not in allowed]
    if unknown:
        raise DipsenError(f"{option}: unknown {', '.join(map(repr, unknown))}; choose from {shown}")
    return chosen


# an attack's variant in --attacks: "ATTACK:OPTION=VALUE[,...]" sets the config field of OPTION for that attack's runs
VARIANT_OPTIONS: dict[str, tuple[str, type]] = {
    "z": ("alie_z", float),
    "eps": ("ipm_eps", float),
    "perturbation": ("minmax_perturbation", str),
    "knowledge": ("attack_knowledge", str),
    "rate": ("poison_rate", float),  # the backdoors: the share of a malicious client's rows stamped
    "rounds": ("backdoor_rounds", str),  # the backdoors: their window "A-B", to measure persistence after it
    "epochs": ("poison_epochs", int),  # the backdoors: local epochs on the poisoned rows
    "alpha": ("alie_alpha", float),  # alie-backdoor: the backdoor loss's weight against the pull into the spread
}


def attack_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """``(attack, {config field: value})`` of an --attacks entry: "ipm:eps=10" -> ("ipm", {"ipm_eps": 10.0}).

    Several options are separated by ";" ("min-max:perturbation=sign;knowledge=partial"); the
    run's config checks the values.
    """
    attack, _, rest = spec.partition(":")
    if attack not in ATTACKS:
        raise DipsenError(f"--attacks: unknown {attack!r}; choose from {', '.join(ATTACKS)}")
    fields = {}
    for item in filter(None, rest.split(";")):
        option, equals, value = item.partition("=")
        if option not in VARIANT_OPTIONS or not equals or not value:
            raise DipsenError(
                f"--attacks: {spec!r}: a variant is ATTACK:OPTION=VALUE with OPTION one of {', '.join(VARIANT_OPTIONS)}"
            )
        field, kind = VARIANT_OPTIONS[option]
        try:
            fields[field] = kind(value)
        except ValueError:
            raise DipsenError(f"--attacks: {spec!r}: {option} must be a number, got {value!r}") from None
    return attack, fields


def defence_parts(defence: str) -> tuple[str, str]:
    """``(pre_aggregation, rule)`` of a defence name: "median" -> ("none", "median"), "nnm+dnc" -> ("nnm", "dnc")."""
    pre, _, rule = defence.rpartition("+")
    return pre or "none", rule


def study_options(
    dataset: str = "mnist",
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    aggregators: Sequence[str] = DEFAULT_AGGREGATORS,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    *,
    target_accuracy: float | None = None,
    config_file: Path | None = None,
    train: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The study's options, checked: what ``options.json`` records and :func:`poison_study` runs.

    The base training settings are the data set's packaged TOML with :data:`DEFAULT_MODEL` (or
    ``config_file`` as it is), then ``train`` (flags: :data:`TRAIN_FLAGS`, None = not given),
    resolved and validated here.
    Raises :class:`~dipsen.errors.DipsenError` (one line) on any bad value, before anything is written.
    """
    if dataset not in DATASETS:
        raise DipsenError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    attacks = list(dict.fromkeys(a.strip() for a in attacks if a.strip()))
    if not attacks:
        raise DipsenError(f"--attacks needs at least one of {', '.join(ATTACKS)}")
    for spec in attacks:
        attack_variant(spec)
    pre = "|".join(p for p in PRE_AGGREGATIONS if p != "none")
    aggregators = _choices(aggregators, DEFENCES, "--aggregators", [*AGGREGATORS, f"each after {pre}+ (nnm+median)"])
    bad = [f for f in fractions if not (isinstance(f, int | float) and 0 <= f < 1)]
    if not fractions or bad:
        raise DipsenError(f"--fractions must be numbers in [0, 1), got {', '.join(map(str, fractions)) or 'none'}")
    if target_accuracy is not None and not 0 < target_accuracy <= 1:
        raise DipsenError(f"--target-accuracy must be a number in (0, 1], got {target_accuracy}")
    overrides = {k: v for k, v in (train or {}).items() if v is not None}
    if unknown := sorted(set(overrides) - set(TRAIN_FLAGS)):
        raise DipsenError(f"unknown training option(s) {', '.join(unknown)}")
    if config_file is None:
        with resources.as_file(resources.files("dipsen") / "configs" / f"{dataset}.toml") as path:
            base = load_config(path, {"model": DEFAULT_MODEL, **STUDY_SETTINGS[dataset], **overrides, "dataset": dataset})
    else:
        base = load_config(config_file, {**overrides, "dataset": dataset})
    resolve_device(base.device)  # a device this machine lacks fails here, before anything is written
    options = {
        "dataset": dataset,
        "attacks": attacks,
        "aggregators": aggregators,
        "fractions": sorted({float(f) for f in fractions}),
        "target_accuracy": target_accuracy,
        "train": base.to_dict(),
    }
    plan(options)  # every run's config is valid
    return options


def byzantine_for(fraction: float, clients: int, clients_per_round: int) -> int:
    """The malicious clients a round's m will hold with probability :data:`BYZANTINE_COVERAGE`.

    The round samples m of the K clients without replacement, round(f K) of them malicious, so
    the count of malicious clients in a round is hypergeometric; the server must be told a bound
    it rarely exceeds, not its mean: at K = 200, m = 20, f = 0.2 the mean is 4, but a round holds
    more than 4 with probability 0.37, and a Krum-family rule told 4 then keeps attackers.
    """
    from scipy.stats import hypergeom

    malicious = malicious_count(clients, fraction)
    return int(hypergeom.ppf(BYZANTINE_COVERAGE, clients, malicious, clients_per_round))


def exceeded(byzantine: int, fraction: float, clients: int, clients_per_round: int) -> float:
    """P(a round's m hold more than ``byzantine`` malicious clients), from the same hypergeometric law."""
    from scipy.stats import hypergeom

    return float(hypergeom.sf(byzantine, clients, malicious_count(clients, fraction), clients_per_round))


def largest_byzantine(defence: str, clients_per_round: int, bucket_size: int = 2) -> int:
    """The largest f the defence accepts at m (:func:`~dipsen.federated.aggregate.min_updates`: m >= 2f + 3 for
    krum, multi-krum; 4f + 3 for bulyan; f + 1 for dnc and nnm; after bucketing, of the ceil(m / s) buckets)."""
    pre, rule = defence_parts(defence)
    f = 0
    while min_updates(rule, f + 1, pre, bucket_size) <= clients_per_round:
        f += 1
    return f


def told_byzantine(defence: str) -> bool:
    """Whether the defence is told the number of malicious clients (``byzantine``): the Krum family, DnC, NNM."""
    pre, rule = defence_parts(defence)
    return rule in BYZANTINE_AGGREGATORS or pre == "nnm"


def p_more_than_told(config: TrainConfig, fraction: float) -> float | None:
    """P(a round holds more malicious clients than the rule was told of); None for rules told nothing, or without attack."""
    m = config.clients_per_round
    told = {"trimmed-mean": trim_count(config.trim_fraction, m)}.get(config.aggregator, config.byzantine)
    if fraction == 0 or (not config.byzantine and config.aggregator != "trimmed-mean"):
        return None
    return exceeded(told, fraction, config.clients, m)


def plan(options: dict[str, Any]) -> list[PoisonRun]:
    """The grid's runs in table order: f = 0 for each aggregator, then attack x f > 0 x aggregator."""
    base = TrainConfig.from_dict(dict(options["train"]), source="options")
    points: list[tuple[str | None, float]] = [(None, 0.0)] if 0.0 in options["fractions"] else []
    points += [(attack, f) for attack in options["attacks"] for f in options["fractions"] if f > 0]
    # the server is configured for the study's worst threat in every run, the attack-free ones too: it cannot
    # know whether it is attacked, and the attack-free row is then the price of that configuration
    m = base.clients_per_round
    worst = max(options["fractions"])
    bound = byzantine_for(worst, base.clients, m) if worst > 0 else 0
    runs = []
    for attack, fraction in points:
        for defence in options["aggregators"]:
            pre, aggregator = defence_parts(defence)
            byzantine = min(bound, largest_byzantine(defence, m, base.bucket_size)) if told_byzantine(defence) else 0
            # trimmed-mean is told the attackers' share as the Krum family is told their number: bound / m, of
            # which it cuts exactly bound at m (trim_count's tolerance; int(15/44 * 44) would be 14)
            trim = base.trim_fraction
            if aggregator == "trimmed-mean":
                trim = max(trim, bound / m)
            variant = {} if attack is None else attack_variant(attack)[1]
            config = dataclasses.replace(
                base,
                aggregator=aggregator,
                pre_aggregation=pre,
                byzantine=byzantine,
                trim_fraction=min(trim, MAX_TRIM_FRACTION),
                malicious_fraction=fraction,
                malicious_attack=None if attack is None else attack_variant(attack)[0],
                keep_checkpoints="last",  # the study reads metrics.jsonl and final_metrics.json only
                # every round's test accuracy and success rate are the study's figures (rounds to the target, a
                # window's end, the curves), so on the whole test set, as in the studies before the round slice
                round_eval_size=0,
                **variant,
            )
            name = f"{attack or 'none'}-f{fraction:g}-{defence}"
            try:
                config.validate()
            except ConfigError as exc:
                raise DipsenError(f"run {name}: {exc}") from None
            runs.append(PoisonRun(attack, fraction, defence, name, config))
    return runs


def rounds_to(history: list[dict], target: float | None) -> int | None:
    """The first round whose test accuracy reaches ``target``; None if none does (or no target)."""
    if target is None:
        return None
    return next((r["round"] for r in history if r["test_accuracy"] is not None and r["test_accuracy"] >= target), None)


def run_record(run: PoisonRun, folder: Path, target: float | None) -> dict[str, Any]:
    """What poisoning.json records of a finished run."""
    done = RunDir.open(folder)
    history = done.metrics()
    final = done.read_json("final_metrics.json")
    evaluated = [r for r in history if r["test_accuracy"] is not None]  # eval_every > 1 leaves rounds unevaluated
    best = max(evaluated, key=lambda r: r["test_accuracy"]) if evaluated else None
    info = done.read_json("run_info.json")
    return {
        "attack": run.attack,
        "fraction": run.fraction,
        "aggregator": run.aggregator,
        "pre_aggregation": run.config.pre_aggregation,
        "byzantine": run.config.byzantine,
        "malicious_clients": len((info.get("malicious") or {}).get("clients", [])),
        "p_more_than_byzantine": p_more_than_told(run.config, run.fraction),
        "final_accuracy": final["accuracy"],
        "best_accuracy": None if best is None else best["test_accuracy"],
        "best_round": None if best is None else best["round"],
        "rounds_to_target": rounds_to(history, target),
        "rounds": final["rounds"],
        "test_accuracy": [r["test_accuracy"] for r in history],
        "eval_rows": [r.get("eval_rows") for r in history],  # the test rows of each; None in runs older than the field
        # a backdoor's success rate (None for the other attacks and runs from before it was recorded)
        "attack_success_rate": final.get("attack_success_rate"),
        "success_rates": [r.get("attack_success_rate") for r in history],
        "backdoor_rounds": run.config.backdoor_rounds,
        "backdoor_target": run.config.backdoor_target,
        "recall": {c["class"]: c["recall"] for c in final.get("per_class", [])},  # clean, per class
        "rejected_updates": sum(len(r["rejected"]) for r in history),
        "admission": admission(history, set((info.get("malicious") or {}).get("clients", [])), run.config.backdoor_rounds),
        "seconds": training_seconds(folder),
        "run": str(folder),
    }


def admission(history: list[dict], malicious: set[int], window: str | None) -> dict[str, float | None] | None:
    """What a filtering rule let in, over the rounds it recorded ``admitted`` in (and the attack window's, if any):
    ``malicious_admitted``, the share of the malicious clients' valid updates it admitted, and ``honest_rejected``,
    the share of the honest clients' valid updates it left out (None where there were none). None for a run whose
    rule admits or rejects no update (FedAvg, median, trimmed mean, centered clipping) or that predates the record."""
    first, last = (1, len(history)) if window is None else map(int, window.split("-"))
    sent, kept = {True: 0, False: 0}, {True: 0, False: 0}
    for r in history:
        if r.get("admitted") is None or r["clients"] is None or not first <= r["round"] <= last:
            continue
        refused, admitted = {x["client"] for x in r["rejected"]}, set(r["admitted"])
        for client in r["clients"]:
            if client not in refused:
                sent[client in malicious] += 1
                kept[client in malicious] += client in admitted
    if not sent[True] + sent[False]:
        return None
    return {
        "malicious_admitted": kept[True] / sent[True] if sent[True] else None,
        "honest_rejected": (sent[False] - kept[False]) / sent[False] if sent[False] else None,
    }


def _admission_cell(record: dict) -> str:
    share = record.get("admission")
    if share is None:
        return ""
    malicious, honest = share["malicious_admitted"], share["honest_rejected"]
    return f"{'–' if malicious is None else f'{malicious:.2f}'} / {'–' if honest is None else f'{honest:.2f}'}"


def _naive(attack: str) -> bool:
    return attack_variant(attack)[0] in NAIVE_ATTACKS


def _backdoor(attack: str) -> bool:
    return attack_variant(attack)[0] in BACKDOOR_ATTACKS


def _lowest(runs: list[dict]) -> dict | None:
    worst = min(runs, key=lambda r: r["final_accuracy"], default=None)
    return None if worst is None else {"accuracy": worst["final_accuracy"], "attack": worst["attack"]}


def _attacked_cells(records: list[dict]) -> Iterator[tuple[float, str, list[dict]]]:
    """``(f, defence, its runs at f)`` for every f > 0 and defence with runs there, in table order."""
    for fraction in sorted({r["fraction"] for r in records if r["fraction"] > 0}):
        for defence in dict.fromkeys(r["aggregator"] for r in records):
            if runs := [r for r in records if r["fraction"] == fraction and r["aggregator"] == defence]:
                yield fraction, defence, runs


def worst_cases(records: list[dict]) -> list[dict]:
    """Per defence and f > 0: the final accuracy it is judged by, the worst over what an attacker can do.

    The attacker may also behave honestly, so the worst case is the minimum over the defence's
    attack-free run (when the study has one) and every attack at that f, as the evasion study's
    worst case includes clean accuracy. Also split by family: the naive attacks the rules were
    designed against (``classical``) and the attacks built against them (``adaptive``; the backdoors,
    judged by :func:`backdoor_worst_cases`, are in neither but count in the worst case); each
    ``{"accuracy", "attack"}`` (None if the study ran none of that family). ``drop`` is the worst
    case's distance below attack-free FedAvg, when the study has that run.
    """
    free = {r["aggregator"]: r["final_accuracy"] for r in records if r["attack"] is None}
    reference = free.get("fedavg")
    summary = []
    for fraction, defence, runs in _attacked_cells(records):
        candidates = [*runs, *([{"final_accuracy": free[defence], "attack": None}] if defence in free else [])]
        worst = _lowest(candidates)
        summary.append(
            {
                "aggregator": defence,
                "fraction": fraction,
                "attack_free": free.get(defence),
                "classical": _lowest([r for r in runs if _naive(r["attack"])]),
                "adaptive": _lowest([r for r in runs if not _naive(r["attack"]) and not _backdoor(r["attack"])]),
                "worst": worst,
                "drop": None if reference is None or worst is None else reference - worst["accuracy"],
            }
        )
    return summary


def backdoor_worst_cases(records: list[dict]) -> list[dict]:
    """Per defence and f > 0 with backdoor runs: the highest final attack success rate over the backdoor attacks.

    ``{"aggregator", "fraction", "attack", "attack_success_rate", "accuracy" (main task, same run),
    "attack_free" (the defence's f = 0 accuracy, if run)}``.
    """
    free = {r["aggregator"]: r["final_accuracy"] for r in records if r["attack"] is None}
    summary = []
    for fraction, defence, runs in _attacked_cells(records):
        if backdoors := _backdoor_runs(runs):
            worst = max(backdoors, key=lambda r: r["attack_success_rate"])
            averaged = [(rate, r["attack"]) for r in backdoors if (rate := window_mean(r)) is not None]
            summary.append(
                {
                    "aggregator": defence,
                    "fraction": fraction,
                    "attack": worst["attack"],
                    "attack_success_rate": worst["attack_success_rate"],
                    "accuracy": worst["final_accuracy"],
                    "attack_free": free.get(defence),
                    "window_end": window_end(worst),
                    "window_mean": None
                    if not averaged
                    else dict(zip(("attack_success_rate", "attack"), max(averaged), strict=True)),
                    **triggered_recall(worst, max(averaged, default=(0.0,))[0]),
                }
            )
    return summary


def triggered_recall(record: dict, worst_mean: float = 0.0) -> dict:
    """On a two-class task, the recall of the class that is not the target on triggered inputs, 1 - ASR (ASR counts
    exactly those inputs assigned the target), beside its recall on clean inputs: CTU-13's "triggered botnet recall".
    The lower of the final and the window-mean figure (``worst_mean``, the highest mean ASR of the cell), so a
    backdoor that held through the window but faded in the last round still counts.
    ``{"victim", "triggered_recall", "clean_recall"}``; empty for other tasks or runs saved before per-class recall."""
    recall = record.get("recall") or {}
    target = record.get("backdoor_target")
    if len(recall) != 2 or target is None:
        return {}
    victim = list(recall)[1 - target]
    rate = max(record["attack_success_rate"], worst_mean)
    return {"victim": victim, "triggered_recall": 1 - rate, "clean_recall": recall[victim]}


def _backdoor_runs(records: list[dict]) -> list[dict]:
    """The runs of a backdoor attack that recorded a success rate."""
    return [r for r in records if r["attack"] is not None and _backdoor(r["attack"]) and r.get("attack_success_rate") is not None]


def _success_cell(record: dict) -> str:
    end = window_end(record)
    persisted = "" if end is None else f" ({end['attack_success_rate']:.3f} at round {end['round']})"
    mean = window_mean(record)
    averaged = "" if mean is None else f"; mean {mean:.3f}"
    return f"{record['attack_success_rate']:.3f}{persisted}{averaged}"


def window_mean(record: dict) -> float | None:
    """A backdoor run's mean success rate over the rounds of its attack window (every round without one), less the
    first tenth of the run (at least 2 rounds: a barely trained model answers one class, which counts as success on
    every input): the final rate is one round's figure, and a backdoor that a round without attackers erased after
    holding for most of the run shows here. None where no such round recorded a rate."""
    rates = record.get("success_rates") or []
    window = record.get("backdoor_rounds")
    first, last = (1, len(rates)) if window is None else map(int, window.split("-"))
    first = max(first, max(2, len(rates) // 10) + 1)
    kept = [rate for rate in rates[first - 1 : last] if rate is not None]
    return sum(kept) / len(kept) if kept else None


def window_end(record: dict) -> dict | None:
    """A backdoor run attacking in a window that ends before the last round: ``{"round", "attack_success_rate"}`` at
    the window's last round, against which the final rate shows how the backdoor persists; None otherwise."""
    window = record.get("backdoor_rounds")
    if window is None:
        return None
    last = int(window.split("-")[1])
    rates = record.get("success_rates") or []
    if last >= len(rates) or rates[last - 1] is None:
        return None
    return {"round": last, "attack_success_rate": rates[last - 1]}


def backdoor_table(summary: list[dict]) -> Table:
    """The worst success rate per defence and f, with the main task beside it; persistence where a window ended early."""
    persistence = any(b.get("window_end") for b in summary)
    victims = {b["victim"] for b in summary if "victim" in b}
    rows = []
    for b in summary:
        row = [
            b["aggregator"],
            f"{b['fraction']:g}",
            f"{b['attack_success_rate']:.3f} ({b['attack']})",
            "–"
            if b.get("window_mean") is None
            else f"{b['window_mean']['attack_success_rate']:.3f} ({b['window_mean']['attack']})",
            f"{b['accuracy']:.3f}",
            "–" if b["attack_free"] is None else f"{b['attack_free']:.3f}",
        ]
        if persistence:
            end = b.get("window_end")
            row.append("–" if end is None else f"{end['attack_success_rate']:.3f} (round {end['round']})")
        if victims:
            row += ["–", "–"] if "victim" not in b else [f"{b['triggered_recall']:.3f}", f"{b['clean_recall']:.3f}"]
        rows.append(row)
    headers = [
        "defence",
        "f",
        "worst attack success rate",
        "worst mean over the window",
        "main-task accuracy, same run",
        "no attack",
    ]
    caption = (
        "final models; attack success rate = share of triggered test inputs not of the target class that the model "
        "assigns to the target, the highest over the study's backdoor attacks; beside it the highest mean rate over "
        "an attack's window (the first tenth of the run, at least 2 rounds, left out); main-task accuracy of the "
        "final rate's run"
    )
    if persistence:
        headers.append("success rate at the window's end")
        caption += "; where that attack stopped before the last round, its rate at its window's last round beside the final one"
    if victims:
        victim = "/".join(sorted(victims))
        headers += [f"{victim} recall, triggered (1 - ASR)", f"{victim} recall, clean (same run)"]
        caption += (
            f"; two classes: the {victim} inputs' recall with the trigger is 1 - ASR (the higher of the two rates), "
            "beside their recall without it"
        )
    return Table(headers, rows, caption=caption)


def poison_study(
    out: Path,
    options: dict[str, Any],
    *,
    resume: bool = False,
    on_progress: OnProgress | None = None,
    ray_address: str | None = None,
) -> Path:
    """Run the grid of ``options`` (:func:`study_options`) into ``out``; returns poisoning.md's path.

    ``resume``: finish the study begun in ``out`` (its options.json must record ``options``). Each run is
    one unit (:mod:`dipsen.report.scheduling`), run here in order or, with ``ray_address``, as a Ray task;
    the report reads the finished run folders.
    """
    runs = plan(options)
    here = on_progress if ray_address is None else None  # a Ray task's rounds would be counted in another process
    units = [
        Unit(
            run.label,
            partial(_grid_run, out / "runs" / run.name, run, runs[0].config, _round_progress(here, run.label, i, len(runs))),
            cpus=run.config.workers or 1,
        )
        for i, run in enumerate(runs)
    ]
    done: list[Unit] = []

    def on_done(unit: Unit) -> None:
        done.append(unit)
        if on_progress:
            on_progress(f"done {unit.label}", len(done), len(units))

    start = time.perf_counter()
    with scheduler(ray_address) as run_units:
        open_output(out, options, resume)
        run_units(units, on_done)
    records = [run_record(run, out / "runs" / run.name, options["target_accuracy"]) for run in runs]
    return _write_report(out, options, records, time.perf_counter() - start)


def _grid_run(folder: Path, run: PoisonRun, data: TrainConfig, progress: ProgressFactory | None) -> None:
    """``run`` trained to its end in ``folder`` (resumed if begun) unless finished, on the data set ``data`` (a config)
    loads: every run's, as the runs differ in aggregation and attack only."""
    if not RunDir(folder).finished():
        train_run(folder, run.config, dataset_for(data), progress, run.label)


def _write_report(out: Path, options: dict[str, Any], records: list[dict], seconds: float, **extra: Any) -> Path:
    """poisoning.json, its plots and poisoning.md in ``out`` from the finished runs' ``records``; poisoning.md's path."""
    base = plan(options)[0].config
    # paths relative to the report, so that a report moved with its runs (or committed without them) still reads
    records = [{**r, "run": os.path.relpath(r["run"], out)} for r in records]
    results = {
        "dataset": options["dataset"],
        "machine": machine_description(),
        "options": options,
        "model": base.model,
        "clients": base.clients,
        "clients_per_round": base.clients_per_round,
        "rounds": base.rounds,
        "local_epochs": base.local_epochs,
        "seconds": {"training": sum(r["seconds"] for r in records), "this_call": seconds},
        **extra,
        "runs": records,
        "worst_case": worst_cases(records),
        "backdoor_worst_case": backdoor_worst_cases(records),
    }
    write_atomic(out / RESULTS_FILE, lambda f: f.write(json.dumps(results, indent=1).encode()))
    accuracy_plot(records, out / PLOT_FILE, f"{options['dataset']}: test accuracy under attack")
    heatmap(records, out / HEATMAP_FILE, f"{options['dataset']}: final test accuracy, defence x attack")
    if _backdoor_runs(records):
        success_plot(records, out / SUCCESS_PLOT_FILE, f"{options['dataset']}: backdoor attack success rate")
    (out / TABLE_FILE).write_text(to_markdown(report_blocks(results)))
    return out / TABLE_FILE


def _settings(options: dict[str, Any]) -> dict[str, Any]:
    """What merged studies must share: the base training settings (a key a study's version did not have at its
    default), the data set and the target accuracy."""
    train = TrainConfig.from_dict(dict(options["train"]), source="options").to_dict()
    return {**train, "dataset": options["dataset"], "target_accuracy": options["target_accuracy"]}


def _merged_report(folder: Path) -> dict[str, Any] | None:
    """The results of the report in ``folder`` if it is one written by ``--merge`` (no options.json of a
    study, a poisoning.json of a report); None for a study folder."""
    file = folder / RESULTS_FILE
    if (folder / OPTIONS_FILE).exists() or not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise DipsenError(f"{file}: corrupt: {exc}") from None


def merge_studies(out: Path, studies: Sequence[Path]) -> Path:
    """One report in ``out`` of the finished ``studies`` (``dipsen poison-study --merge``); poisoning.md's path.

    A grid is often run in parts: the attacks built against one rule only against that rule, a
    variant or a defence added later. The studies must share the data set and every base training
    setting; their attacks, defences and f are the union, in the order first met, and a run of the
    same name in two studies is taken from the first. The runs stay in their studies' folders
    (``poisoning.json`` records each one's path, relative to ``out``). A source may also be a report
    written by an earlier merge: its ``poisoning.json`` records are taken as they stand, so a report
    grows by merging it with new studies after the runs it came from are gone. Refused, before
    anything is written, if ``out`` is not new or empty, or a study is unfinished (resume it first).
    """
    if out.exists() and any(out.iterdir()):
        raise DipsenError(f"{out} exists and is not empty; choose a new --out folder")
    if not studies:
        raise DipsenError("--merge needs at least one study folder")
    records: dict[str, dict] = {}
    merged: dict[str, Any] | None = None
    told_at: set[float] = set()  # each study's largest f, at which its rules were told the attackers' number
    studied: list[str] = []
    for study in studies:
        if not (study / OPTIONS_FILE).is_file() and not (study / RESULTS_FILE).is_file():
            raise DipsenError(f"{study}: not a poison-study folder or report (no {OPTIONS_FILE} or {RESULTS_FILE})")
        report = _merged_report(study)
        options = recorded_options(study) if report is None else report["options"]
        # a report lists the f of each study it merged; a study (or a report from before told_at) its largest f
        told_at.update((report or {}).get("told_at") or [max(options["fractions"])])
        if merged is None:
            merged = {**options, "attacks": [], "aggregators": [], "fractions": []}
        first, this = _settings(merged), _settings(options)
        if differ := sorted(k for k in first.keys() | this.keys() if first.get(k) != this.get(k)):
            raise DipsenError(f"{study} differs from {studies[0]} in {', '.join(differ)}: only studies of one setting merge")
        for key in ("attacks", "aggregators", "fractions"):
            merged[key] = list(dict.fromkeys([*merged[key], *options[key]]))
        if report is not None:  # its records' and studies' paths are relative to the report: made relative to out
            for record in report["runs"]:
                run = os.path.normpath(study / record["run"])
                records.setdefault(Path(run).name, {**record, "run": run})
            sources = [study / s for s in report["studies"]] if report.get("studies") else [study]
            studied += [os.path.relpath(os.path.normpath(s), out) for s in sources]
            continue
        for run in plan(options):
            folder = study / "runs" / run.name
            if not RunDir(folder).finished():
                raise DipsenError(f"{study}: run {run.name} is unfinished; finish it first with --resume {study}")
            records.setdefault(run.name, run_record(run, folder, options["target_accuracy"]))
        studied.append(os.path.relpath(study, out))
    assert merged is not None
    merged["fractions"] = sorted(merged["fractions"])
    order = {name: i for i, name in enumerate(run.name for run in plan(merged))}
    ordered = sorted(records.items(), key=lambda item: order.get(item[0], len(order)))
    out.mkdir(parents=True, exist_ok=True)
    return _write_report(out, merged, [r for _, r in ordered], 0.0, studies=studied, told_at=sorted(told_at))


def _round_progress(on_progress: OnProgress | None, label: str, index: int, total: int):
    """A ProgressFactory for :func:`train_run` that moves the runs bar by a fraction per round."""
    if on_progress is None:
        return None

    def factory(description: str, rounds: int):
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            on_progress(f"run {index + 1}/{total}: {label}", index + min(done, rounds) / max(rounds, 1), total)

        return advance

    return factory


def _row_label(attack: str | None, fraction: float) -> str:
    return "no attack (f = 0)" if attack is None else f"{attack}, f = {fraction:g}"


def table_rows(records: list[dict], value: Callable[[dict], str]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows: attack x f down (the attack-free row first, as planned), aggregators across."""
    aggregators = list(dict.fromkeys(r["aggregator"] for r in records))
    cells: dict[tuple[str | None, float], dict[str, str]] = {}
    for r in records:
        cells.setdefault((r["attack"], r["fraction"]), {})[r["aggregator"]] = value(r)
    rows = [[_row_label(*key), *(row.get(a, "") for a in aggregators)] for key, row in cells.items()]
    return ["attack", *aggregators], rows


def _cell(entry: dict | None) -> str:
    return "–" if entry is None else f"{entry['accuracy']:.3f} ({entry['attack'] or 'no attack'})"


def worst_case_table(summary: list[dict]) -> Table:
    """The figure each defence is judged by, per f: the best worst case at each f in bold."""
    best = {f: max(w["worst"]["accuracy"] for w in summary if w["fraction"] == f) for f in {w["fraction"] for w in summary}}
    rows = []
    for w in summary:
        worst = _cell(w["worst"])
        if w["worst"]["accuracy"] == best[w["fraction"]]:
            worst = f"**{worst}**"
        rows.append(
            [
                w["aggregator"],
                f"{w['fraction']:g}",
                "–" if w["attack_free"] is None else f"{w['attack_free']:.3f}",
                _cell(w["classical"]),
                _cell(w["adaptive"]),
                worst,
                "–" if w["drop"] is None else f"{-100 * w['drop'] + 0.0:+.1f}".replace("-0.0", "+0.0"),
            ]
        )
    headers = ["defence", "f", "no attack", "naive attacks' worst", "adaptive attacks' worst", "worst case"]
    headers.append("points vs attack-free FedAvg")
    return Table(
        headers,
        rows,
        caption="final test accuracy; worst case = the lowest over no attack and every attack at that f (the attacker may "
        "also behave honestly); naive = " + ", ".join(NAIVE_ATTACKS) + "; adaptive = the attacks built against robust rules "
        "(the backdoors count in the worst case only)",
    )


def _client_dp(train: dict[str, Any]) -> str:
    """The preamble's words for client-level DP noise: none without it (studies saved before the key, too)."""
    if train.get("client_dp_noise") is not None:
        return f"client-level DP noise multiplier {train['client_dp_noise']:g} (noise std z x clip norm on the sum), "
    if train.get("client_dp_epsilon") is not None:
        return f"client-level DP at epsilon {train['client_dp_epsilon']:g}, "
    return ""


def _told_at(results: dict[str, Any]) -> str:
    """The f at which the rules were told the attackers' number: the largest, or each merged study's largest."""
    told_at = results.get("told_at") or []
    if len(told_at) < 2:
        return "the largest f"
    shown = ", ".join(f"{f:g}" for f in told_at)
    return f"the largest f of the study each run comes from (these merged studies': {shown}; see poisoning.json's byzantine)"


def report_blocks(results: dict[str, Any]) -> list[Block]:
    options, records = results["options"], results["runs"]
    train = options["train"]
    headers, rows = table_rows(records, lambda r: f"{r['final_accuracy']:.3f}")
    k, m = results["clients"], results["clients_per_round"]
    partition = train["partition"] + (f"({train['dirichlet_alpha']:g})" if train["partition"] == "dirichlet" else "")
    blocks: list[Block] = [
        Heading(f"Poisoning study: {options['dataset']}", 1),
        Paragraph(
            f"{results['model']} on {options['dataset']}, {partition} partition, K = {k} clients, m = {m} per round, "
            f"{results['rounds']} rounds of {results['local_epochs']} local epoch(s); f of the K clients malicious "
            f"(round(f K), seeded), so about f m per round. In every run, the attack-free ones too, the rules told the "
            f"attackers' number (the Krum family, DnC, NNM) are told how many a round holds with probability "
            f"{BYZANTINE_COVERAGE:g} at {_told_at(results)} (at most what the rule accepts at m); trimmed-mean cuts the larger "
            f"of {train['trim_fraction']:g} and that share at each end; "
            f"clip norm {train['clip_norm'] or 'none'}, {_client_dp(train)}"
            f"largest client weight {train['max_client_weight']:g}; colluding attacks with {train['attack_knowledge']} "
            f"knowledge. Measured on {results['machine']}: {results['seconds']['training'] / 60:.1f} min of training in all."
        ),
    ]
    if summary := results.get("worst_case"):
        blocks += [Heading("Worst case per defence", 2), worst_case_table(summary)]
    if backdoors := results.get("backdoor_worst_case"):
        blocks += [Heading("Backdoors: worst attack success rate per defence", 2), backdoor_table(backdoors)]
    blocks += [
        Heading("Every run", 2),
        Table(headers, rows, caption="final test accuracy (one noise draw for randomized models)"),
        Paragraph(f"![final test accuracy, defence x attack]({HEATMAP_FILE})"),
    ]
    if backdoor_runs := _backdoor_runs(records):
        headers, rows = table_rows(backdoor_runs, _success_cell)
        caption = (
            "final attack success rate of every backdoor run (main-task accuracy: the table above); in brackets, for an "
            "attack window that ended before the last round, the rate at its end; after it, the mean rate over the "
            "window (the first tenth of the run, at least 2 rounds, left out)"
        )
        blocks += [Table(headers, rows, caption=caption), Paragraph(f"![attack success rate against round]({SUCCESS_PLOT_FILE})")]
    if filtered := [r for r in records if r.get("admission") is not None]:
        headers, rows = table_rows(filtered, _admission_cell)
        caption = (
            "the filtering rules' admissions: the share of the malicious clients' valid updates the rule admitted / the "
            "share of the honest clients' valid updates it left out, over every round (a backdoor's: its attack window)"
        )
        blocks.append(Table(headers, rows, caption=caption))
    if options["target_accuracy"] is not None:
        target = options["target_accuracy"]
        headers, rows = table_rows(records, lambda r: "never" if r["rounds_to_target"] is None else str(r["rounds_to_target"]))
        blocks.append(Table(headers, rows, caption=f"rounds until the test accuracy first reached {target:g}"))
    blocks.append(Paragraph(f"![test accuracy against round]({PLOT_FILE})"))
    return blocks


def heatmap(records: list[dict], path: Path, title: str) -> Path:
    """Final test accuracy, one panel per f > 0: defences down, "no attack" then the attacks across; each row's worst boxed."""
    from matplotlib.colors import TwoSlopeNorm

    from .plots import plt  # matplotlib with the Agg backend

    fractions = sorted({r["fraction"] for r in records if r["fraction"] > 0}) or [0.0]
    defences = list(dict.fromkeys(r["aggregator"] for r in records))
    attacks = [None, *dict.fromkeys(r["attack"] for r in records if r["attack"] is not None)]
    free = {r["aggregator"]: r["final_accuracy"] for r in records if r["attack"] is None}
    width = 1.0 + 0.62 * len(attacks)
    fig, axes = plt.subplots(1, len(fractions), figsize=(width * len(fractions) + 1.5, 0.9 + 0.36 * len(defences)), squeeze=False)
    for ax, fraction in zip(axes[0], fractions, strict=True):
        grid = np.full((len(defences), len(attacks)), np.nan)
        for i, defence in enumerate(defences):
            grid[i, 0] = free.get(defence, np.nan)
            for r in records:
                if r["aggregator"] == defence and r["fraction"] == fraction and r["attack"] is not None:
                    grid[i, attacks.index(r["attack"])] = r["final_accuracy"]
        # yellow at 0.8: the differences that matter (0.8-1) get half the colour range, a collapse is plainly red
        image = ax.imshow(grid, cmap="RdYlGn", norm=TwoSlopeNorm(vcenter=0.8, vmin=0, vmax=1), aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7)
        for i, row in enumerate(grid):
            if not np.all(np.isnan(row)):
                j = int(np.nanargmin(row))
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=1.6))
        labels = ["no attack" if a is None else a for a in attacks]
        ax.set_xticks(range(len(attacks)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(defences)), defences, fontsize=7)
        ax.set_title(f"f = {fraction:g} (boxed: each defence's worst case)", fontsize=8)
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.03, label="final test accuracy")
    fig.suptitle(title, fontsize=10, y=1.0 + 0.25 / fig.get_figheight())
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def accuracy_label(records: list[dict]) -> str:
    """The accuracy plot's axis label: the test rows every round was measured on, where the records say (eval_rows)."""
    counts = sorted({n for r in records for n in r.get("eval_rows") or [] if n is not None})
    return f"test accuracy ({' or '.join(f'{n:,}' for n in counts)} test rows)" if counts else "test accuracy"


def accuracy_plot(records: list[dict], path: Path, title: str) -> Path:
    """Test accuracy against round: a panel per attack at the largest f, a line per aggregator, f = 0 dashed."""
    from matplotlib.ticker import MaxNLocator

    from .plots import plt  # matplotlib with the Agg backend

    largest = max(r["fraction"] for r in records)
    attacks = list(dict.fromkeys(r["attack"] for r in records if r["fraction"] == largest)) or [None]
    reference = {r["aggregator"]: r for r in records if r["attack"] is None}
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.2 * len(attacks), 3.6), squeeze=False, sharey=True)
    colours = {a: f"C{i}" for i, a in enumerate(dict.fromkeys(r["aggregator"] for r in records))}
    for ax, attack in zip(axes[0], attacks, strict=True):
        for aggregator, colour in colours.items():
            if attack is not None and aggregator in reference:
                curve = reference[aggregator]["test_accuracy"]
                ax.plot(range(1, len(curve) + 1), curve, color=colour, linestyle="--", linewidth=0.8, alpha=0.7)
            run = next(
                (r for r in records if r["attack"] == attack and r["fraction"] == largest and r["aggregator"] == aggregator), None
            )
            if run is not None:
                curve = run["test_accuracy"]
                ax.plot(range(1, len(curve) + 1), curve, color=colour, marker=".", label=aggregator)
        ax.set(title=_row_label(attack, largest), xlabel="round", ylim=(0, 1.02))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(accuracy_label(records))
    axes[0][0].legend(
        fontsize=7, title="dashed: no attack" if len(attacks) > 1 or attacks[0] is not None else None, title_fontsize=7
    )
    return _save(fig, path, title)


def success_plot(records: list[dict], path: Path, title: str) -> Path:
    """Attack success rate against round: a panel per backdoor attack and f (4 to a row), a line per defence, the window
    shaded."""
    from matplotlib.ticker import MaxNLocator

    from .plots import plt  # matplotlib with the Agg backend

    runs = _backdoor_runs(records)
    panels = list(dict.fromkeys((r["attack"], r["fraction"]) for r in runs))
    columns = min(len(panels), 4)
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.3 * rows), squeeze=False, sharey=True)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    colours = {a: f"C{i}" for i, a in enumerate(dict.fromkeys(r["aggregator"] for r in records))}
    for ax, (attack, fraction) in zip(axes.flat, panels, strict=False):
        window = next((r["backdoor_rounds"] for r in runs if r["attack"] == attack and r.get("backdoor_rounds")), None)
        if window is not None:
            first, last = (int(x) for x in window.split("-"))
            ax.axvspan(first - 0.5, last + 0.5, color="grey", alpha=0.15, label="attack window")
        for r in runs:
            if (r["attack"], r["fraction"]) == (attack, fraction):
                rates = [np.nan if v is None else v for v in r["success_rates"]]
                ax.plot(range(1, len(rates) + 1), rates, color=colours[r["aggregator"]], marker=".", label=r["aggregator"])
        ax.set(title=_row_label(attack, fraction), xlabel="round", ylim=(-0.02, 1.02))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("attack success rate")
    axes[0][0].legend(fontsize=7)
    return _save(fig, path, title)


def _save(fig, path: Path, title: str) -> Path:
    """``fig`` titled, laid out and written to ``path`` (its folder made), then closed."""
    from .plots import plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
