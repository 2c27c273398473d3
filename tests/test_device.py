"""``--device``: resolution, the worker layout on GPUs, checkpoints that load without CUDA, the CLI's one-line errors,
and (with CUDA only) a tiny train, attack and certify on a GPU.

Without CUDA the GPU path is exercised with the meta device standing in for a GPU: a meta tensor holds no data and an
operation mixing it with a CPU tensor fails, so a model on meta shows every input that did not follow it.
"""

import io
import json
from dataclasses import replace

import pytest
import torch

from dipsen.config import TrainConfig
from dipsen.device import CPU, host_state, model_device, resolve_device, training_processes, worker_device
from dipsen.errors import ConfigError
from dipsen.federated import LocalTraining, RunDir, client_update
from dipsen.models import build_model, calibrate_noise, predict_proba

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is False)")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without CUDA")


def _gpus(monkeypatch, count: int) -> None:
    """Make torch report ``count`` CUDA GPUs (none is used: only resolution and layout are asked)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


@NO_CUDA
def test_auto_and_cpu_are_the_cpu_without_cuda():
    assert resolve_device("auto") == resolve_device("cpu") == CPU


@NO_CUDA
def test_cuda_without_cuda_is_a_config_error_naming_the_value():
    with pytest.raises(ConfigError, match="device 'cuda': CUDA is not available") as error:
        resolve_device("cuda")
    assert error.value.key == "device"


def test_an_unknown_device_is_a_config_error():
    with pytest.raises(ConfigError, match="device must be one of auto, cpu, cuda, got 'gpu'"):
        resolve_device("gpu")


def test_auto_picks_cuda_where_torch_sees_a_gpu_and_trains_one_process_per_gpu(monkeypatch):
    _gpus(monkeypatch, 3)
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda")
    assert resolve_device("cpu") == CPU
    assert training_processes("auto") == 3
    # m = 10 clients a round: one worker per GPU by default, one per core on the CPU
    assert TrainConfig(clients=100, fraction=0.1, device="auto").validate().workers == 3
    assert TrainConfig(clients=100, fraction=0.1, device="cpu").validate().workers == min(training_processes("cpu"), 10)
    assert TrainConfig(clients=100, fraction=0.1, device="auto", workers=5).validate().workers == 5  # given: kept


def test_worker_processes_take_the_gpus_in_turn(monkeypatch):
    _gpus(monkeypatch, 2)
    cuda = torch.device("cuda")
    assert [worker_device(cuda, k) for k in range(3)] == [torch.device("cuda", k) for k in (0, 1, 0)]
    assert worker_device(torch.device("cuda", 1), 0) == torch.device("cuda", 1)  # a GPU named: every worker on it
    assert worker_device(CPU, 5) == CPU


def test_model_device_and_host_state():
    model = build_model("cnn", (1, 28, 28), 10, calibrate_noise(None)).to("meta")
    assert model_device(model) == torch.device("meta")
    assert model_device(torch.nn.ReLU()) == CPU  # no parameters: the host
    cpu_model = build_model("cnn", (1, 28, 28), 10, calibrate_noise(None))
    state = host_state(cpu_model)
    assert all(state[k].data_ptr() != v.data_ptr() and torch.equal(state[k], v) for k, v in cpu_model.state_dict().items())


def _forward_devices(model: torch.nn.Module) -> list[torch.device]:
    """Every device ``model``'s modules see in forward passes: their inputs', their own weights', a noise layer's output."""
    seen: list[torch.device] = []

    def before(module, args):
        seen.extend(a.device for a in args if isinstance(a, torch.Tensor))
        seen.extend(p.device for p in module.parameters(recurse=False))

    for module in model.modules():
        module.register_forward_pre_hook(before)
    if getattr(model, "noise", None) is not None:
        model.noise.register_forward_hook(lambda module, args, output: seen.append(output.device))
    return seen


def test_predictions_run_on_the_models_device(mnist):
    model = build_model("dipsen", (1, 28, 28), 10, calibrate_noise(None)).to("meta")
    seen = _forward_devices(model)
    # the batches go to the model's device; the probabilities come back to the host, which a meta tensor cannot
    with pytest.raises(NotImplementedError, match="meta"):
        predict_proba(model, mnist.x_test[:8], mc_samples=2)
    assert len(seen) > 2 and set(seen) == {torch.device("meta")}


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter:UserWarning")  # the weights of a meta model
@pytest.mark.parametrize(
    "training",
    [
        LocalTraining(input_noise=0.25),  # noise drawn like the inputs
        LocalTraining(proximal_mu=0.01),  # the round's weights, the proximal term's anchor, on the device
        LocalTraining(input_noise=0.25, smoothing_loss="consistency"),  # noisy copies
    ],
    ids=["input-noise", "proximal", "consistency"],
)
def test_every_forward_pass_of_a_local_update_runs_on_the_models_device(mnist, training):
    model = build_model("dipsen", (1, 28, 28), 10, calibrate_noise(None)).to("meta")  # block 1 bounded, noise, SELU
    global_state = host_state(build_model("dipsen", (1, 28, 28), 10, calibrate_noise(None)))
    seen = _forward_devices(model)
    passes: list[int] = []
    model.register_forward_pre_hook(lambda module, args: passes.append(len(args[0])))
    x, y = torch.from_numpy(mnist.x_train[:48]), torch.from_numpy(mnist.y_train[:48]).long()
    # every step runs; then the weights are copied to the host, which a meta tensor cannot be
    with pytest.raises(NotImplementedError, match="meta"):
        client_update(model, global_state, x, y, replace(training, batch_size=32), seed=0)
    assert len(passes) == 2  # batches of 32 and 16: every step ran
    assert set(seen) == {torch.device("meta")}


def _saved_on_cuda(monkeypatch, save) -> None:
    """Run ``save`` with torch recording every tensor as CUDA's, as a file written by a run on a GPU is."""
    import torch.serialization

    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        save()


@NO_CUDA
def test_a_run_saved_on_a_gpu_loads_without_cuda(tmp_path, monkeypatch):
    run = RunDir.create(tmp_path, TrainConfig(device="cuda").validate())  # read back anywhere: the name only is checked
    model = build_model("cnn", (1, 28, 28), 10, calibrate_noise(None))
    state = host_state(model)
    _saved_on_cuda(monkeypatch, lambda: (run.save_checkpoint(1, state), run.save_best_robust(1, 0.5, state)))
    buffer = io.BytesIO((run.checkpoints / "round_0001.pt").read_bytes())
    with pytest.raises(RuntimeError, match="CUDA"):  # what torch does with it unless told where to load it
        torch.load(buffer, weights_only=True)
    loaded = run.load_checkpoint(1)
    assert all(torch.equal(loaded[k], v) and loaded[k].device == CPU for k, v in state.items())
    assert run.best_robust()["round"] == run._best_robust_round() == 1
    assert run.config().device == "cuda"


@NO_CUDA
@pytest.mark.parametrize(
    "args",
    [
        ["train", "--device", "cuda"],
        ["attack", "RUN", "--device", "cuda"],
        ["certify", "RUN", "--device", "cuda"],
        ["reproduce", "--device", "cuda", "--out", "OUT"],
        ["sweep-sigma", "--device", "cuda", "--out", "OUT"],
        ["poison-study", "--device", "cuda", "--out", "OUT"],
    ],
)
def test_cuda_without_cuda_is_one_line_exit_2_and_writes_nothing(dipsen_cli, tmp_path, args):
    out = tmp_path / "out"
    run = RunDir.create(tmp_path / "runs", TrainConfig().validate())
    args = [str(out) if a == "OUT" else str(run.path) if a == "RUN" else a for a in args]
    files = sorted(run.path.rglob("*"))
    code, _, err = dipsen_cli(*args, *(["--out", str(out)] if args[0] == "train" else []))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "'cuda': CUDA is not available" in err
    assert not out.exists() and sorted(run.path.rglob("*")) == files


@NO_CUDA
def test_resume_on_a_device_this_machine_lacks_leaves_the_run_as_it_was(dipsen_cli, tmp_path):
    run = RunDir.create(tmp_path, TrainConfig().validate())
    before = (run.path / "config.json").read_text()
    code, _, err = dipsen_cli("train", "--resume", str(run.path), "--device", "cuda")
    assert code == 2 and "'cuda': CUDA is not available" in err
    assert (run.path / "config.json").read_text() == before


def test_resume_may_move_a_run_to_another_device(tmp_path):
    run = RunDir.create(tmp_path, TrainConfig(device="cuda").validate())
    assert run.reconfigure(device="cpu").device == "cpu"
    assert json.loads((run.path / "config.json").read_text())["device"] == "cpu"


def test_an_unknown_device_flag_is_named(dipsen_cli):
    code, _, err = dipsen_cli("attack", ".", "--device", "gpu")
    assert code == 2 and "--device must be one of auto, cpu, cuda, got 'gpu'" in err


@CUDA
def test_train_attack_and_certify_on_cuda(tmp_path, mnist):
    from dipsen.attack import AttackSetup, Budget, RobustnessEvaluation, TrainedRun
    from dipsen.certify.evaluate import CertifySettings, attacked_accuracy, certify_run
    from dipsen.federated import FederatedTraining, train

    config = TrainConfig(
        dataset="mnist",
        model="dipsen",
        clients=4,
        fraction=0.5,
        rounds=2,
        train_subset=400,
        test_subset=100,
        workers=1,
        device="cuda",
    ).validate()
    run = RunDir.create(tmp_path, config)
    metrics = train(FederatedTraining(config, mnist), run)
    assert 0 <= metrics["accuracy"] <= 1
    assert run.read_json("run_info.json")["device"] == "cuda"
    assert all(t.device == CPU for t in run.load_checkpoint(2).values())  # checkpoints hold host tensors

    trained = TrainedRun(run.path, mnist, torch.device("cuda"))
    assert model_device(trained.model()).type == "cuda"
    evaluation = RobustnessEvaluation(trained, 20, mc_samples=4, attacker_samples=200, surrogate_epochs=1)
    budget = Budget(iterations=3, queries=10)
    for setup in (
        AttackSetup("pgd", 0.1, budget=budget),  # ART's classifier on the GPU
        AttackSetup("apgd-ce", 0.1, gradient="eot", eot_draws=2, budget=budget),  # ours, EOT draws on the GPU
        AttackSetup("fgsm", 0.1, gradient="frozen"),  # one frozen noise draw: a generator on the GPU
        AttackSetup("square", 0.1, threat="query", budget=budget),
        AttackSetup("fgsm", 0.1, threat="transfer"),  # a surrogate trained on the GPU
    ):
        assert 0 <= evaluation.run(setup).accuracy("single") <= 1, setup.label

    pixeldp = certify_run(trained, CertifySettings(method="pixeldp", n=50, samples=5))
    smoothing = CertifySettings(sigma=0.25, n0=10, n=50, samples=5)
    assert 0 <= pixeldp["accuracy"] <= 1 and 0 <= certify_run(trained, smoothing)["accuracy"] <= 1
    assert set(attacked_accuracy(trained, smoothing, (0.25,), draws=20)) == {"0.25"}


@CUDA
def test_adversarial_training_in_worker_processes_on_cuda(tmp_path, mnist):
    from dipsen.federated import FederatedTraining, train

    config = TrainConfig(
        dataset="mnist",
        model="cnn",
        clients=4,
        fraction=0.5,
        rounds=1,
        train_subset=400,
        test_subset=100,
        validation_size=40,
        adv_train="fgsm-rs",
        adv_eps=0.1,
        train_dtype="bfloat16",
        robust_monitor_steps=2,
        robust_monitor_samples=20,
        proximal_mu=0.01,
        workers=2,
        device="cuda",
    ).validate()
    run = RunDir.create(tmp_path, config)
    metrics = train(FederatedTraining(config, mnist), run)
    assert run.metrics()[0]["robust_accuracy"] is not None and metrics["robust_monitor_check"] is not None
