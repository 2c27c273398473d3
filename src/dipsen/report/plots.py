"""PNG figures of the report (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

from .paper import DATASET_NAMES  # noqa: E402


def robustness_curves(studies: dict[str, dict], dataset: str, path: Path) -> Path:
    """Fig. 5 counterpart: accuracy against eps for each model, PGD through one draw and EOT PGD, as the sweep ran them."""
    fig, ax = plt.subplots(figsize=(6, 4))
    chance = None
    for model, study in studies.items():
        sweep = study["sweep"]
        chance = sweep["chance"]
        # one-draw gradients judged by one draw (the paper's rule); EOT judged by the mean of draws
        for key, rule, style in (("single-draw", "single", "-"), ("adaptive", "mc", "--")):
            if key in sweep:
                curve, judged = sweep[key], "1 draw" if rule == "single" else "mean of draws"
                ax.plot(sweep["eps"], curve[rule], marker="o", linestyle=style, label=f"{model}: {curve['attack']} ({judged})")
    baselines = next((s["baselines"] for s in studies.values() if s.get("baselines")), None)
    if baselines is not None:  # trivial rules under their exact worst case, on the same eps
        eps = next(iter(studies.values()))["sweep"]["eps"]
        for name in ("one-feature", "logistic"):
            ax.plot(
                eps,
                baselines["sweep"]["robust_accuracy"][name][: len(eps)],
                linestyle=":",
                marker=".",
                linewidth=1,
                label=f"{name} rule: exact worst case",
            )
    if chance is not None:
        ax.axhline(chance, color="grey", linewidth=0.8, linestyle=":", label="majority class")
    ax.set(xlabel="eps (L-inf)", ylabel="accuracy", ylim=(0, 1.02), title=f"{DATASET_NAMES.get(dataset, dataset)}: PGD")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def grouped_bars(
    groups: list[str],
    series: dict[str, list[float | None]],
    title: str,
    ylabel: str,
    path: Path,
    ylim: tuple[float, float] | None = (0, 1.02),
) -> Path:
    """Bars for each group (x axis), one colour per series; None leaves a gap."""
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(groups) * max(1, len(series)) / 2), 4))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(
            [x for x, v in zip(xs, values, strict=True) if v is not None], [v for v in values if v is not None], width, label=name
        )
    ax.set_xticks(range(len(groups)), groups, rotation=20, ha="right", fontsize=8)
    ax.set(ylabel=ylabel, title=title)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def sigma_curves(
    sigmas: list[float], curves: dict[str, list[float]], reference: dict[str, float], path: Path, title: str
) -> Path:
    """Accuracy against the noise multiplier, with the CNN's figures as horizontal references."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in curves.items():
        ax.plot(sigmas, values, marker="o", label=name)
    for name, value in reference.items():
        ax.axhline(value, linestyle=":", linewidth=1, label=name, color="grey" if "clean" in name else "black")
    ax.set(xlabel="sigma (noise multiplier)", ylabel="accuracy", ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def certified_accuracy(curves: dict[str, dict[str, float]], title: str, path: Path) -> Path:
    """The field's standard plot: certified accuracy against L2 radius, one step curve per certificate."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, by_radius in curves.items():
        radii = [float(r) for r in by_radius]
        ax.step(radii, list(by_radius.values()), where="post", marker="o", label=name)
    ax.set(xlabel="L2 radius", ylabel="certified accuracy", ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
