"""Where a training step's time goes, CNN against DiPSeN: ms per step of each layer and operation, forward and backward.

Batch 32 of MNIST, local training's default optimizer and rate (what the engine's clients run), for
each thread count, all measured in one run:

1. the plain wall-clock time per step of each model (no profiler), CNN and DiPSeN interleaved block
   by block on the same batches, the median block of each, and the ratio DiPSeN / CNN;
2. a torch.profiler table over ``--profile-steps`` steps of each model (also interleaved): the
   profiled ops' own (self) CPU time per step, added up per part of the model, forward and backward.

The parts follow the layers. Forward ops belong to the innermost layer that ran them; a backward op
belongs to the layer whose forward op created its autograd node (the profiler's sequence numbers
link the two). Within a layer: the convolution itself, the layout copies it makes (``aten::copy_``
and kin under the convolution op), and what runs around it (block 1's sensitivity bound: its
frequency-grid search, which reads the cached frequency tables, and the rest of the bound and the
rescaling; a gain folded into block 2's weights); the noise layer's draw (``aten::randn``,
``aten::normal_``) and the rest of the layer (adding the noise, the gain). The optimizer's part
includes accumulating the parameters' gradients. "other" is what no layer ran (flatten, the loss's
backward seed, the autograd engine's own time between nodes).

The profiler adds a fixed cost to every op, so the profiled totals exceed the plain step times and
parts made of many small ops look larger than they are: the plain ratio is the figure to quote.

Usage: python benchmarks/step_profile.py [--threads 1,2] [--blocks 15] [--block-steps 20] [--profile-steps 100]
       [--json out.json] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from dipsen.config import TrainConfig
from dipsen.data import load_dataset
from dipsen.federated.engine import local_training
from dipsen.models import FederatedNet, build_model, calibrate_noise
from dipsen.models.selu import SeluLayer

SHAPE, CLASSES, BATCH = (1, 28, 28), 10, 32
MODELS = ("cnn", "dipsen")
DEFAULTS = TrainConfig()
# --smoke: one thread, a few steps of each kind, on random inputs (no data set to load)
SMOKE = {"threads": "1", "blocks": 1, "block_steps": 2, "profile_steps": 2, "warmup": 1}

PREFIX = "part:"  # the profiler ranges this script opens around each layer
# parts in the order of the table; a part neither model has is left out of it
PARTS = (
    "conv1: convolution",
    "conv1: layout copies",
    "conv1: bound, frequency-grid search",
    "conv1: bound, rest + rescaling",
    "block 1: ReLU",
    "block 1: max-pool",
    "noise: draw",
    "noise: add + gain",
    "conv2: convolution",
    "conv2: layout copies",
    "conv2: folded gain",
    "block 2: ReLU",
    "block 2: max-pool",
    "hidden: linear",
    "hidden: ReLU",
    "hidden: SELU",
    "hidden: AlphaDropout",
    "output: linear",
    "loss",
    "optimizer + grad accumulation",
    "other",
)
CONV_OPS = {"aten::conv2d", "aten::convolution", "aten::_convolution", "aten::mkldnn_convolution", "aten::convolution_backward"}
COPY_OPS = {"aten::copy_", "aten::contiguous", "aten::clone", "aten::to", "aten::_to_copy"}
DRAW_OPS = {"aten::randn", "aten::normal", "aten::normal_", "aten::randn_like"}
BACKWARD_PREFIX = "autograd::engine::evaluate_function: "


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer a client of the engine trains with, at today's defaults."""
    return local_training(DEFAULTS).make_optimizer(model.parameters())


def layer_labels(model: FederatedNet) -> dict[nn.Module, str]:
    """The part label of each layer of ``model`` (a FederatedNet), by position."""
    labels = {
        model.block1[0]: "conv1",
        model.block1[1]: "block 1: ReLU",
        model.block1[2]: "block 1: max-pool",
        model.block2[0]: "conv2",
        model.block2[1]: "block 2: ReLU",
        model.block2[2]: "block 2: max-pool",
        model.output: "output: linear",
    }
    if model.noise is not None:
        labels[model.noise] = "noise"
    hidden = model.hidden
    if isinstance(hidden, nn.Sequential):  # the CNN's Linear + ReLU
        labels[hidden[0]], labels[hidden[1]] = "hidden: linear", "hidden: ReLU"
    else:
        assert isinstance(hidden, SeluLayer)
        labels[hidden.linear], labels[hidden.activation] = "hidden: linear", "hidden: SELU"
        labels[hidden.dropout] = "hidden: AlphaDropout"
    return labels


def instrument(model: FederatedNet) -> None:
    """Open a profiler range around each layer's forward (hooks), and around the bound's methods."""
    for module, label in layer_labels(model).items():
        stack: list[record_function] = []

        def enter(_module, _inputs, label=label, stack=stack) -> None:
            stack.append(record_function(PREFIX + label))
            stack[-1].__enter__()

        def leave(_module, _inputs, _output, stack=stack) -> None:
            stack.pop().__exit__(None, None, None)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)
    conv1 = model.block1[0]
    for method, label in (("effective_weight", "bound"), ("_grid_argmax", "bound grid")):
        original = getattr(conv1, method, None)
        if original is not None:  # an instance attribute shadows the class's method
            setattr(conv1, method, _ranged(original, PREFIX + label))


def _ranged(fn: Callable, name: str) -> Callable:
    def wrapper(*args, **kwargs):
        with record_function(name):
            return fn(*args, **kwargs)

    return wrapper


def refine(label: str | None, names: list[str]) -> str:
    """The table's part for an op run in layer ``label``, with these event names from the op outwards.

    A layer's range itself (its Python overhead) goes to the layer's main part, as does the autograd
    engine's time around a backward node.
    """
    if label is None:
        return "other"
    if label == "bound grid":
        return "conv1: bound, frequency-grid search"
    if label == "bound":
        return "conv1: bound, rest + rescaling"
    own = names[0].startswith(PREFIX)
    if label in ("conv1", "conv2"):
        if own or any(n in CONV_OPS or n.endswith("ConvolutionBackward0") for n in names):
            return f"{label}: layout copies" if any(n in COPY_OPS for n in names) else f"{label}: convolution"
        return "conv1: bound, rest + rescaling" if label == "conv1" else "conv2: folded gain"
    if label == "noise":
        return "noise: draw" if any(n in DRAW_OPS for n in names) else "noise: add + gain"
    return label


def _chain(event) -> list:
    """The event and its ancestors, innermost first."""
    chain = []
    while event is not None:
        chain.append(event)
        event = event.cpu_parent
    return chain


def attribute(events) -> dict[str, dict[tuple[str, str], float]]:
    """Self CPU time (us) of every profiled op, by model, then by (part, "fwd" or "bwd")."""
    forward_label: dict[int, str] = {}  # a forward op's sequence number -> its layer's label
    rows: list[tuple[str, str | None, str, list[str], int, float]] = []
    for event in events:
        chain = _chain(event)
        step = next((e.name[5:] for e in chain if e.name.startswith("step:")), None)
        if step is None:
            continue
        names = [e.name for e in chain]
        backward = next((e for e in chain if e.name.startswith(BACKWARD_PREFIX)), None)
        if backward is None:
            inner = next((n[len(PREFIX) :] for n in names if n.startswith(PREFIX)), None)
            if inner is None and any(n in ("optimizer", "loss") for n in names):
                inner = "optimizer + grad accumulation" if "optimizer" in names else "loss"
            if event.sequence_nr >= 0 and inner is not None:
                forward_label[event.sequence_nr] = inner
            rows.append((step, inner, "fwd", names, -1, event.self_cpu_time_total))
        else:
            below = names[: names.index(backward.name) + 1]
            rows.append((step, None, "bwd", below, backward.sequence_nr, event.self_cpu_time_total))
    totals: dict[str, dict[tuple[str, str], float]] = defaultdict(lambda: defaultdict(float))
    for step, label, direction, names, sequence, micros in rows:
        if direction == "bwd":
            if "AccumulateGrad" in names[-1]:
                label = "optimizer + grad accumulation"
            else:
                label = forward_label.get(sequence)
        part = label if label in ("optimizer + grad accumulation", "loss") else refine(label, names)
        totals[step][(part, direction)] += micros
    return totals


def training_step(
    model: nn.Module, opt: torch.optim.Optimizer, loss_fn: nn.Module
) -> Callable[[torch.Tensor, torch.Tensor], None]:
    def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        with record_function("optimizer"):
            opt.zero_grad()
        out = model(xb)
        with record_function("loss"):
            loss = loss_fn(out, yb)
        loss.backward()
        with record_function("optimizer"):
            opt.step()

    return step


@contextmanager
def threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def measure(x: torch.Tensor, y: torch.Tensor, n_threads: int, args: argparse.Namespace) -> dict:
    """Plain interleaved step times, then the profiled parts, at ``n_threads`` threads."""
    with threads(n_threads):
        steps = {}
        for name in MODELS:
            torch.manual_seed(0)
            model = build_model(name, SHAPE, CLASSES, calibrate_noise())
            instrument(model)  # the hooks stay; with no profiler running a range costs about a microsecond
            steps[name] = training_step(model, make_optimizer(model), nn.CrossEntropyLoss())
        batches = list(zip(x.split(BATCH), y.split(BATCH), strict=True))
        times: dict[str, list[float]] = {name: [] for name in MODELS}
        for block in range(args.blocks + 1):
            for name in MODELS:
                start = time.perf_counter()
                for i in range(args.block_steps):
                    steps[name](*batches[(block * args.block_steps + i) % len(batches)])
                if block:  # block 0 is warm-up
                    times[name].append((time.perf_counter() - start) / args.block_steps)
        plain = {name: statistics.median(t) for name, t in times.items()}

        for name in MODELS:
            for i in range(args.warmup):
                steps[name](*batches[i % len(batches)])
        chunk = min(10, args.profile_steps)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            done = 0
            while done < args.profile_steps:
                for name in MODELS:
                    for i in range(done, min(done + chunk, args.profile_steps)):
                        with record_function(f"step:{name}"):
                            steps[name](*batches[i % len(batches)])
                done += chunk
        totals = attribute(prof.events())
    parts = {
        name: {f"{part} {direction}": micros / 1e3 / args.profile_steps for (part, direction), micros in totals[name].items()}
        for name in MODELS
    }
    return {
        "threads": n_threads,
        "plain_step_ms": {name: 1e3 * value for name, value in plain.items()},
        "ratio": plain["dipsen"] / plain["cnn"],
        "profiled_ms_per_step": parts,
    }


def print_table(result: dict) -> None:
    parts = result["profiled_ms_per_step"]
    plain = result["plain_step_ms"]
    print(
        f"\n{result['threads']} thread(s): plain step time (no profiler, interleaved, median block) "
        f"CNN {plain['cnn']:.2f} ms, DiPSeN {plain['dipsen']:.2f} ms, DiPSeN/CNN {result['ratio']:.3f}"
    )
    columns = f"{'CNN fwd':>8} {'CNN bwd':>8} {'DiPSeN fwd':>10} {'DiPSeN bwd':>10} {'extra':>7}"
    header = f"{'part (profiled ms per step)':<38} {columns}"
    print(header)
    print("-" * len(header))
    sums = {name: [0.0, 0.0] for name in MODELS}
    for part in PARTS:
        cells = {name: [parts[name].get(f"{part} {d}", 0.0) for d in ("fwd", "bwd")] for name in MODELS}
        if not any(v for c in cells.values() for v in c):
            continue
        for name in MODELS:
            sums[name][0] += cells[name][0]
            sums[name][1] += cells[name][1]
        extra = sum(cells["dipsen"]) - sum(cells["cnn"])
        c, d = cells["cnn"], cells["dipsen"]
        print(f"{part:<38} {c[0]:8.3f} {c[1]:8.3f} {d[0]:10.3f} {d[1]:10.3f} {extra:+7.3f}")
    c, d = sums["cnn"], sums["dipsen"]
    print(f"{'total (profiled)':<38} {c[0]:8.3f} {c[1]:8.3f} {d[0]:10.3f} {d[1]:10.3f} {sum(d) - sum(c):+7.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--blocks", type=int, default=15, help="interleaved blocks of the plain step timing")
    parser.add_argument("--block-steps", type=int, default=20, help="steps per block of the plain step timing")
    parser.add_argument("--profile-steps", type=int, default=100, help="profiled steps of each model")
    parser.add_argument("--warmup", type=int, default=10, help="steps of each model before profiling")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script runs end to end (figures meaningless)")
    args = parser.parse_args()
    if args.smoke:  # the smoke sizes replace the defaults; flags given still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()

    if args.smoke:
        x, y = torch.rand(4 * BATCH, *SHAPE), torch.randint(0, CLASSES, (4 * BATCH,))
    else:
        mnist = load_dataset("mnist")
        x, y = torch.from_numpy(mnist.x_train[:3200]), torch.from_numpy(mnist.y_train[:3200])
    print(f"torch {torch.__version__}; batch {BATCH}; local training {DEFAULTS.optimizer} lr {DEFAULTS.lr}")
    results = [measure(x, y, int(t), args) for t in args.threads.split(",")]
    for result in results:
        print_table(result)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
