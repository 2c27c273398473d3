import numpy as np
import pytest

from dipsen.errors import ConfigError
from dipsen.partition import SCHEMES, partition, summarize

LABELS = np.random.default_rng(0).integers(0, 10, size=5000)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_every_sample_in_exactly_one_client(scheme):
    parts = partition(LABELS, 200, scheme, alpha=0.5, seed=1)
    assert len(parts) == 200
    joined = np.concatenate(parts)
    assert len(joined) == len(LABELS)
    assert np.array_equal(np.sort(joined), np.arange(len(LABELS)))
    assert min(len(p) for p in parts) >= 1


def test_iid_sizes_are_balanced_and_seeded():
    parts = partition(LABELS, 200, "iid", seed=3)
    assert {len(p) for p in parts} == {25}
    assert all(np.array_equal(a, b) for a, b in zip(parts, partition(LABELS, 200, "iid", seed=3), strict=True))


def test_label_skew_is_stronger_for_small_alpha_and_shards():
    def mean_classes(parts):
        return summarize(parts, LABELS, 10)["classes_per_client"]["mean"]

    iid = mean_classes(partition(LABELS, 50, "iid"))
    skewed = mean_classes(partition(LABELS, 50, "dirichlet", alpha=0.1))
    shards = mean_classes(partition(LABELS, 50, "shards", shards_per_client=2))
    assert iid == 10 and skewed < 6 and shards <= 3


def test_bad_requests_raise_config_errors():
    with pytest.raises(ConfigError, match="partition"):
        partition(LABELS, 10, "zipf")
    with pytest.raises(ConfigError, match="clients"):
        partition(LABELS[:5], 10, "iid")


def test_summary_counts():
    parts = partition(LABELS, 4, "shards", shards_per_client=1)
    s = summarize(parts, LABELS, 10)
    assert s["samples"] == 5000 and sum(c["samples"] for c in s["per_client"]) == 5000
    assert sum(sum(c["class_counts"]) for c in s["per_client"]) == 5000
