import json
from dataclasses import fields

import pytest

from dipsen.config import SCHEMA, Rule, TrainConfig, load_config
from dipsen.errors import ConfigError


def toml_literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, str) else repr(value)


def bad_values(rule: Rule) -> list:
    """Values ``rule`` must refuse: one of a wrong type, and one past each end of its range or outside its choices."""
    values: list = [{bool: "yes", int: 1.5, float: "x", str: 7}[rule.kind]]
    if rule.kind is int:
        values += ["ten", True]
    if rule.choices is not None:
        values.append("no-such-choice")
    step = 1 if rule.kind is int else 0.5
    if rule.low is not None:
        values.append(rule.kind(rule.low if rule.low_open else rule.low - step))
    if rule.high is not None:
        values.append(rule.kind(rule.high if rule.high_open else rule.high + step))
    return values


BAD_VALUES = [(name, value) for name, rule in SCHEMA.items() for value in bad_values(rule)]


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
        ("target_accuracy = 0.9\nvalidation_size = 0", "validation_size must be an integer >= 1, got 0"),
        ('socofing_task = "sex"', "socofing_task must be one of hand-finger, gender, hand, finger, got 'sex'"),
        ("momentum = 0.9", "momentum 0.9 applies to optimizer sgd only"),  # the default optimizer is adam
        ('optimizer = "sgd"\nmomentum = 1.0', r"momentum must be a number in \[0, 1\), got 1.0"),
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


@pytest.mark.parametrize(
    "fraction, clients, expected",
    [(0.29, 100, 29), (0.57, 100, 57), (0.58, 50, 29), (0.29, 200, 58), (0.1, 200, 20), (0.001, 200, 1), (1.0, 7, 7)],
)
def test_clients_per_round_is_exact_for_fractions_floats_cannot_hold(fraction, clients, expected):
    assert TrainConfig(fraction=fraction, clients=clients).clients_per_round == expected


def test_the_schema_covers_every_option():
    assert set(SCHEMA) == {f.name for f in fields(TrainConfig)}


@pytest.mark.parametrize("name, value", BAD_VALUES)
def test_every_bad_value_in_a_file_is_named_with_the_file_and_key(tmp_path, name, value):
    file = tmp_path / "bad.toml"
    file.write_text(f"{name} = {toml_literal(value)}\n")
    with pytest.raises(ConfigError) as error:
        load_config(file, {})
    assert str(error.value).startswith(f"{file}: {name} must be ")
    assert repr(value) in str(error.value)


@pytest.mark.parametrize("name, value", [(n, v) for n, v in BAD_VALUES if not isinstance(v, str)])
def test_a_bad_flag_is_named_as_the_flag(name, value):
    with pytest.raises(ConfigError, match=f"^--{name.replace('_', '-')} must be "):
        load_config(None, {name: value})


def test_good_values_are_kept_with_their_field_type(tmp_path):
    file = tmp_path / "c.toml"
    file.write_text("lr = 1\nsigma = 0\nrounds = 3\ninclude_background = true\n")
    cfg = load_config(file, {})
    assert (cfg.lr, cfg.sigma, cfg.rounds, cfg.include_background) == (1.0, 0.0, 3, True)
    assert isinstance(cfg.lr, float) and isinstance(cfg.sigma, float)
