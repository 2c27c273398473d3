import pytest

from dipsen.config import TrainConfig, load_config
from dipsen.errors import ConfigError


def test_precedence_defaults_file_flags(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text('dataset = "socofing"\nrounds = 7\nlr = 0.01\n')
    cfg = load_config(file, {"rounds": 9, "lr": None, "model": "cnn"})
    assert (cfg.dataset, cfg.rounds, cfg.lr, cfg.model, cfg.clients) == ("socofing", 9, 0.01, "cnn", 200)


def test_socofing_task_from_file_and_flags(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text('dataset = "socofing"\nsocofing_task = "gender"\n')
    assert TrainConfig().socofing_task == "hand-finger"
    assert load_config(file, {}).socofing_task == "gender"
    assert load_config(file, {"socofing_task": "finger"}).socofing_task == "finger"  # the flag wins
    assert load_config(file, {"socofing_task": None}).socofing_task == "gender"


def test_load_dataset_passes_the_socofing_task(monkeypatch):
    import dipsen.data

    seen = {}
    monkeypatch.setattr(dipsen.data, "load_dataset", lambda name, data_dir, **kwargs: seen.update(kwargs))
    TrainConfig(dataset="socofing", socofing_task="hand").validate().load_dataset()
    assert seen["socofing_task"] == "hand"


def test_clients_per_round():
    assert TrainConfig(clients=200, fraction=0.1).clients_per_round == 20
    assert TrainConfig(clients=5, fraction=0.1).clients_per_round == 1


@pytest.mark.parametrize(
    "text, message",
    [
        ("rounds = 0", "rounds"),
        ("fraction = 1.5", "fraction"),
        ('model = "resnet"', "model"),
        ('dataset = "cifar"', "dataset"),
        ("learning_rate = 0.1", "unknown option"),
        ("rounds = ", "invalid TOML"),
        ("validation_size = 100", "validation_size 100 needs target_accuracy"),
        ("target_accuracy = 0.9\nvalidation_size = 0", "validation_size must be >= 1, got 0"),
        ('socofing_task = "sex"', "socofing_task must be one of hand-finger, gender, hand, finger, got 'sex'"),
        ("momentum = 0.9", "momentum 0.9 applies to optimizer sgd only"),  # the default optimizer is adam
        ('optimizer = "sgd"\nmomentum = 1.0', r"momentum must be in \[0, 1\), got 1.0"),
    ],
)
def test_bad_config_files_name_the_value(tmp_path, text, message):
    file = tmp_path / "bad.toml"
    file.write_text(text + "\n")
    with pytest.raises(ConfigError, match=message):
        load_config(file, {})


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml"):
        load_config(tmp_path / "nope.toml", {})


def test_shipped_configs_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "src" / "dipsen" / "configs").glob("*.toml"))
    assert configs
    for file in configs:
        load_config(file, {})


@pytest.mark.parametrize("fraction, clients, expected", [(0.29, 100, 29), (0.57, 100, 57), (0.58, 50, 29), (0.29, 200, 58),
                                                         (0.1, 200, 20), (0.001, 200, 1), (1.0, 7, 7)])
def test_clients_per_round_is_exact_for_fractions_floats_cannot_hold(fraction, clients, expected):
    assert TrainConfig(fraction=fraction, clients=clients).clients_per_round == expected
