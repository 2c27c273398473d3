"""dipsen certify on a run folder: the record, the CLI, and the check that no certificate outlives an attack."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from dipsen.attack import TrainedRun
from dipsen.certify import Smooth
from dipsen.certify.attack import smoothed_pgd_l2
from dipsen.certify.evaluate import CertifySettings, attacked_accuracy, certify_run
from dipsen.config import TrainConfig
from dipsen.federated import RunDir
from dipsen.models import build_model, calibrate_noise

SIGMA = 0.25


@pytest.fixture(scope="module")
def smoothed_run(tmp_path_factory, ctu13) -> TrainedRun:
    """A CTU-13 CNN trained centrally with Gaussian input noise (what --input-noise does on each client)."""
    data = ctu13
    config = TrainConfig(dataset="ctu13", model="cnn", rounds=1, seed=3, input_noise=SIGMA).validate()
    run = RunDir.create(tmp_path_factory.mktemp("runs"), config)
    torch.manual_seed(3)
    model = build_model("cnn", (1, 28, 6), 2, calibrate_noise(None, 1.0, 0.05, 0.1))
    x, y = torch.from_numpy(data.x_train[:4000]), torch.from_numpy(data.y_train[:4000])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.002)
    for batch in torch.randperm(len(y)).split(32):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[batch] + SIGMA * torch.randn_like(x[batch])), y[batch]).backward()
        optimizer.step()
    run.save_checkpoint(1, model.state_dict())
    return TrainedRun(run.path, data)


def test_certify_run_records_certified_accuracy_per_radius(smoothed_run):
    settings = CertifySettings(n0=20, n=300, samples=24, radii=(0.0, 0.1, 0.25, 0.5, 5.0))
    record = certify_run(smoothed_run, settings)
    assert record["sigma"] == SIGMA  # from the run's input_noise
    assert {"method", "sigma", "n", "n0", "alpha", "samples", "certified_accuracy", "abstain_rate"} <= set(record)
    curve = list(record["certified_accuracy"].values())
    assert curve == sorted(curve, reverse=True)  # a certificate at r holds at every smaller radius
    assert curve[0] > 0.5 and curve[-1] == 0.0  # no radius beyond sigma * Phi^-1(1 - tiny) is reachable with n=300
    assert curve[0] == pytest.approx(record["accuracy"])  # every non-abstained prediction has a radius > 0
    assert record["linf_radius"]["0.5"] == pytest.approx(0.5 / np.sqrt(168))


def test_certified_accuracy_never_exceeds_accuracy_under_the_l2_attack(smoothed_run):
    settings = CertifySettings(n0=20, n=500, samples=30, radii=(0.1, 0.25, 0.4))
    record = certify_run(smoothed_run, settings)
    attacked = attacked_accuracy(smoothed_run, settings, settings.radii, draws=500)
    for radius in settings.radii:
        assert record["certified_accuracy"][f"{radius:g}"] <= attacked[f"{radius:g}"], radius
    data = smoothed_run.attack_data(30)
    x = torch.as_tensor(data.x_eval)
    adversarial = smoothed_pgd_l2(smoothed_run.model(), x, torch.as_tensor(data.y_eval).long(), 0.4, SIGMA, steps=5)
    assert ((adversarial - x).flatten(1).norm(dim=1) <= 0.4 + 1e-5).all()  # inside the ball it claims
    assert adversarial.min() >= 0 and adversarial.max() <= 1


def test_the_l2_attack_lowers_accuracy_with_a_large_radius(smoothed_run):
    data = smoothed_run.attack_data(30)
    x, y = torch.as_tensor(data.x_eval), torch.as_tensor(data.y_eval).long()
    model = smoothed_run.model()
    adversarial = smoothed_pgd_l2(model, x, y, 3.0, SIGMA, steps=20, draws=8, generator=torch.Generator().manual_seed(0))
    smooth = Smooth(model, 2, SIGMA)
    clean = np.mean([smooth.predict(a, 200, 0.01) == int(t) for a, t in zip(x, y, strict=True)])
    attacked = np.mean([smooth.predict(a, 200, 0.01) == int(t) for a, t in zip(adversarial, y, strict=True)])
    assert attacked < clean - 0.2  # the attack works; otherwise the check above would prove nothing


def test_certify_command_writes_json_and_plot(dipsen_cli, smoothed_run):
    code, out, err = dipsen_cli("certify", str(smoothed_run.path), "--samples", "4", "--n", "100", "--n0", "10")
    assert code == 0, err
    record = json.loads((smoothed_run.path / "certify-smoothing.json").read_text())
    assert record["samples"] == 4 and record["n"] == 100 and "0.5" in record["certified_accuracy"]
    assert (smoothed_run.path / "certify-smoothing.png").stat().st_size > 0
    assert "certified accuracy" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--alpha", "2"], "--alpha must be in (0, 1)"),
        (["--n0", "50", "--n", "10"], "--n0 (50) must not exceed --n (10)"),
        (["--sigma", "-1"], "--sigma must be a finite number > 0"),
        (["--method", "pixeldp"], "has no noise layer"),
        (["--method", "cohen"], "--method must be one of smoothing, pixeldp"),
        (["--radii", "0,a"], "--radii must be comma-separated numbers"),
    ],
)
def test_bad_certify_values_are_one_line(dipsen_cli, smoothed_run, args, message):
    code, _, err = dipsen_cli("certify", str(smoothed_run.path), *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
