"""``dipsen train`` and ``dipsen show``: federated training into a run folder, and its final metrics."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from ..config import TrainConfig, load_config
from ..errors import DipsenError
from .app import app, console, err_console, progress_bar

if TYPE_CHECKING:
    from ..federated.workers import StopFlag

_TRAIN_OPTIONS = {f for f in TrainConfig.__dataclass_fields__}


def _default(name: str) -> str | bool:
    """What ``--help`` shows as the default of a training flag: the built-in value of the field.

    The flags themselves default to None, which means "not given": a TOML file's value then stands.
    """
    value = TrainConfig.__dataclass_fields__[name].default
    if value is None:
        return False  # the option's help says what an unset value means
    return str(value).lower() if isinstance(value, bool) else str(value)


@app.command()
def train(
    config: Annotated[Path | None, typer.Option("--config", help="TOML file of options; flags override it.")] = None,
    dataset: Annotated[str | None, typer.Option(show_default=_default("dataset"), help="mnist | socofing | ctu13")] = None,
    model: Annotated[
        str | None, typer.Option(show_default=_default("model"), help="cnn | dipsen | noise-only | selu-only")
    ] = None,
    data_dir: Annotated[
        str | None,
        typer.Option(show_default=_default("data_dir"), help="Your own copy of the original files (default: embedded data)."),
    ] = None,
    clients: Annotated[int | None, typer.Option(show_default=_default("clients"), help="K, number of clients.")] = None,
    fraction: Annotated[
        float | None, typer.Option(show_default=_default("fraction"), help="C, fraction of clients per round.")
    ] = None,
    rounds: Annotated[int | None, typer.Option(show_default=_default("rounds"), help="Maximum number of rounds.")] = None,
    min_clients: Annotated[
        int | None,
        typer.Option(
            show_default=_default("min_clients"),
            help="Fewest valid client updates a round needs; with fewer the run stops, resumable "
            "(default: more than half of m; 0: no minimum).",
        ),
    ] = None,
    aggregator: Annotated[
        str | None,
        typer.Option(
            show_default=_default("aggregator"),
            help="fedavg | trimmed-mean | median | krum | multi-krum | bulyan | centered-clipping | fltrust | dnc "
            "| flame (the server's rule; see README).",
        ),
    ] = None,
    trim_fraction: Annotated[
        float | None,
        typer.Option(show_default=_default("trim_fraction"), help="trimmed-mean: share of values cut at each end, in [0, 0.5)."),
    ] = None,
    byzantine: Annotated[
        int | None,
        typer.Option(
            show_default=_default("byzantine"),
            help="f, Byzantine clients to withstand (krum, multi-krum: m >= 2f+3; bulyan: m >= 4f+3; dnc, nnm: m >= f+1).",
        ),
    ] = None,
    clip_norm: Annotated[
        float | None,
        typer.Option(
            show_default=_default("clip_norm"),
            help="Clip each client's update w_k - w to this L2 norm before aggregating (default: no clipping).",
        ),
    ] = None,
    max_client_weight: Annotated[
        float | None,
        typer.Option(
            show_default=_default("max_client_weight"),
            help="Largest share of a round's weighted mean one client may have (fedavg, multi-krum, dnc).",
        ),
    ] = None,
    cc_tau: Annotated[
        float | None,
        typer.Option(show_default=_default("cc_tau"), help="centered-clipping: the radius tau each step is clipped to."),
    ] = None,
    cc_iterations: Annotated[
        int | None, typer.Option(show_default=_default("cc_iterations"), help="centered-clipping: the iterations L.")
    ] = None,
    fltrust_root_size: Annotated[
        int | None,
        typer.Option(
            show_default=_default("fltrust_root_size"),
            help="fltrust: rows of the held-out validation slice the server trains its own update on.",
        ),
    ] = None,
    dnc_iterations: Annotated[
        int | None, typer.Option(show_default=_default("dnc_iterations"), help="dnc: rounds of filtering.")
    ] = None,
    dnc_coordinates: Annotated[
        int | None, typer.Option(show_default=_default("dnc_coordinates"), help="dnc: coordinates sampled in each.")
    ] = None,
    pre_aggregation: Annotated[
        str | None,
        typer.Option(
            show_default=_default("pre_aggregation"),
            help="none | bucketing (means of --bucket-size updates) | nnm (each update the mean of its n-f nearest), "
            "applied before the aggregator.",
        ),
    ] = None,
    bucket_size: Annotated[
        int | None, typer.Option(show_default=_default("bucket_size"), help="bucketing: s, the updates per bucket.")
    ] = None,
    flame_lambda: Annotated[
        float | None,
        typer.Option(show_default=_default("flame_lambda"), help="flame: noise std in units of the median step norm."),
    ] = None,
    client_dp_noise: Annotated[
        float | None,
        typer.Option(
            show_default=_default("client_dp_noise"),
            help="Client-level DP (DP-FedAvg): noise multiplier z; the server adds Gaussian noise of std z*C/m to the "
            "mean of the clipped updates (C: --clip-norm, required; m clients sampled; fedavg only). Not --dp-epsilon.",
        ),
    ] = None,
    client_dp_epsilon: Annotated[
        float | None,
        typer.Option(
            show_default=_default("client_dp_epsilon"),
            help="Client-level DP: the target epsilon for a whole client's data over --rounds rounds; z is calibrated "
            "to it (instead of --client-dp-noise). Not --dp-epsilon, the noise layer's input-perturbation guarantee.",
        ),
    ] = None,
    client_dp_delta: Annotated[
        float | None,
        typer.Option(
            show_default=_default("client_dp_delta"),
            help="Client-level DP: the delta its epsilon is for (default: 1/K^1.1). Not --dp-delta.",
        ),
    ] = None,
    client_dp_insecure_seeded_noise: Annotated[
        bool | None,
        typer.Option(
            "--client-dp-insecure-seeded-noise",
            show_default=False,
            help="Client-level DP for tests only: draw the noise and the client sample from --seed, so runs repeat. "
            "VOIDS THE GUARANTEE: anyone with config.json regenerates the noise and subtracts it.",
        ),
    ] = None,
    target_accuracy: Annotated[
        float | None,
        typer.Option(show_default=_default("target_accuracy"), help="Stop once accuracy on the validation slice reaches this."),
    ] = None,
    validation_size: Annotated[
        int | None,
        typer.Option(
            show_default=_default("validation_size"),
            help="Training rows held out from the clients as a validation slice (default: 10%, at most 5000), only with "
            "--target-accuracy (checked on it), --adv-train or --target-robust-accuracy (robust accuracy measured on it) "
            "or --aggregator fltrust (the server trains on it); refused otherwise.",
        ),
    ] = None,
    malicious_fraction: Annotated[
        float | None,
        typer.Option(
            show_default=_default("malicious_fraction"),
            help="Simulated poisoning: share f in [0, 1) of the K clients that are malicious (round(f*K), seeded; "
            "recorded in run_info.json); 0: none. In-process engine only.",
        ),
    ] = None,
    malicious_attack: Annotated[
        str | None,
        typer.Option(
            show_default=_default("malicious_attack"),
            help="What the malicious clients send: model-replacement | sign-flip | gaussian | label-flip | scaled-count "
            "| alie | ipm | min-max | min-sum | mimic | fang-krum | fang-trim | fltrust-adaptive | backdoor-data "
            "| backdoor-replacement | dba | alie-backdoor (see README, Poisoning study, Backdoors).",
        ),
    ] = None,
    attack_knowledge: Annotated[
        str | None,
        typer.Option(
            show_default=_default("attack_knowledge"),
            help="What the colluding attacks (alie ... fltrust-adaptive) see: full (the round's honest updates) | partial "
            "(only the malicious clients' own honest updates; not mimic).",
        ),
    ] = None,
    alie_z: Annotated[
        float | None,
        typer.Option(
            show_default=_default("alie_z"),
            help="alie: send mean - z * std of the benign updates; alie-backdoor: clip to mean +- z * std (default: z "
            "from the paper's formula for each round's n and f, which is 0 at n = 10, f = 2 and n = 20, f = 2).",
        ),
    ] = None,
    alie_alpha: Annotated[
        float | None,
        typer.Option(
            show_default=_default("alie_alpha"),
            help="alie-backdoor: train on alpha * CE + (1 - alpha) * the pull into the honest updates' mean +- z * std "
            "(Baruch et al.'s distance term; the malicious clients then train after the honest ones); 1: no pull.",
        ),
    ] = None,
    ipm_eps: Annotated[
        float | None,
        typer.Option(show_default=_default("ipm_eps"), help="ipm: send -eps times the mean of the benign updates."),
    ] = None,
    minmax_perturbation: Annotated[
        str | None,
        typer.Option(
            show_default=_default("minmax_perturbation"),
            help="min-max, min-sum: the direction pushed along, unit (-mean/|mean|) | sign (-sign(mean)) | std (-std).",
        ),
    ] = None,
    backdoor_target: Annotated[
        int | None,
        typer.Option(
            show_default=_default("backdoor_target"), help="backdoor-data, backdoor-replacement, dba: the label taught."
        ),
    ] = None,
    poison_rate: Annotated[
        float | None,
        typer.Option(show_default=_default("poison_rate"), help="The backdoors: share of a malicious client's rows stamped."),
    ] = None,
    poison_epochs: Annotated[
        int | None,
        typer.Option(
            show_default="--local-epochs",
            help="The backdoors: local epochs a malicious client trains on its poisoned rows (reporting the honest step count).",
        ),
    ] = None,
    trigger_size: Annotated[
        int | None,
        typer.Option(show_default=_default("trigger_size"), help="The backdoors: side of the trigger square (pixels)."),
    ] = None,
    trigger_position: Annotated[
        str | None,
        typer.Option(
            show_default=_default("trigger_position"), help="The backdoors: bottom-right | bottom-left | top-right | top-left."
        ),
    ] = None,
    backdoor_rounds: Annotated[
        str | None,
        typer.Option(
            show_default="every round", help="The backdoors attack in rounds A-B only (e.g. 10-20), then send honest updates."
        ),
    ] = None,
    partition: Annotated[str | None, typer.Option(show_default=_default("partition"), help="iid | dirichlet | shards")] = None,
    dirichlet_alpha: Annotated[
        float | None,
        typer.Option(
            show_default=_default("dirichlet_alpha"),
        ),
    ] = None,
    shards_per_client: Annotated[
        int | None,
        typer.Option(
            show_default=_default("shards_per_client"),
        ),
    ] = None,
    local_epochs: Annotated[
        int | None, typer.Option(show_default=_default("local_epochs"), help="E, local epochs per round.")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(show_default=_default("batch_size"), help="B, local batch size.")] = None,
    optimizer: Annotated[str | None, typer.Option(show_default=_default("optimizer"), help="sgd | adam")] = None,
    lr: Annotated[
        float | None, typer.Option(show_default=_default("lr"), help="Local learning rate (the peak of --lr-schedule cyclic).")
    ] = None,
    lr_schedule: Annotated[
        str | None,
        typer.Option(
            show_default=_default("lr_schedule"),
            help="constant | cyclic: the clients' rate per round; cyclic rises from 0 to --lr at 2/5 of --rounds, "
            "then falls to 0 (Wong et al.'s schedule for fast adversarial training).",
        ),
    ] = None,
    momentum: Annotated[
        float | None,
        typer.Option(
            show_default=_default("momentum"),
        ),
    ] = None,
    input_noise: Annotated[
        float | None,
        typer.Option(
            show_default=_default("input_noise"),
            help="Std of Gaussian noise added to every training input: trains a base model for randomized "
            "smoothing, certified at this sigma by dipsen certify.",
        ),
    ] = None,
    smoothing_loss: Annotated[
        str | None,
        typer.Option(
            show_default=_default("smoothing_loss"),
            help="Training loss under --input-noise: gaussian (cross-entropy on one noisy copy, Cohen et al.) | "
            "consistency (Jeong & Shin 2020: cross-entropy on --consistency-copies noisy copies, plus "
            "--consistency-lambda times their KL from the copies' mean prediction and --consistency-eta times "
            "that mean's entropy) | smoothadv (Salman et al. 2019: cross-entropy on --smoothadv-copies noisy copies of "
            "each row moved by an L2 attack on the smoothed classifier, --smoothadv-steps steps within --smoothadv-eps; "
            "images only). consistency and smoothadv need --input-noise > 0 and no --adv-train.",
        ),
    ] = None,
    consistency_lambda: Annotated[
        float | None,
        typer.Option(
            show_default=_default("consistency_lambda"),
            help="consistency: weight of the KL term (the reference code's MNIST setting).",
        ),
    ] = None,
    consistency_copies: Annotated[
        int | None,
        typer.Option(
            show_default=_default("consistency_copies"),
            help="consistency: noisy copies m of every row, at least 2; a step costs m forward and backward passes of the batch.",
        ),
    ] = None,
    consistency_eta: Annotated[
        float | None,
        typer.Option(show_default=_default("consistency_eta"), help="consistency: weight of the entropy term."),
    ] = None,
    smoothadv_eps: Annotated[
        float | None,
        typer.Option(
            show_default=_default("smoothadv_eps"), help="smoothadv: L2 radius of the attack on the smoothed classifier."
        ),
    ] = None,
    smoothadv_steps: Annotated[
        int | None,
        typer.Option(show_default=_default("smoothadv_steps"), help="smoothadv: the attack's steps (step size 2 eps / steps)."),
    ] = None,
    smoothadv_copies: Annotated[
        int | None,
        typer.Option(
            show_default=_default("smoothadv_copies"),
            help="smoothadv: noise draws m per row, fixed through the attack; a step costs (steps + 1) m passes of the batch.",
        ),
    ] = None,
    adv_train: Annotated[
        str | None,
        typer.Option(
            show_default=_default("adv_train"),
            help="Adversarial training in every local step: none | fgsm-rs (FGSM from a random start) | pgd "
            "(--adv-steps steps from a random start); examples stay in the data set's feasible domain.",
        ),
    ] = None,
    adv_eps: Annotated[
        float | None, typer.Option(show_default=_default("adv_eps"), help="L-inf radius of the training examples, in (0, 1].")
    ] = None,
    adv_steps: Annotated[
        int | None, typer.Option(show_default=_default("adv_steps"), help="pgd: attack steps per batch.")
    ] = None,
    adv_step_size: Annotated[
        float | None,
        typer.Option(
            show_default=_default("adv_step_size"),
            help="Attack step (default: 1.25 eps for fgsm-rs, 2.5 eps / --adv-steps for pgd).",
        ),
    ] = None,
    adv_mix: Annotated[
        float | None,
        typer.Option(
            show_default=_default("adv_mix"),
            help="Share of each batch's loss on adversarial examples, in (0, 1] (1: adversarial only); --adv-loss ce only.",
        ),
    ] = None,
    adv_loss: Annotated[
        str | None,
        typer.Option(
            show_default=_default("adv_loss"),
            help="ce | trades | calfat: the loss of adversarial training. trades (Zhang et al. 2019): cross-entropy on the "
            "clean batch plus --trades-beta times the KL divergence from its prediction to the prediction on "
            "examples that maximise that KL (--adv-train's steps, --adv-step-size and --adv-eps). calfat (Chen et al. "
            "2022, for label skew): cross-entropy on such examples, the logits of both the search and the loss plus "
            "log of the client's own class frequencies (training only).",
        ),
    ] = None,
    trades_beta: Annotated[
        float | None,
        typer.Option(
            show_default=_default("trades_beta"),
            help="trades: weight of the KL term (the paper's 1/lambda); larger is more robust and less accurate.",
        ),
    ] = None,
    proximal_mu: Annotated[
        float | None,
        typer.Option(
            show_default=_default("proximal_mu"),
            help="FedProx's mu: (mu / 2) ||w - w_global||^2 added to every local step's loss, with any training "
            "loss; keeps clients with skewed data near the round's global model (0: off).",
        ),
    ] = None,
    train_dtype: Annotated[
        str | None,
        typer.Option(
            show_default=_default("train_dtype"),
            help="float32 | bfloat16: local training's forward passes (and adversarial training's attack) under "
            "bfloat16 autocast, 1.3-1.5x faster per step on CPUs with native bf16; evaluation, attacks and "
            "certificates stay float32.",
        ),
    ] = None,
    target_robust_accuracy: Annotated[
        float | None,
        typer.Option(
            show_default=_default("target_robust_accuracy"),
            help="Stop once the robust monitor's accuracy (--robust-monitor, at --adv-eps) on the validation slice reaches this.",
        ),
    ] = None,
    robust_monitor: Annotated[
        str | None,
        typer.Option(
            show_default=_default("robust_monitor"),
            help="The attack behind robust_accuracy, best_robust.pt and --target-robust-accuracy: apgd-ce | pgd. "
            "The final model is checked again at twice the steps.",
        ),
    ] = None,
    robust_monitor_steps: Annotated[
        int | None, typer.Option(show_default=_default("robust_monitor_steps"), help="The robust monitor's attack steps.")
    ] = None,
    robust_monitor_samples: Annotated[
        int | None,
        typer.Option(show_default=_default("robust_monitor_samples"), help="Validation rows the robust monitor attacks."),
    ] = None,
    robust_collapse: Annotated[
        float | None,
        typer.Option(
            metavar="DROP",
            show_default=_default("robust_collapse"),
            help="The collapse guard: stop once a round's robust accuracy on the validation slice is more than DROP "
            "(absolute, e.g. 0.2) below the best so far, that best being at least 0.3, and end the run with "
            "best_robust.pt's model (final_metrics.json: collapse). Needs --adv-train or --target-robust-accuracy.",
        ),
    ] = None,
    sigma: Annotated[
        float | None,
        typer.Option(show_default=_default("sigma"), help="Noise multiplier; default derived from (epsilon, delta, L)."),
    ] = None,
    dp_epsilon: Annotated[
        float | None,
        typer.Option(
            show_default=_default("dp_epsilon"),
            help="The noise layer's epsilon (input perturbations of L2 size L, sets --sigma); not client-level DP.",
        ),
    ] = None,
    dp_delta: Annotated[
        float | None,
        typer.Option(
            show_default=_default("dp_delta"),
            help="The noise layer's delta (with --dp-epsilon); not --client-dp-delta.",
        ),
    ] = None,
    dp_attack_bound: Annotated[
        float | None,
        typer.Option(show_default=_default("dp_attack_bound"), help="L, the L2 attack size the DP guarantee is for."),
    ] = None,
    alpha_dropout: Annotated[
        float | None,
        typer.Option(
            show_default=_default("alpha_dropout"),
        ),
    ] = None,
    mc_samples: Annotated[
        int | None, typer.Option(show_default=_default("mc_samples"), help="Predict with the mean softmax of n noise draws.")
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            show_default=_default("seed"),
        ),
    ] = None,
    device: Annotated[
        str | None,
        typer.Option(
            show_default=_default("device"),
            help="auto | cpu | cuda: where models train and are evaluated (auto: CUDA if torch sees a GPU, else the CPU; "
            "cuda without one is an error). May change on --resume. The CUDA path is untested on a GPU.",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            show_default=_default("workers"),
            help="Client-training processes (default: one per CPU core; with CUDA, one per GPU).",
        ),
    ] = None,
    round_timeout: Annotated[
        float | None,
        typer.Option(
            show_default=_default("round_timeout"),
            help="Seconds a round waits for the worker processes; the clients still pending then count as failed "
            "(see --min-clients) and a stuck worker is replaced. May change on --resume. In-process engine only "
            "(Flower: reply-timeout-seconds).",
        ),
    ] = None,
    engine: Annotated[
        str | None, typer.Option(show_default=_default("engine"), help="inprocess | flower (a Flower simulation on Ray).")
    ] = None,
    train_subset: Annotated[
        int | None, typer.Option(show_default=_default("train_subset"), help="Use a seeded random subset of the training set.")
    ] = None,
    test_subset: Annotated[
        int | None, typer.Option(show_default=_default("test_subset"), help="Use a seeded random subset of the test set.")
    ] = None,
    include_background: Annotated[
        bool | None,
        typer.Option(
            "--include-background/--exclude-background",
            show_default=_default("include_background"),
            help="CTU-13: count Background flows as normal.",
        ),
    ] = None,
    bad_rows: Annotated[
        str | None, typer.Option(show_default=_default("bad_rows"), help="CTU-13 malformed rows: error | skip")
    ] = None,
    ctu13_split: Annotated[
        str | None,
        typer.Option(
            show_default=_default("ctu13_split"),
            help="CTU-13 split: time (per file, first 70% / last 30% by StartTime) | host (hold out a seeded ~30% "
            "of source hosts) | scenario (hold out a seeded ~30% of the --data-dir files).",
        ),
    ] = None,
    socofing_task: Annotated[
        str | None,
        typer.Option(
            show_default=_default("socofing_task"),
            help="SOCOFing only: the label to predict: hand-finger (10 classes) | gender | hand | finger "
            "(same subject split for each).",
        ),
    ] = None,
    keep_checkpoints: Annotated[
        str | None,
        typer.Option(
            show_default=_default("keep_checkpoints"),
            help="Round checkpoints kept: all | last | last-N (the newest N) | every-N (multiples of N and the newest). "
            "last-6 keeps what --resume and orange-box --stale-rounds 5 need.",
        ),
    ] = None,
    eval_every: Annotated[
        int | None,
        typer.Option(
            show_default=_default("eval_every"),
            help="Evaluate the global model (test set; validation and robust slices, whose targets it checks) "
            "after every N-th round and the last only: saves time in long runs; weights are unchanged.",
        ),
    ] = None,
    round_eval_size: Annotated[
        int | None,
        typer.Option(
            show_default=_default("round_eval_size"),
            help="Test rows an evaluated round's test accuracy is measured on: a seeded slice, the same every round; "
            "the run's last round (also where a target or the collapse guard stops it) and final_metrics.json use the "
            "whole test set. 0 (or a value at least the test set's size): the whole test set every round. "
            "metrics.jsonl's eval_rows says which.",
        ),
    ] = None,
    log_to: Annotated[
        str | None,
        typer.Option(
            show_default=_default("log_to"),
            help="tensorboard: also log every per-round metric of metrics.jsonl (step = round) and the final metrics "
            "as TensorBoard scalars in RUN/tensorboard/ (view: tensorboard --logdir RUN/tensorboard); needs the "
            "tensorboard package, dipsen's tracking extra. A resumed run continues the same log.",
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Folder that receives the run folder.")] = Path("runs"),
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Resume the run in this folder from its last finished round; with --rounds N, finished or not, "
            "extend it to N rounds (--keep-checkpoints, --round-timeout and --device may change too; other options "
            "come from its config.json)."
        ),
    ] = None,
) -> None:
    """Train a model by federated averaging and write a run folder."""
    from ..device import resolve_device
    from ..federated import FederatedTraining, RunDir
    from ..federated import train as run_training
    from ..federated.tracking import require as require_tracker
    from ..federated.workers import Interrupted, StopFlag

    overrides = {k: v for k, v in locals().items() if k in _TRAIN_OPTIONS}
    if resume is not None:
        # only these change no finished round's weights: see RunDir.reconfigure
        changeable = ("rounds", "keep_checkpoints", "round_timeout", "device")
        given = sorted("--" + k.replace("_", "-") for k, v in overrides.items() if v is not None and k not in changeable)
        if config is not None or given:
            raise DipsenError(
                f"--resume reads its options from {resume}/config.json "
                "(only --rounds, --keep-checkpoints, --round-timeout and --device may change); "
                f"drop {', '.join(given) or '--config'}"
            )
        run = RunDir.open(resume)
        require_tracker(run.config().log_to)  # before reconfigure rewrites config.json
        resolve_device(device or run.config().device)  # likewise: a device this machine lacks changes nothing
        cfg = run.reconfigure(rounds=rounds, keep_checkpoints=keep_checkpoints, round_timeout=round_timeout, device=device)
    else:
        cfg = load_config(config, overrides)
        require_tracker(cfg.log_to)
        resolve_device(cfg.device)  # a device this machine lacks fails here, before the data load and any file
        run = None
    data = cfg.load_dataset()
    stop = StopFlag()
    with ExitStack() as signals:
        if cfg.engine == "flower":
            from ..federated.engine import federated_data

            federated_data(cfg, data)  # resolves validation_size; raises on bad settings before any file is written
            signals.enter_context(_stop_on_signals(stop))  # then simulate stops Flower's processes and raises
            job = None
        else:
            # from before the workers start until training ends, a signal only sets the flag
            signals.enter_context(_stop_on_signals(stop))
            job = FederatedTraining(cfg, data, stop=stop)
        if run is None:
            run = RunDir.create(out, cfg)
        console.print(
            f"run folder: [bold]{run.path}[/]  ({cfg.dataset}, {cfg.model}, K={cfg.clients}, "
            f"m={cfg.clients_per_round}/round, up to {cfg.rounds} rounds)"
        )
        if cfg.client_dp_insecure_seeded_noise:
            console.print("[bold red]--client-dp-insecure-seeded-noise: this run's client-level DP guarantees nothing[/]")
        progress = progress_bar()
        task = progress.add_task("training", total=cfg.rounds)

        def on_round(result, start_round):
            if result is None:
                progress.update(task, completed=start_round)
                return
            loss = "-" if result.train_loss is None else f"{result.train_loss:.3f}"
            accuracy = "-" if result.test_accuracy is None else f"{result.test_accuracy:.4f} ({result.eval_rows} rows)"
            val = "" if result.validation_accuracy is None else f" val {result.validation_accuracy:.4f}"
            if result.robust_accuracy is not None:
                monitor = (result.robust_monitor or "robust").split(",")[0]  # "apgd-ce-40": what measured it
                val += f" val {monitor} {result.robust_accuracy:.4f}"
            if result.client_dp_epsilon is not None:
                val += f" client-eps {result.client_dp_epsilon:.3g}"
            progress.update(task, completed=result.round, description=f"round {result.round} acc {accuracy}{val} loss {loss}")

        def on_poll():  # the Flower engine trains in other processes: follow the run folder
            history = run.metrics()
            if history:
                last = history[-1]
                measured = [r for r in history if r["test_accuracy"] is not None]
                accuracy = f" acc {measured[-1]['test_accuracy']:.4f} (round {measured[-1]['round']})" if measured else ""
                progress.update(task, completed=last["round"], description=f"round {last['round']}{accuracy}")

        try:
            with progress:
                if job is None:
                    from ..federated.flower.launch import simulate

                    metrics = simulate(run, resume=resume is not None, on_poll=on_poll, stop=stop)
                else:
                    metrics = run_training(job, run, resume=resume is not None, on_round=on_round)
                    stop.check()  # a signal during the final evaluation stops the command all the same
        except Interrupted as exc:
            err_console.print(f"interrupted by {exc}; resume with: dipsen train --resume {run.path}")
            raise typer.Exit(128 + exc.signum) from None
    _print_metrics(metrics)
    console.print(f"saved: {run.path}")


@contextmanager
def _stop_on_signals(stop: StopFlag) -> Iterator[None]:
    """Inside, SIGINT, SIGTERM and SIGHUP set ``stop`` (the run stops at its next check), nothing else.

    A signal that was ignored when dipsen started stays ignored, as Python itself leaves SIGINT:
    that is how ``nohup`` and a script's background jobs keep a process through a hang-up or a Ctrl-C.
    """
    from ..federated.workers import STOP_SIGNALS

    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS if signal.getsignal(s) != signal.SIG_IGN}
    for signum in previous:
        signal.signal(signum, lambda received, frame: stop.set(received))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python


@app.command()
def show(run_dir: Annotated[Path, typer.Argument(help="A run folder.")]) -> None:
    """Print the final metrics of a finished run."""
    from ..federated import RunDir

    run = RunDir.open(run_dir)
    if not (run.path / "final_metrics.json").exists():
        raise DipsenError(f"{run_dir}: run has not finished (no final_metrics.json); resume it with --resume")
    _print_metrics(run.read_json("final_metrics.json"))


def _print_metrics(metrics: dict) -> None:
    collapse = metrics.get("collapse")
    which = f"round {metrics.get('rounds')}" if not collapse else f"best_robust.pt, round {collapse['best_round']}"
    table = Table(title=f"final global model, {which} ({metrics['prediction_rule']})")
    for column in ("class", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for row in metrics["per_class"]:
        table.add_row(row["class"], f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}", str(row["support"]))
    for average in ("macro", "weighted"):
        m = metrics[average]
        table.add_row(
            f"[bold]{average} avg", f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", str(metrics["samples"])
        )
    console.print(table)
    console.print(f"accuracy: [bold]{metrics['accuracy']:.4f}[/]")
    dp = metrics.get("client_dp")
    if dp:
        target = "" if dp.get("target_epsilon") is None else f", calibrated to {dp['target_epsilon']:g}"
        console.print(
            f"client-level DP: epsilon [bold]{dp['epsilon']:.4g}[/] at delta {dp['delta']:.3g} after {dp['rounds']} rounds "
            f"(noise multiplier {dp['noise_multiplier']:.4g}{target}, clip norm {dp['clip_norm']:g}, "
            f"{dp['sampled']} of {dp['population']} clients per round; {dp['accountant']})"
        )
        if dp.get("noise_source") == "seed":  # client_dp_insecure_seeded_noise: the epsilon above protects nothing
            console.print(
                "[bold red]client-level DP guarantee: none[/] (seeded noise: anyone with config.json regenerates "
                "the noise and the client sample)"
            )
    if collapse:
        console.print(
            f"[bold red]robust accuracy collapsed[/] at round {collapse['round']}: {collapse['at']:.4f}, more than "
            f"{collapse['drop']:g} below round {collapse['best_round']}'s {collapse['best']:.4f}; training stopped there "
            f"(a resume trains no further) and the run ends with {collapse['model']} (round {collapse['best_round']})"
        )
    check = metrics.get("robust_monitor_check")
    if check:
        (steps, doubled_steps), (accuracy, doubled) = check["steps"], check["accuracy"]
        verdict = "held" if check["converged"] else "[bold red]fell: the monitor's figures overstate robustness[/]"
        console.print(
            f"robust monitor ({check['monitor']}): {accuracy:.4f} at {steps} steps, {doubled:.4f} at {doubled_steps}: {verdict}"
        )
        if check.get("target_reliable") is False:
            console.print("[bold red]--target-robust-accuracy is unreliable for this run[/] (its monitor had not converged)")
    cost = metrics.get("cost") or {}
    if cost:
        console.print(
            f"cost: {cost['mean_step_seconds'] * 1e3:.2f} ms per local step, "
            f"{cost['mean_round_seconds']:.2f} s per round (of which {cost['mean_eval_seconds']:.2f} s evaluation), "
            f"{cost['train_samples_per_second']:.0f} training samples/s"
        )
