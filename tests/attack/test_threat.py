"""Threat models: which weights the attacker crafts on."""

import pytest

from dipsen.attack import RobustnessEvaluation
from dipsen.attack.target import same_weights
from dipsen.errors import DipsenError


def test_orange_box_crafts_on_the_stale_checkpoint(cnn_run):
    evaluation = RobustnessEvaluation(cnn_run, samples=10, stale_rounds=2)
    source, description = evaluation.source("orange-box")
    assert same_weights(source, cnn_run.model(cnn_run.final_round - 2))
    assert not same_weights(source, cnn_run.model())
    assert f"round {cnn_run.final_round - 2}" in description


def test_white_box_crafts_on_the_final_model(cnn_run):
    source, _ = RobustnessEvaluation(cnn_run, samples=10).source("white-box")
    assert same_weights(source, cnn_run.model())


def test_transfer_surrogate_is_trained_on_data_disjoint_from_the_evaluated_examples(cnn_run):
    evaluation = RobustnessEvaluation(cnn_run, samples=50, attacker_samples=300, surrogate_epochs=1)
    data = evaluation.data
    evaluated = {x.tobytes() for x in data.x_eval}
    assert not any(x.tobytes() in evaluated for x in data.x_attacker)
    assert len(data.y_attacker) == 300
    source, description = evaluation.source("transfer")
    assert not same_weights(source, cnn_run.model()) and "300 attacker examples" in description


def test_stale_rounds_must_be_positive(cnn_run):
    with pytest.raises(DipsenError, match="stale-rounds"):
        RobustnessEvaluation(cnn_run, samples=10, stale_rounds=0).source("orange-box")
