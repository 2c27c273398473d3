"""Cost of adversarial training per local step: fgsm-rs and pgd-k against plain training, in one run.

Each method runs :func:`dipsen.federated.client_update` (the code both engines train with) from the
same weights on the same ``--samples`` MNIST training images in batches of ``--batch``; a step's
time is the update's seconds over its steps, best of ``--repeats`` with the methods interleaved,
and the ratio is against plain training of the same model in the same run. Forward-backward
passes per step: plain 1; fgsm-rs 3 (the attack's, the adversarial loss's, the clean loss's);
pgd-k k + 2; one fewer with ``--mix 1`` (no clean loss). The projection onto the feasible domain
runs once per attack step. Each method also runs with ``train_dtype`` bfloat16 (autocast), and the
last column is its speed-up over the same method in float32.

Usage: python benchmarks/adv_train_cost.py [--samples 640] [--batch 32] [--pgd-steps 10] [--mix 0.5]
                                           [--repeats 3] [--threads 2] [--models cnn,dipsen] [--smoke]
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from dipsen.attack.domain import feasible_domain
from dipsen.data import load_dataset
from dipsen.federated import LocalTraining, client_update
from dipsen.models import build_model, calibrate_noise

# --smoke: one batch, PGD-2, one repeat, 1 thread
SMOKE = {"samples": 32, "batch": 32, "pgd_steps": 2, "repeats": 1, "threads": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=640)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--mix", type=float, default=0.5)
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="cnn,dipsen")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script runs end to end (figures meaningless)")
    args = parser.parse_args()
    if args.smoke:  # the smoke sizes replace the defaults; flags given still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    torch.set_num_threads(args.threads)
    mnist = load_dataset("mnist")
    domain = feasible_domain(mnist)
    x, y = torch.from_numpy(mnist.x_train[: args.samples]), torch.from_numpy(mnist.y_train[: args.samples])
    methods = {
        "plain": LocalTraining(batch_size=args.batch),
        "fgsm-rs": LocalTraining(batch_size=args.batch, adv_train="fgsm-rs", adv_eps=args.eps, adv_mix=args.mix, domain=domain),
        f"pgd-{args.pgd_steps}": LocalTraining(
            batch_size=args.batch,
            adv_train="pgd",
            adv_eps=args.eps,
            adv_steps=args.pgd_steps,
            adv_mix=args.mix,
            domain=domain,
        ),
    }
    print(
        f"MNIST, {args.samples} images in batches of {args.batch}, eps {args.eps}, adv_mix {args.mix}, "
        f"{args.threads} threads, best of {args.repeats} (interleaved)"
    )
    dtypes = ("float32", "bfloat16")
    runs = {(m, dtype): dataclasses.replace(t, train_dtype=dtype) for m, t in methods.items() for dtype in dtypes}
    print(f"{'model':8} {'method':8} {'ms/step':>8} {'x plain':>8} {'ms/step bf16':>13} {'bf16 speed-up':>14}")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = build_model(name, (1, 28, 28), 10, calibrate_noise(None, 1.0, 0.05, 0.1))
        start = {k: v.clone() for k, v in model.state_dict().items()}
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(args.repeats):
            for run, training in runs.items():
                update = client_update(model, start, x, y, training, seed=0)
                best[run] = min(best[run], update.seconds / update.steps)
        plain = best["plain", "float32"]
        for method in methods:
            seconds, bf16 = best[method, "float32"], best[method, "bfloat16"]
            ratios = f"{seconds / plain:>8.2f} {bf16 * 1e3:>13.1f} {seconds / bf16:>14.2f}"
            print(f"{name:8} {method:8} {seconds * 1e3:>8.1f} {ratios}")


if __name__ == "__main__":
    main()
