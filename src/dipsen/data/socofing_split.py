"""Subject-wise train/test split of SOCOFing records that keeps duplicate image content on one side.

SOCOFing Real holds 11 groups of byte-identical files under different names, often of different
subjects and sometimes with different hand/finger labels (e.g. ``511__M_Left_middle_finger.BMP`` is
``590__M_Right_little_finger.BMP``). So that no image content is in both splits:

* subjects that share an image are joined (union-find) and each joined group goes to one split;
* within a group of identical files, one copy is kept when all copies have the same hand x finger
  label, and all copies are dropped when labels conflict (we cannot know which label is right).
  Altered variants (_CR/_Obl/_Zcut) of a dropped conflicting image are dropped with it.

Groups are shuffled with ``numpy.random.default_rng(seed)`` and assigned to the test split until it
holds ``round(test_fraction * subjects)`` subjects (groups that would overshoot go to train).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

TEST_FRACTION = 0.2


@dataclass(frozen=True)
class SubjectSplit:
    """Record indices of each split (sorted) and a JSON-serialisable description of how they were chosen."""

    train: np.ndarray
    test: np.ndarray
    info: dict


def split_by_subject(records: dict[str, np.ndarray], *, seed: int, test_fraction: float = TEST_FRACTION) -> SubjectSplit:
    """Split ``records`` (fields subject, hand, finger, variant, sha256, source) by subject.

    Guarantees: no subject and no sha256 in both splits, no sha256 twice in the result, and the same
    records and seed always give the same split.
    """
    subjects = records["subject"].astype(int)
    keep, dropped = _deduplicate(records)
    parent = {s: s for s in np.unique(subjects).tolist()}

    def find(s: int) -> int:
        while parent[s] != s:
            parent[s] = parent[parent[s]]  # path halving keeps the trees flat
            s = parent[s]
        return s

    for idx in _duplicate_groups(records["sha256"]):
        first, *others = (find(s) for s in subjects[idx].tolist())
        for root in others:
            parent[root] = first
    members = defaultdict(list)
    for s in sorted(parent):
        members[find(s)].append(s)
    groups = sorted(members.values())  # ordered by smallest subject id, so the shuffle depends only on seed

    target = round(test_fraction * len(parent))
    test_subjects: set[int] = set()
    for g in np.random.default_rng(seed).permutation(len(groups)).tolist():
        if len(test_subjects) + len(groups[g]) <= target:
            test_subjects.update(groups[g])
    in_test = np.isin(subjects, sorted(test_subjects))
    info = {
        "split": {
            "rule": "by subject; subjects sharing an identical image joined (union-find), groups shuffled",
            "seed": seed,
            "test_fraction": test_fraction,
            "subjects": {"train": len(parent) - len(test_subjects), "test": len(test_subjects)},
            "test_subject_ids": sorted(test_subjects),
            "joined_subject_groups": [g for g in groups if len(g) > 1],
        },
        "duplicates": {
            "records_read": len(subjects),
            "kept": int(keep.sum()),
            "dropped_identical_copies": dropped["same_label"],
            "dropped_conflicting_labels": dropped["conflict"],
            "dropped_altered_of_conflicting": dropped["altered"],
        },
        "counts": {"train": int((keep & ~in_test).sum()), "test": int((keep & in_test).sum())},
    }
    return SubjectSplit(np.flatnonzero(keep & ~in_test), np.flatnonzero(keep & in_test), info)


def _duplicate_groups(sha256: np.ndarray) -> list[np.ndarray]:
    """Index arrays of records sharing a sha256, for each hash that occurs more than once."""
    _, inverse, counts = np.unique(sha256, return_inverse=True, return_counts=True)
    return [np.flatnonzero(inverse == k) for k in np.flatnonzero(counts > 1)]


def _deduplicate(records: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, list[str]]]:
    """Mask of records to keep, and the source names dropped for each reason."""
    keep = np.ones(len(records["subject"]), dtype=bool)
    dropped: dict[str, list[str]] = {"same_label": [], "conflict": [], "altered": []}
    conflicting: set[tuple[int, str, str]] = set()
    for idx in _duplicate_groups(records["sha256"]):
        labels = {(records["hand"][i], records["finger"][i]) for i in idx}
        # Records are sorted by subject, so the copy kept is the lowest subject's.
        drop = idx if len(labels) > 1 else idx[1:]
        keep[drop] = False
        dropped["conflict" if len(labels) > 1 else "same_label"].extend(records["source"][drop].tolist())
        if len(labels) > 1:
            conflicting.update(_finger_key(records, i) for i in idx)
    for i in np.flatnonzero(keep & (records["variant"] != "")):
        if _finger_key(records, i) in conflicting:
            keep[i] = False
            dropped["altered"].append(str(records["source"][i]))
    return keep, dropped


def _finger_key(records: dict[str, np.ndarray], i: int | np.integer) -> tuple[int, str, str]:
    return int(records["subject"][i]), str(records["hand"][i]), str(records["finger"][i])
