"""The paper's published figures, for the adjacent columns of the report (never used as results).

Source: "DiPSeN: Differentially Private Self-normalizing Neural Networks for Adversarial Robustness
in Federated Learning", Table I (CNN baseline), Fig. 6 (summary table; its last column is headed
"CTU-14", a typo for CTU-13) and section VIII-C (overhead). Fractions, not percent.
"""

from __future__ import annotations

DATASETS = ("mnist", "socofing", "ctu13")
DATASET_NAMES = {"mnist": "MNIST", "socofing": "SOCOFing", "socofing-gender": "SOCOFing (gender)", "ctu13": "CTU-13"}
TASK_VARIANTS = {"socofing-gender": ("socofing", {"socofing_task": "gender"})}
"""Study runs beyond one per data set: report key -> (the paper's data set, training-config overrides).
The paper names gender, hand and finger as SOCOFing's labels without saying which it predicts, so the
study trains SOCOFing on gender too (key ``socofing`` is the default hand x finger task); both rows sit
beside the paper's SOCOFing figures."""
REPORT_DATASETS = tuple(k for d in DATASETS for k in (d, *(v for v, (base, _) in TASK_VARIANTS.items() if base == d)))
"""Report keys in report order: each data set, then its task variants."""


def paper_dataset(key: str) -> str:
    """The paper's data set whose figures a report key is compared with."""
    return TASK_VARIANTS[key][0] if key in TASK_VARIANTS else key


ROWS = ("clean", "fgsm", "bim", "pgd")
ROW_NAMES = {"clean": "no adversarial samples", "fgsm": "FGSM", "bim": "BIM", "pgd": "PGD"}

FIG6 = {
    ("cnn", "mnist"): {"clean": 0.97, "fgsm": 0.37, "bim": 0.44, "pgd": 0.39},
    ("cnn", "socofing"): {"clean": 0.82, "fgsm": 0.35, "bim": 0.42, "pgd": 0.38},
    ("cnn", "ctu13"): {"clean": 0.92, "fgsm": 0.36, "bim": 0.44, "pgd": 0.38},
    ("dipsen", "mnist"): {"clean": 0.97, "fgsm": 0.81, "bim": 0.76, "pgd": 0.78},
    ("dipsen", "socofing"): {"clean": 0.81, "fgsm": 0.77, "bim": 0.74, "pgd": 0.75},
    ("dipsen", "ctu13"): {"clean": 0.90, "fgsm": 0.88, "bim": 0.88, "pgd": 0.86},
}
OVERHEAD = 0.009
"""Section VIII-C: DiPSeN adds 0.9% to the time per training step, on average over the data sets."""
STEP_SECONDS_CNN = {"mnist": 9.6, "socofing": 11.5, "ctu13": 4.8}
"""Section VIII-C: the CNN's 'average per training step' on an i7 + RTX 2070 (unit as printed)."""
