"""Adversarial training in client_update (fgsm-rs, pgd), the per-round robust accuracy and best_robust.pt."""

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from torch import nn

from dipsen.attack.domain import FeasibleDomain, feasible_domain
from dipsen.config import TrainConfig, load_config
from dipsen.errors import ConfigError
from dipsen.federated import FederatedTraining, LocalTraining, RunDir, client_update, train
from dipsen.federated.adversarial import RobustMonitor
from dipsen.federated.engine import local_training
from dipsen.federated.flower.client_app import _domain
from dipsen.models import MODELS, build_model, calibrate_noise

TINY = dict(
    dataset="mnist",
    model="cnn",
    clients=3,
    fraction=1.0,
    train_subset=400,
    test_subset=50,
    seed=5,
    workers=1,
    adv_train="fgsm-rs",
    adv_eps=0.2,
)


def _examples(domain: FeasibleDomain, x: torch.Tensor, y: torch.Tensor, method: str, eps: float) -> torch.Tensor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), int(y.max()) + 1))
    training = LocalTraining(adv_train=method, adv_eps=eps, adv_steps=3, domain=domain)
    return training.adversarial_examples(model, x, y, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["fgsm-rs", "pgd"])
def test_image_examples_stay_in_the_eps_ball_and_in_0_1(mnist, method):
    x, y = torch.from_numpy(mnist.x_train[:64]), torch.from_numpy(mnist.y_train[:64])
    x_adv = _examples(feasible_domain(mnist), x, y, method, 0.3)
    assert (x_adv - x).abs().max() <= 0.3 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv - x).abs().max() > 0.2  # it moved


@pytest.mark.parametrize("method", ["fgsm-rs", "pgd"])
def test_ctu13_examples_stay_in_the_feasible_domain(ctu13, method):
    domain = feasible_domain(ctu13)
    x, y = torch.from_numpy(ctu13.x_train[:128]), torch.from_numpy(ctu13.y_train[:128]).long()
    x_adv = _examples(domain, x, y, method, 0.1)
    xn, an = x.numpy(), x_adv.numpy()
    assert np.abs(an - xn).max() <= 0.1 + 1e-6 and an.min() >= 0 and an.max() <= 1
    assert np.array_equal(an[..., 4:], xn[..., 4:])  # protocol and port class unchanged
    padding = np.all(xn == 0, axis=-1)
    assert padding.any() and np.array_equal(an[padding], xn[padding])  # no flow made out of a padding row
    assert np.array_equal(domain.project(an, xn, 0.1), an)  # already feasible: counts are integers
    assert not np.array_equal(an, xn)


def test_the_domain_travels_to_flower_nodes_unchanged(ctu13, mnist):
    for dataset in (ctu13, mnist):
        domain = feasible_domain(dataset)
        assert _domain({"feasible-domain": json.dumps(domain.to_dict())}) == domain
    assert _domain({}) is None


def _tiny_mnist_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 4, stride=2),
        nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 5 * 5, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )


@pytest.fixture
def one_thread():
    """A tiny model trains fastest on one thread, and a busy machine's cores are not oversubscribed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fgsm_rs_training_raises_pgd_accuracy_far_above_the_undefended_model(mnist, one_thread):
    domain = feasible_domain(mnist)
    x, y = torch.from_numpy(mnist.x_train[:3000]), torch.from_numpy(mnist.y_train[:3000])
    results = {}
    for method in ("none", "fgsm-rs"):
        torch.manual_seed(0)
        model = _tiny_mnist_model()
        start = {k: v.clone() for k, v in model.state_dict().items()}
        training = LocalTraining(epochs=3, batch_size=50, lr=0.003, adv_train=method, adv_eps=0.2, domain=domain)
        model.load_state_dict(client_update(model, start, x, y, training, seed=0).state)
        clean = float((model(torch.from_numpy(mnist.x_test[:500])).argmax(1).numpy() == mnist.y_test[:500]).mean())
        results[method] = (
            clean,
            RobustMonitor("pgd", 10).accuracy(model, mnist.x_test[:500], mnist.y_test[:500], 0.2, domain, 1, 0),
        )
    # measured: undefended clean 0.94, PGD-10 0.006; fgsm-rs clean 0.95, PGD-10 0.58
    assert results["none"][1] < 0.1 and results["fgsm-rs"][1] > 0.35, results
    assert results["fgsm-rs"][0] > 0.85, results


@pytest.mark.parametrize("name", MODELS)
def test_every_model_trains_adversarially_and_the_update_is_a_function_of_the_seed(mnist, name, one_thread):
    x, y = torch.from_numpy(mnist.x_train[:40]), torch.from_numpy(mnist.y_train[:40])
    torch.manual_seed(0)
    model = build_model(name, (1, 28, 28), 10, calibrate_noise(None, 1.0, 0.05, 0.1))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    training = LocalTraining(batch_size=20, adv_train="pgd", adv_steps=2, domain=feasible_domain(mnist))
    first, again, plain = (
        client_update(model, start, x, y, t, seed=1).state for t in (training, training, LocalTraining(batch_size=20))
    )
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], plain[k]) for k in first)


def test_robust_accuracy_best_robust_and_bit_identical_resume(mnist, tmp_path, one_thread):
    cfg = TrainConfig(rounds=3, partition="dirichlet", **TINY).validate()
    job = FederatedTraining(cfg, mnist)
    assert cfg.validation_size == 40  # held out for the robust accuracy, as for a target
    full = RunDir.create(tmp_path, cfg, name="full")
    train(job, full)
    history = full.metrics()
    assert all(0 <= r["robust_accuracy"] <= 1 and r["validation_accuracy"] is not None for r in history)
    validation = full.read_json("run_info.json")["validation"]
    assert (validation["robust_accuracy_samples"], validation["robust_monitor"]) == (40, "apgd-ce-40, 40 validation rows")
    assert all(r["robust_monitor"] == "apgd-ce-40, 40 validation rows" for r in history)
    check = full.read_json("final_metrics.json")["robust_monitor_check"]
    assert check["steps"] == [40, 80] and check["accuracy"][0] == history[-1]["robust_accuracy"]
    assert check["target_reliable"] is None and check["converged"] == (check["accuracy"][0] - check["accuracy"][1] <= 0.03 + 1e-9)
    best = max(history, key=lambda r: r["robust_accuracy"])
    saved = full.best_robust()
    assert (saved["round"], saved["robust_accuracy"]) == (best["round"], best["robust_accuracy"])
    assert all(torch.equal(saved["model_state"][k], v) for k, v in full.load_checkpoint(best["round"]).items())

    # two rounds, then extended to three, its best_robust.pt lost on the way: the same weights and file
    short = RunDir.create(tmp_path, TrainConfig(rounds=2, partition="dirichlet", **TINY).validate(), name="short")
    train(FederatedTraining(short.config(), mnist), short)
    (short.path / "best_robust.pt").unlink()
    extended = short.reconfigure(rounds=3)
    train(FederatedTraining(extended, mnist), short, resume=True)
    measured = ("test_accuracy", "validation_accuracy", "robust_accuracy", "train_loss")
    assert [[r[k] for k in measured] for r in short.metrics()] == [[r[k] for k in measured] for r in history]
    final, resumed = full.load_checkpoint(3), short.load_checkpoint(3)
    assert all(torch.equal(final[k], resumed[k]) for k in final)
    again = short.best_robust()
    assert again["round"] == saved["round"] and all(
        torch.equal(saved["model_state"][k], again["model_state"][k]) for k in again["model_state"]
    )


def test_eval_every_thins_every_evaluation_and_leaves_the_weights(mnist, tmp_path, one_thread):
    cfg = TrainConfig(rounds=3, **TINY).validate()
    every = RunDir.create(tmp_path, cfg, name="every")
    train(FederatedTraining(cfg, mnist), every)
    thinned = RunDir.create(tmp_path, dataclasses.replace(cfg, eval_every=2), name="thinned")
    metrics = train(FederatedTraining(thinned.config(), mnist), thinned)
    measured = ("test_accuracy", "validation_accuracy", "robust_accuracy")
    full, thin = every.metrics(), thinned.metrics()
    assert [r[k] for r in thin[:1] for k in measured] == [None, None, None]  # round 1: not a multiple of 2
    # round 2 (a multiple) and round 3 (the last): what a run evaluating every round measured
    assert [[r[k] for k in measured] for r in thin[1:]] == [[r[k] for k in measured] for r in full[1:]]
    assert all(r["train_loss"] == f["train_loss"] for r, f in zip(thin, full, strict=True))
    assert all(torch.equal(v, every.load_checkpoint(3)[k]) for k, v in thinned.load_checkpoint(3).items())
    assert metrics["accuracy"] == full[-1]["test_accuracy"]
    assert thinned.best_robust()["round"] in (2, 3)


def test_target_robust_accuracy_stops_the_run(mnist, tmp_path, one_thread):
    cfg = TrainConfig(rounds=5, target_robust_accuracy=0.01, **TINY).validate()
    run = RunDir.create(tmp_path, cfg)
    metrics = train(FederatedTraining(cfg, mnist), run)
    robust = [r["robust_accuracy"] for r in run.metrics()]
    assert metrics["rounds"] == len(robust) < 5 and robust[-1] >= 0.01 and all(a < 0.01 for a in robust[:-1])
    assert (run.path / "best_robust.pt").is_file()


def test_the_monitor_is_stronger_than_pgd_10_on_an_fgsm_trained_model(mnist, one_thread):
    """FGSM-RS training fits PGD-10's view of the loss; APGD-CE of 40 steps (the default monitor) sees past it."""
    domain = feasible_domain(mnist)
    x, y = torch.from_numpy(mnist.x_train[:3000]), torch.from_numpy(mnist.y_train[:3000])
    torch.manual_seed(0)
    model = _tiny_mnist_model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    training = LocalTraining(epochs=3, batch_size=50, lr=0.003, adv_train="fgsm-rs", adv_eps=0.3, domain=domain)
    model.load_state_dict(client_update(model, start, x, y, training, seed=0).state)
    xs, ys = mnist.x_test[:300], mnist.y_test[:300]
    pgd = RobustMonitor("pgd", 10).accuracy(model, xs, ys, 0.3, domain, 1, 0)
    apgd = RobustMonitor().accuracy(model, xs, ys, 0.3, domain, 1, 0)
    assert apgd < pgd, (apgd, pgd)


def test_a_monitor_that_falls_at_twice_its_steps_marks_the_target_unreliable(
    mnist, tmp_path, one_thread, monkeypatch, dipsen_cli
):
    measure = FederatedTraining.robust_accuracy

    def weaker_at_double(self, round_, steps=None):  # a monitor whose figure is an artefact of its step count
        accuracy = measure(self, round_, steps)
        return None if accuracy is None else (0.0 if steps else max(accuracy, 0.5))

    monkeypatch.setattr(FederatedTraining, "robust_accuracy", weaker_at_double)
    cfg = TrainConfig(rounds=2, target_robust_accuracy=0.9, robust_monitor="pgd", robust_monitor_steps=3, **TINY).validate()
    run = RunDir.create(tmp_path, cfg)
    train(FederatedTraining(cfg, mnist), run)
    check = run.read_json("final_metrics.json")["robust_monitor_check"]
    last = run.metrics()[-1]["robust_accuracy"]
    assert check == {
        "monitor": "pgd-3, 40 validation rows",
        "steps": [3, 6],
        "accuracy": [last, 0.0],
        "converged": False,
        "target_reliable": False,
    }
    code, out, _ = dipsen_cli("show", str(run.path))
    assert code in (0, None) and "target-robust-accuracy is unreliable" in " ".join(out.split())


def test_a_run_saved_before_the_monitor_option_keeps_pgd_10(tmp_path):
    run = RunDir.create(tmp_path, TrainConfig(**TINY).validate())
    saved = run.read_json("config.json")
    for key in ("robust_monitor", "robust_monitor_steps"):
        del saved[key]
    (run.path / "config.json").write_text(json.dumps(saved))
    config = run.config()
    assert (config.robust_monitor, config.robust_monitor_steps) == ("pgd", 10)
    assert TrainConfig(**TINY).validate().robust_monitor == "apgd-ce"


@pytest.mark.parametrize(("accuracy", "doubled", "converged"), [(0.23, 0.20, True), (0.24, 0.20, False), (0.5, 0.6, True)])
def test_the_monitor_check_counts_rows(accuracy, doubled, converged):
    assert RobustMonitor(samples=100).converged(accuracy, doubled, 100) is converged


def test_plain_runs_measure_no_robust_accuracy_and_hold_nothing_out(mnist):
    cfg = TrainConfig(**{**TINY, "adv_train": "none"}).validate()
    job = FederatedTraining(cfg, mnist)
    assert cfg.validation_size is None and job.domain is None and job.robust_accuracy(1) is None
    assert local_training(cfg).adv_train == "none" and local_training(cfg).domain is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"adv_train": "fgsm"}, "--adv-train must be one of none, fgsm-rs, pgd"),
        ({"adv_eps": 0.0}, "--adv-eps must be a number in (0, 1]"),
        ({"adv_eps": 1.5}, "--adv-eps must be a number in (0, 1]"),
        ({"adv_steps": 0}, "--adv-steps must be an integer >= 1"),
        ({"adv_mix": 0.0}, "--adv-mix must be a number in (0, 1]"),
        ({"adv_train": "pgd", "adv_step_size": -0.1}, "--adv-step-size must be a number > 0"),
        ({"adv_step_size": 0.1}, "--adv-step-size 0.1 applies to adv_train fgsm-rs or pgd only"),
        ({"target_robust_accuracy": 1.5}, "--target-robust-accuracy must be a number in (0, 1]"),
        ({"robust_monitor": "fgsm"}, "--robust-monitor must be one of apgd-ce, pgd"),
        ({"robust_monitor_steps": 0}, "--robust-monitor-steps must be an integer >= 1"),
    ],
)
def test_adversarial_options_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_validation_size_may_come_with_adversarial_training_alone():
    assert TrainConfig(adv_train="pgd", validation_size=100).validate().validation_size == 100
    with pytest.raises(ConfigError, match="needs target_accuracy, adv_train, target_robust_accuracy or aggregator fltrust"):
        TrainConfig(validation_size=100).validate()
