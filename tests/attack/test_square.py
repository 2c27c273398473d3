"""Square searches only feasible inputs: what it believes it achieved is what the evaluation measures."""

import numpy as np
import pytest
import torch

from dipsen.attack import AttackSetup, Budget, RobustnessEvaluation, feasible_domain
from dipsen.attack.square import Square, window_fraction

EPS = 0.3


def test_square_on_ctu13_reports_exactly_what_the_deployed_model_does_on_its_feasible_output(ctu13, ctu13_run):
    domain = feasible_domain(ctu13)
    model = ctu13_run.model()
    x, y = torch.from_numpy(ctu13.x_test[:60]), torch.from_numpy(ctu13.y_test[:60]).long()
    torch.manual_seed(0)
    square = Square(model, EPS, queries=40, project=lambda c, xo: torch.from_numpy(domain.project(c.numpy(), xo.numpy(), EPS)))
    x_adv, success = square.attack(x, y, torch.from_numpy(domain.mask(x.numpy())))
    with torch.no_grad():
        wrong = model(x_adv).argmax(dim=1) != y
    assert torch.equal(success, wrong)
    assert success.any() and not success.all()
    out, orig = x_adv.numpy(), x.numpy()
    assert np.array_equal(domain.project(out, orig, EPS), out)  # masked, in the ball and [0, 1], counts integer
    assert np.array_equal(out[..., 4:], orig[..., 4:])
    padding = np.all(orig == 0, axis=-1)
    assert np.array_equal(out[padding], orig[padding])


def test_square_output_on_ctu13_needs_no_projection_in_the_evaluation(ctu13_run):
    """The old Square wrote outside the feasible domain and the projection silently undid it."""
    evaluation = RobustnessEvaluation(ctu13_run, samples=40)
    changed = []
    original = evaluation.domain.project

    def spy(x_adv, x, eps):
        out = original(x_adv, x, eps)
        changed.append(not np.array_equal(out, x_adv))
        return out

    object.__setattr__(evaluation.domain, "project", spy)
    result = evaluation.run(AttackSetup("square", eps=EPS, threat="query", budget=Budget(queries=30)))
    assert not changed[-1]
    assert result.accuracy("single") < evaluation.clean().accuracy("single")


@pytest.mark.parametrize(
    ("iteration", "queries", "p"),
    [
        (0, 1000, 0.8),
        (1, 1000, 0.8),
        (2, 1000, 0.4),
        (6, 1000, 0.2),
        (999, 1000, 0.8 / 512),
        (10, 10_000, 0.8),
        (11, 10_000, 0.4),
    ],
)
def test_window_fraction_follows_the_papers_schedule_rescaled_to_the_budget(iteration, queries, p):
    assert window_fraction(0.8, iteration, queries) == pytest.approx(p)
