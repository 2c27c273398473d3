"""``dipsen poison-study`` (dipsen.report.poisoning): the grid, what the rules are told, the worst case per defence."""

import dataclasses
import json
import shutil

import pytest


def _study_args(tmp_path, *extra: str) -> list[str]:
    toml = tmp_path / "train.toml"
    toml.write_text('model = "cnn"\nworkers = 1\ntest_subset = 100\n')
    return [
        "poison-study",
        "--config",
        str(toml),
        "--rounds",
        "1",
        "--clients",
        "10",
        "--fraction",
        "0.5",
        "--train-subset",
        "500",
        "--local-epochs",
        "1",
        "--attacks",
        "sign-flip",
        "--aggregators",
        "median",
        *extra,
    ]


def test_poison_study_writes_its_files_and_resume_skips_finished_runs(dipsen_cli, tmp_path, monkeypatch):
    import dipsen.report.poisoning as study

    out = tmp_path / "study"
    code, _, err = dipsen_cli(*_study_args(tmp_path, "--fractions", "0,0.2", "--target-accuracy", "0.05", "--out", str(out)))
    assert code == 0, err
    files = {"options.json", "runs", "poisoning.json", "poisoning.md", "poisoning.png", "poisoning-heatmap.png"}
    assert {p.name for p in out.iterdir()} == files
    results = json.loads((out / "poisoning.json").read_text())
    runs = results["runs"]
    assert [(r["attack"], r["fraction"], r["aggregator"]) for r in runs] == [(None, 0.0, "median"), ("sign-flip", 0.2, "median")]
    assert all(0 <= r["final_accuracy"] <= 1 and r["best_accuracy"] >= r["final_accuracy"] for r in runs)
    assert all(r["rounds_to_target"] == 1 and r["rounds"] == 1 and len(r["test_accuracy"]) == 1 for r in runs)
    assert all(r["eval_rows"] == [100] for r in runs)  # every round on the whole test set, not a round slice
    assert runs[1]["malicious_clients"] == 2 and runs[0]["malicious_clients"] == 0
    worst = results["worst_case"]
    assert len(worst) == 1 and worst[0]["aggregator"] == "median" and worst[0]["fraction"] == 0.2
    assert worst[0]["worst"]["accuracy"] == min(r["final_accuracy"] for r in runs)
    table = (out / "poisoning.md").read_text()
    rows = [line for line in table.split("## Every run")[1].splitlines() if line.startswith("| ")]
    assert (
        rows[0] == "| attack | median |"
        and rows[1].startswith("| no attack (f = 0) | ")
        and rows[2].startswith("| sign-flip, f = 0.2 | ")
    )
    assert "## Worst case per defence" in table and "| median | 0.2 | " in table
    assert (out / "poisoning.png").stat().st_size > 1000 and (out / "poisoning-heatmap.png").stat().st_size > 1000

    trained, real = [], study.train_run
    monkeypatch.setattr(study, "train_run", lambda folder, *args: trained.append(folder.name) or real(folder, *args))
    (out / "runs" / "sign-flip-f0.2-median" / "final_metrics.json").unlink()  # as if killed before the end
    (out / "poisoning.md").unlink()
    code, _, err = dipsen_cli("poison-study", "--resume", str(out))
    assert code == 0, err
    assert trained == ["sign-flip-f0.2-median"] and (out / "poisoning.md").is_file()
    code, _, err = dipsen_cli("poison-study", "--resume", str(out))
    assert code == 0 and trained == ["sign-flip-f0.2-median"]  # nothing left to train
    code, _, err = dipsen_cli("poison-study", "--resume", str(out), "--rounds", "3")
    assert code == 2 and "drop --rounds" in err


def test_merge_reports_finished_studies_of_one_setting_as_one(dipsen_cli, tmp_path):
    first, second, merged = tmp_path / "first", tmp_path / "second", tmp_path / "merged"
    code, _, err = dipsen_cli(*_study_args(tmp_path, "--fractions", "0,0.2", "--out", str(first)))
    assert code == 0, err
    code, _, err = dipsen_cli(*_study_args(tmp_path, "--attacks", "ipm", "--fractions", "0.2", "--out", str(second)))
    assert code == 0, err
    code, _, err = dipsen_cli("poison-study", "--merge", str(first), "--merge", str(second), "--out", str(merged))
    assert code == 0, err
    results = json.loads((merged / "poisoning.json").read_text())
    assert [(r["attack"], r["fraction"]) for r in results["runs"]] == [(None, 0.0), ("sign-flip", 0.2), ("ipm", 0.2)]
    assert results["runs"][2]["run"] == "../second/runs/ipm-f0.2-median"  # the runs stay where they are
    assert results["options"]["attacks"] == ["sign-flip", "ipm"] and results["studies"] == ["../first", "../second"]
    worst = results["worst_case"][0]["worst"]["accuracy"]
    assert worst == min(r["final_accuracy"] for r in results["runs"])
    assert "| ipm, f = 0.2 | " in (merged / "poisoning.md").read_text()
    assert results["told_at"] == [0.2] and "probability 0.99 at the largest f (" in (merged / "poisoning.md").read_text()

    # a merged report grows by a merge with a new study, its own runs' folders gone: records taken as they stand
    third, grown = tmp_path / "third", tmp_path / "reports" / "grown"
    code, _, err = dipsen_cli(*_study_args(tmp_path, "--attacks", "alie", "--fractions", "0.2", "--out", str(third)))
    assert code == 0, err
    shutil.copytree(first, tmp_path / "first-kept")
    shutil.rmtree(first / "runs")
    code, _, err = dipsen_cli("poison-study", "--merge", str(merged), "--merge", str(third), "--out", str(grown))
    assert code == 0, err
    grew = json.loads((grown / "poisoning.json").read_text())
    assert [(r["attack"], r["fraction"]) for r in grew["runs"]] == [(None, 0.0), ("sign-flip", 0.2), ("ipm", 0.2), ("alie", 0.2)]
    assert grew["runs"][:3] == [{**r, "run": "../" + r["run"]} for r in results["runs"]]  # rebased on grown's folder
    assert grew["runs"][3]["run"] == "../../third/runs/alie-f0.2-median"
    assert grew["studies"] == ["../../first", "../../second", "../../third"] and grew["told_at"] == [0.2]
    assert grew["options"]["attacks"] == ["sign-flip", "ipm", "alie"]
    assert grew["worst_case"][0]["worst"]["accuracy"] == min(r["final_accuracy"] for r in grew["runs"])
    shutil.rmtree(first)
    shutil.move(tmp_path / "first-kept", first)

    code, _, err = dipsen_cli("poison-study", "--merge", str(first), "--out", str(merged))
    assert code == 2 and "exists and is not empty" in err
    other = tmp_path / "other"
    code, _, err = dipsen_cli(*_study_args(tmp_path, "--rounds", "2", "--fractions", "0", "--out", str(other)))
    assert code == 0, err
    code, _, err = dipsen_cli("poison-study", "--merge", str(first), "--merge", str(other), "--out", str(tmp_path / "m2"))
    assert code == 2 and "differs from" in err and "in rounds:" in err and not (tmp_path / "m2").exists()
    (second / "runs" / "ipm-f0.2-median" / "final_metrics.json").unlink()
    code, _, err = dipsen_cli("poison-study", "--merge", str(second), "--out", str(tmp_path / "m3"))
    assert code == 2 and "run ipm-f0.2-median is unfinished" in err and not (tmp_path / "m3").exists()
    code, _, err = dipsen_cli("poison-study", "--merge", str(tmp_path / "none"), "--out", str(tmp_path / "m5"))
    assert code == 2 and "none: not a poison-study folder or report" in err and not (tmp_path / "m5").exists()
    code, _, err = dipsen_cli("poison-study", "--merge", str(first), "--rounds", "3", "--out", str(tmp_path / "m4"))
    assert code == 2 and "--merge takes only --out, not --rounds" in err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--aggregators", "median,mean"], "--aggregators: unknown 'mean'; choose from fedavg"),
        (["--aggregators", "nnm+mean"], "--aggregators: unknown 'nnm+mean'; choose from fedavg"),
        (["--aggregators", "clip+median"], "each after bucketing|nnm+ (nnm+median)"),
        (["--partition", "shuffled"], "partition"),
        (["--attacks", "ipm:eps=big"], "--attacks: 'ipm:eps=big': eps must be a number, got 'big'"),
        (["--attacks", "ipm:epsilon=1"], "a variant is ATTACK:OPTION=VALUE with OPTION one of z, eps"),
        (["--attacks", "min-max:perturbation=diagonal"], "run min-max:perturbation=diagonal-f0.2-median: "),
        (["--attacks", "backdoor"], "--attacks: unknown 'backdoor'"),
        (["--fractions", "0,1.5"], "--fractions must be numbers in [0, 1)"),
        (["--dataset", "socofing"], "--dataset must be one of mnist, ctu13"),
        (["--ray-address", "cluster"], "--ray-address must be local, auto or HOST:PORT, got 'cluster'"),
        (["--ray-address", "127.0.0.1:1"], "--ray-address 127.0.0.1:1: no Ray cluster answers there (Connection refused)"),
    ],
)
def test_poison_study_bad_input_is_one_line_exit_2_and_writes_nothing(dipsen_cli, tmp_path, flags, message):
    out = tmp_path / "study"
    args = _study_args(tmp_path, "--out", str(out))
    for flag, value in zip(flags[::2], flags[1::2], strict=True):  # the later flag wins in click
        args += [flag, value]
    code, _, err = dipsen_cli(*args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists()


def _figures(out) -> dict:
    """poisoning.json without what depends on when and where it ran: times, the machine, the run folders' paths."""
    results = json.loads((out / "poisoning.json").read_text())
    del results["machine"], results["seconds"]
    for run in results["runs"]:
        del run["seconds"], run["run"]
    return results


def test_on_a_two_node_ray_cluster_the_study_and_its_resume_are_the_serial_ones(dipsen_cli, tmp_path):
    import torch
    from ray.cluster_utils import Cluster

    from dipsen.federated import RunDir

    serial, spread = tmp_path / "serial", tmp_path / "ray"
    code, _, err = dipsen_cli(*_study_args(tmp_path, "--fractions", "0,0.2", "--out", str(serial)))
    assert code == 0, err
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})  # a node of one CPU, then a second
    try:
        cluster.add_node(num_cpus=1)
        args = _study_args(tmp_path, "--fractions", "0,0.2", "--out", str(spread), "--ray-address", cluster.address)
        code, _, err = dipsen_cli(*args)
        assert code == 0, err
        assert _figures(spread) == _figures(serial)
        for name in ("none-f0-median", "sign-flip-f0.2-median"):
            weights = [RunDir.open(out / "runs" / name).load_checkpoint(1) for out in (serial, spread)]
            assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

        finished, cut = spread / "runs" / "none-f0-median", spread / "runs" / "sign-flip-f0.2-median"
        stamps = {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.is_file()}
        (cut / "final_metrics.json").unlink()  # as if killed before the end
        code, _, err = dipsen_cli("poison-study", "--resume", str(spread), "--ray-address", cluster.address)
        assert code == 0, err
        assert {p: p.stat().st_mtime_ns for p in finished.rglob("*") if p.is_file()} == stamps  # not run again
        assert (cut / "final_metrics.json").is_file() and _figures(spread) == _figures(serial)
    finally:
        cluster.shutdown()


def test_the_study_grid_runs_f_zero_once_per_aggregator_and_tells_krum_its_bound_on_the_attackers():
    from dipsen.report.poisoning import plan, study_options

    options = study_options("mnist", ["sign-flip", "label-flip"], ["fedavg", "multi-krum"], [0, 0.2, 0.3])
    runs = plan(options)
    assert [r.name for r in runs[:2]] == ["none-f0-fedavg", "none-f0-multi-krum"] and len(runs) == 2 + 2 * 2 * 2
    byzantine = {(r.attack, r.fraction, r.aggregator): r.config.byzantine for r in runs}
    # the 0.99 quantile of the hypergeometric count (K 200, m 20): 8 at f 0.2, capped at (m - 3) // 2 = 8 at f 0.3
    assert byzantine[("sign-flip", 0.2, "multi-krum")] == 8 == byzantine[("sign-flip", 0.3, "multi-krum")]
    assert byzantine[("sign-flip", 0.2, "fedavg")] == 0
    assert byzantine[(None, 0.0, "multi-krum")] == 8  # configured for the worst threat, attacked or not
    assert {r.config.local_epochs for r in runs} == {3}  # the packaged mnist.toml's
    assert {r.config.model for r in runs} == {"cnn"}  # not the TOML's dipsen: the study is about aggregation
    assert {r.config.round_eval_size for r in runs} == {0}  # every round's figures on the whole test set
    assert all(dataclasses.asdict(r.config)["malicious_attack"] == r.attack for r in runs)


def test_the_accuracy_plot_names_the_test_rows_its_rounds_were_measured_on():
    from dipsen.report.poisoning import accuracy_label

    assert accuracy_label([{"eval_rows": [2000, 2000]}, {"eval_rows": [2000]}]) == "test accuracy (2,000 test rows)"
    assert accuracy_label([{"eval_rows": [None, 2000]}]) == "test accuracy (2,000 test rows)"  # a round eval_every skips
    assert accuracy_label([{"eval_rows": [1000, 2000]}]) == "test accuracy (1,000 or 2,000 test rows)"
    assert accuracy_label([{"test_accuracy": [0.9]}]) == "test accuracy"  # a study from before eval_rows says nothing


def test_the_rules_are_told_a_bound_that_a_round_rarely_exceeds():
    from math import comb

    from dipsen.report.poisoning import BYZANTINE_COVERAGE, byzantine_for, exceeded

    def tail(k: int, clients: int, bad: int, m: int) -> float:  # P(count > k), counted by hand
        return sum(comb(bad, j) * comb(clients - bad, m - j) for j in range(k + 1, min(bad, m) + 1)) / comb(clients, m)

    for clients, fraction, m in ((200, 0.2, 20), (200, 0.1, 20), (50, 0.3, 10), (1000, 0.05, 100)):
        bad = round(fraction * clients)
        f = byzantine_for(fraction, clients, m)
        assert tail(f, clients, bad, m) <= 1 - BYZANTINE_COVERAGE < tail(f - 1, clients, bad, m)
        assert exceeded(f, fraction, clients, m) == pytest.approx(tail(f, clients, bad, m), rel=1e-9, abs=1e-15)
    assert exceeded(4, 0.2, 200, 20) == pytest.approx(0.3679, abs=1e-4)  # the mean, 4, is exceeded in 37% of rounds


def test_the_study_grid_tells_trimmed_mean_the_attackers_share():
    from dipsen.report.poisoning import plan, study_options

    runs = plan(study_options("mnist", ["sign-flip"], ["trimmed-mean", "median"], [0, 0.2, 0.3]))
    trim = {(r.fraction, r.aggregator): r.config.trim_fraction for r in runs}
    # configured for the study's largest f in every run, attacked or not: 11/20 at f 0.3, capped at 0.45
    assert trim[(0.0, "trimmed-mean")] == trim[(0.2, "trimmed-mean")] == trim[(0.3, "trimmed-mean")] == 0.45
    assert trim[(0.2, "median")] == 0.1  # the others keep the base setting
    runs = plan(study_options("mnist", ["sign-flip"], ["trimmed-mean"], [0, 0.1]))
    assert {r.config.trim_fraction for r in runs} == {0.25}  # 5 of 20 at f 0.1


def test_a_defence_is_a_rule_or_a_pre_aggregation_then_a_rule_told_what_it_accepts():
    from dipsen.report.poisoning import plan, study_options

    defences = ["nnm+multi-krum", "bucketing+krum", "nnm+median", "bucketing+median"]
    runs = plan(study_options("mnist", ["sign-flip"], defences, [0, 0.2]))
    told = {(r.fraction, r.aggregator): (r.config.pre_aggregation, r.config.aggregator, r.config.byzantine) for r in runs}
    # K 200, m 20, f 0.2: the 0.99 bound is 8; Krum after bucketing sees 10 bucket means, so 2f + 3 <= 10 caps it at 3
    assert told[(0.2, "nnm+multi-krum")] == ("nnm", "multi-krum", 8) == told[(0.0, "nnm+multi-krum")]
    assert told[(0.2, "bucketing+krum")] == ("bucketing", "krum", 3)
    assert told[(0.2, "nnm+median")] == ("nnm", "median", 8)  # NNM mixes each update with its n - f nearest
    assert told[(0.2, "bucketing+median")] == ("bucketing", "median", 0)
    assert "sign-flip-f0.2-nnm+median" in {r.name for r in runs}


@pytest.mark.parametrize(
    "defence, largest",
    [
        ("krum", 8),
        ("multi-krum", 8),
        ("bulyan", 4),
        ("dnc", 19),
        ("nnm+median", 19),
        ("bucketing+krum", 3),
        ("bucketing+bulyan", 1),
    ],
)
def test_the_largest_f_a_defence_accepts_at_m_20(defence, largest):
    from dipsen.report.poisoning import largest_byzantine

    # n >= 2f + 3 (Krum), 4f + 3 (Bulyan), f + 1 (DnC, NNM); after bucketing by 2, of the 10 bucket means
    assert largest_byzantine(defence, 20) == largest


def _record(attack, fraction, defence, accuracy):
    return {"attack": attack, "fraction": fraction, "aggregator": defence, "final_accuracy": accuracy}


def test_the_worst_case_is_the_lowest_over_no_attack_and_every_attack_split_by_family():
    from dipsen.report.poisoning import worst_cases

    records = [
        _record(None, 0.0, "fedavg", 0.95),
        _record(None, 0.0, "median", 0.90),
        _record("sign-flip", 0.2, "fedavg", 0.10),
        _record("sign-flip", 0.2, "median", 0.93),  # an attack can leave a rule above its attack-free run
        _record("alie", 0.2, "fedavg", 0.94),
        _record("alie", 0.2, "median", 0.91),
        _record("alie", 0.1, "median", 0.92),
    ]
    by = {(w["fraction"], w["aggregator"]): w for w in worst_cases(records)}
    assert set(by) == {(0.1, "median"), (0.2, "fedavg"), (0.2, "median")}
    fedavg, median = by[(0.2, "fedavg")], by[(0.2, "median")]
    assert fedavg["worst"] == {"accuracy": 0.10, "attack": "sign-flip"} == fedavg["classical"]
    assert fedavg["adaptive"] == {"accuracy": 0.94, "attack": "alie"}
    assert fedavg["drop"] == pytest.approx(0.85)
    # the attackers may behave honestly: median's worst is its attack-free 0.90, below both attacks
    assert median["worst"] == {"accuracy": 0.90, "attack": None} and median["attack_free"] == 0.90
    assert median["classical"]["accuracy"] == 0.93 and median["drop"] == pytest.approx(0.05)
    assert by[(0.1, "median")]["classical"] is None and by[(0.1, "median")]["worst"]["accuracy"] == 0.90
    assert worst_cases([_record("alie", 0.2, "median", 0.9)])[0]["drop"] is None  # no attack-free FedAvg to compare
    # a backdoor that costs accuracy counts in the worst case, not as an attack built against the rule
    (backdoored,) = worst_cases([_record("alie", 0.2, "median", 0.9), _record("dba:epochs=10", 0.2, "median", 0.8)])
    assert backdoored["worst"]["attack"] == "dba:epochs=10" and backdoored["adaptive"]["attack"] == "alie"


def test_the_study_runs_mnist_to_its_measured_plateau_unless_told_otherwise(tmp_path):
    from dipsen.report.poisoning import study_options

    train = study_options("mnist")["train"]
    assert (train["rounds"], train["train_subset"], train["test_subset"], train["model"]) == (20, 20000, 2000, "cnn")
    assert study_options("mnist", train={"rounds": 7, "partition": "dirichlet"})["train"]["rounds"] == 7
    assert study_options("mnist", train={"partition": "dirichlet"})["train"]["partition"] == "dirichlet"
    assert study_options("ctu13")["train"]["rounds"] == 60  # the packaged TOML's
    toml = tmp_path / "mine.toml"
    toml.write_text('model = "cnn"\nrounds = 5\n')
    train = study_options("mnist", config_file=toml)["train"]
    assert (train["rounds"], train["train_subset"]) == (5, None)  # a --config file is taken as it is


def test_an_attack_variant_sets_its_option_in_its_runs_only():
    from dipsen.report.poisoning import plan, study_options, worst_cases

    attacks = ["ipm", "ipm:eps=10", "alie:z=1", "min-max:perturbation=sign;knowledge=partial"]
    runs = plan(study_options("mnist", attacks, ["median"], [0, 0.2]))
    config = {r.attack: r.config for r in runs}
    assert (config["ipm"].ipm_eps, config["ipm:eps=10"].ipm_eps) == (0.1, 10.0)
    assert config["ipm:eps=10"].malicious_attack == "ipm" and config["alie:z=1"].alie_z == 1.0
    assert config["ipm"].alie_z is None
    variant = config["min-max:perturbation=sign;knowledge=partial"]
    assert (variant.minmax_perturbation, variant.attack_knowledge) == ("sign", "partial")
    assert "ipm:eps=10-f0.2-median" in {r.name for r in runs}
    backdoor = plan(study_options("mnist", ["dba:rounds=5-15;rate=0.8;epochs=10"], ["median"], [0.1]))[0].config
    assert (backdoor.malicious_attack, backdoor.backdoor_rounds, backdoor.poison_rate) == ("dba", "5-15", 0.8)
    assert backdoor.poison_epochs == 10
    pulled = plan(study_options("mnist", ["alie-backdoor:z=1;alpha=0.5"], ["median"], [0.1]))[0].config
    assert (pulled.alie_z, pulled.alie_alpha) == (1.0, 0.5)
    summary = worst_cases([_record("sign-flip:knowledge=partial", 0.2, "median", 0.5), _record("ipm:eps=10", 0.2, "median", 0.4)])
    assert summary[0]["classical"]["attack"] == "sign-flip:knowledge=partial" and summary[0]["adaptive"]["accuracy"] == 0.4


def test_backdoors_are_judged_by_their_highest_success_rate_beside_the_main_task():
    from dipsen.report.poisoning import DEFAULT_ATTACKS, backdoor_worst_cases

    records = [
        _record(None, 0.0, "flame", 0.95),
        {**_record("backdoor-data", 0.1, "flame", 0.94), "attack_success_rate": 0.02},
        {**_record("dba", 0.1, "flame", 0.93), "attack_success_rate": 0.40},
        {**_record("backdoor-data", 0.1, "fedavg", 0.95), "attack_success_rate": 0.99},
        {**_record("alie", 0.1, "fedavg", 0.80), "attack_success_rate": None},  # untargeted: no success rate
    ]
    by = {b["aggregator"]: b for b in backdoor_worst_cases(records)}
    assert by["flame"] == {
        "aggregator": "flame",
        "fraction": 0.1,
        "attack": "dba",
        "attack_success_rate": 0.40,
        "accuracy": 0.93,
        "attack_free": 0.95,
        "window_end": None,
        "window_mean": None,
    }
    assert by["fedavg"]["attack_success_rate"] == 0.99 and by["fedavg"]["attack_free"] is None
    assert not {"backdoor-data", "backdoor-replacement", "dba"} & set(DEFAULT_ATTACKS)  # the untargeted suite by default


def _backdoor_results(records):
    train = {"partition": "iid", "trim_fraction": 0.1, "clip_norm": None, "max_client_weight": 1.0, "attack_knowledge": "full"}
    return {
        "dataset": "mnist",
        "machine": "test",
        "options": {"dataset": "mnist", "train": train, "target_accuracy": None},
        "model": "cnn",
        "clients": 200,
        "clients_per_round": 20,
        "rounds": 4,
        "local_epochs": 1,
        "seconds": {"training": 60.0},
        "runs": records,
    }


def test_a_backdoor_study_reports_accuracy_and_success_rate_per_run_and_persistence_after_the_window(tmp_path):
    from dipsen.report.poisoning import backdoor_worst_cases, report_blocks, success_plot
    from dipsen.report.render import to_markdown

    records = [
        {**_record(None, 0.0, "fedavg", 0.95), "success_rates": [None] * 4},
        {
            **_record("dba:rounds=1-2", 0.1, "fedavg", 0.94),
            "attack_success_rate": 0.30,
            "success_rates": [0.5, 0.9, 0.6, 0.30],
            "backdoor_rounds": "1-2",
        },
        {**_record("backdoor-data", 0.1, "fedavg", 0.93), "attack_success_rate": 0.20, "success_rates": [0.1, 0.1, 0.2, 0.2]},
        {**_record("alie", 0.1, "fedavg", 0.91), "attack_success_rate": None},
    ]
    results = {**_backdoor_results(records), "worst_case": [], "backdoor_worst_case": backdoor_worst_cases(records)}
    worst = results["backdoor_worst_case"][0]
    assert worst["attack"] == "dba:rounds=1-2" and worst["window_end"] == {"round": 2, "attack_success_rate": 0.9}
    table = to_markdown(report_blocks(results))
    backdoors, every = table.split("## Every run")
    assert "| fedavg | 0.1 | 0.300 (dba:rounds=1-2) | 0.200 (backdoor-data) | 0.940 | 0.950 | 0.900 (round 2) |" in backdoors
    # every run's accuracy (the bug this guards against: the backdoor table printed a second time), then its success rate
    assert "| alie, f = 0.1 | 0.910 |" in every and "| dba:rounds=1-2, f = 0.1 | 0.940 |" in every
    assert (
        "| dba:rounds=1-2, f = 0.1 | 0.300 (0.900 at round 2) |" in every
        and "| backdoor-data, f = 0.1 | 0.200; mean 0.200 |" in every
    )
    assert every.count("| alie, f = 0.1 |") == 1  # no success rate for an untargeted attack
    assert success_plot(records, tmp_path / "success.png", "t").stat().st_size > 1000


def test_the_preamble_states_client_level_dp_noise_when_the_runs_had_it():
    from dipsen.report.poisoning import report_blocks
    from dipsen.report.render import to_markdown

    records = [{**_record(None, 0.0, "fedavg", 0.95), "success_rates": [None] * 4}]
    plain = _backdoor_results(records)
    noisy = {**plain, "options": {**plain["options"], "train": {**plain["options"]["train"], "clip_norm": 2.0}}}
    noisy["options"]["train"]["client_dp_noise"] = 0.02
    assert "DP" not in to_markdown(report_blocks({**plain, "worst_case": []})).split("## ")[0]
    preamble = to_markdown(report_blocks({**noisy, "worst_case": []})).split("## ")[0]
    assert "clip norm 2.0, client-level DP noise multiplier 0.02 (noise std z x clip norm on the sum), largest" in preamble


def test_on_two_classes_the_backdoor_table_gives_the_victim_class_recall_with_and_without_the_trigger():
    from dipsen.report.poisoning import backdoor_table, backdoor_worst_cases

    recall = {"normal": 0.97, "botnet": 0.99}
    records = [
        {**_record(None, 0.0, "flame", 0.98), "recall": recall, "backdoor_target": 0},
        {**_record("dba", 0.1, "flame", 0.97), "attack_success_rate": 0.08, "recall": recall, "backdoor_target": 0},
        {**_record("backdoor-data", 0.1, "flame", 0.97), "attack_success_rate": 0.02, "recall": recall, "backdoor_target": 0},
    ]
    (worst,) = backdoor_worst_cases(records)
    assert worst["victim"] == "botnet" and worst["clean_recall"] == 0.99 and worst["window_mean"] is None
    assert worst["triggered_recall"] == pytest.approx(0.92)  # 1 - the worst ASR, dba's
    table = backdoor_table([worst])
    assert table.headers[-2:] == ["botnet recall, triggered (1 - ASR)", "botnet recall, clean (same run)"]
    assert table.rows[0][-2:] == ["0.920", "0.990"]
    ten_classes = {**records[1], "recall": {str(c): 0.9 for c in range(10)}}
    assert "victim" not in backdoor_worst_cases([records[0], ten_classes])[0]


def test_the_window_mean_success_rate_leaves_out_the_first_tenth_of_the_run_and_the_rounds_outside_the_window():
    from dipsen.report.poisoning import window_mean

    rates = [1.0, 1.0, 0.2, 0.4, 0.6, 0.8, None, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    # 22 rounds: the first 2 left out (a tenth is 2); every round is in the window; an unevaluated round is skipped
    assert window_mean({"success_rates": rates, "backdoor_rounds": None}) == pytest.approx(3.0 / 19)
    assert window_mean({"success_rates": rates, "backdoor_rounds": "4-8"}) == pytest.approx((0.4 + 0.6 + 0.8 + 1.0) / 4)
    assert window_mean({"success_rates": rates, "backdoor_rounds": "1-2"}) is None  # the window lies in the left-out rounds


def test_the_triggered_recall_counts_a_backdoor_that_held_through_the_window_but_faded_in_the_last_round():
    from dipsen.report.poisoning import backdoor_worst_cases

    faded = {
        **_record("backdoor-replacement", 0.1, "fedavg", 0.98),
        "attack_success_rate": 0.1,
        "success_rates": [1.0, 1.0, 0.9, 0.9, 0.9, 0.1],
        "recall": {"normal": 0.97, "botnet": 1.0},
        "backdoor_target": 0,
    }
    (worst,) = backdoor_worst_cases([faded])
    assert worst["window_mean"] == {"attack_success_rate": pytest.approx(0.7), "attack": "backdoor-replacement"}
    assert worst["triggered_recall"] == pytest.approx(0.3)  # 1 - the mean over rounds 3-6, not 1 - the final 0.1


def test_a_merge_of_studies_told_at_different_f_says_so():
    from dipsen.report.poisoning import _told_at

    assert _told_at({}) == "the largest f" and _told_at({"told_at": [0.2]}) == "the largest f"
    assert "merged studies': 0.1, 0.2;" in _told_at({"told_at": [0.1, 0.2]})


def test_admission_counts_the_malicious_updates_let_in_and_the_honest_left_out_in_the_attack_window():
    from dipsen.report.poisoning import admission, report_blocks
    from dipsen.report.render import to_markdown

    def round_(number, clients, admitted, rejected=()):
        return {"round": number, "clients": clients, "admitted": admitted, "rejected": [{"client": c} for c in rejected]}

    history = [
        round_(1, [1, 2, 3, 4], [1, 2, 3]),  # malicious 1 admitted, 4 left out; honest 2 and 3 admitted
        round_(2, [1, 2, 5, 6], [2, 5], rejected=[6]),  # 6's update was invalid: not counted; malicious 1 left out
        round_(3, [1, 2, 3, 4], [2]),  # outside a 1-2 window
        {"round": 4, "clients": [1, 2], "admitted": None, "rejected": []},  # a rule that filters nothing
    ]
    assert admission(history, {1, 4}, None) == {"malicious_admitted": 1 / 5, "honest_rejected": 1 / 6}
    assert admission(history, {1, 4}, "1-2") == {"malicious_admitted": 1 / 3, "honest_rejected": 0.0}
    assert admission(history, set(), None) == {"malicious_admitted": None, "honest_rejected": 5 / 11}
    assert admission(history[3:], {1}, None) is None

    records = [
        {**_record(None, 0.0, "dnc", 0.95), "admission": {"malicious_admitted": None, "honest_rejected": 0.4}},
        {**_record("alie", 0.2, "dnc", 0.93), "admission": {"malicious_admitted": 0.25, "honest_rejected": 0.35}},
        {**_record("alie", 0.2, "median", 0.92), "admission": None},
    ]
    text = to_markdown(report_blocks({**_backdoor_results(records), "worst_case": []}))
    assert "| no attack (f = 0) | – / 0.40 |" in text and "| alie, f = 0.2 | 0.25 / 0.35 |" in text
