"""Why the noisy models stop learning under SGD with momentum, measured.

For the CNN, noise-only and DiPSeN on MNIST (centralised, batch 32, one thread) this prints:

1. at initialisation, per layer: the mean norm of one mini-batch's gradient against the norm of the
   mean gradient over 32 mini-batches (their ratio is large when the gradient is mostly noise), and
   the RMS of block 1's output split into signal and noise after the post-noise gain;
2. a short training with SGD (lr 0.05, momentum 0.9) and with Adam (lr 0.001), with the post-noise
   gain of today (``post_noise_gain``) and the constant 4 used before: test accuracy on 2,000
   images (one draw), and the share of block 2's ReLU units (and the CNN's hidden ReLU units) that
   still fire on a test batch.

    python benchmarks/training_diagnostics.py [--steps 600] [--gradient-batches 32] [--test-images 2000] [--smoke]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from dipsen.data import load_dataset
from dipsen.models import build_model, calibrate_noise
from dipsen.models.net import post_noise_gain

# --smoke: 3 training steps, gradients of 4 mini-batches, 200 test images
SMOKE = {"steps": 3, "gradient_batches": 4, "test_images": 200}

torch.set_num_threads(1)
SIGMA = calibrate_noise().sigma  # PixelDP's default guarantee: epsilon 1, delta 0.05, L 0.1


def make(name: str, gain: float | None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(name, (1, 28, 28), 10, calibrate_noise(SIGMA))
    if gain is not None and model.noise is not None:
        model.block2[0].input_gain = gain  # the post-noise gain, applied by block 2's convolution
    return model


def gradient_noise(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batches: int = 32) -> dict[str, float]:
    """Per layer: mean ||g_batch|| / ||mean g_batch|| over ``batches`` mini-batches of 32."""
    model.train()
    grads: dict[str, list[torch.Tensor]] = {}
    for i in range(batches):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i * 32 : (i + 1) * 32]), y[i * 32 : (i + 1) * 32]).backward()
        for name, p in model.named_parameters():
            if name.endswith("weight"):
                grads.setdefault(name.rsplit(".", 1)[0], []).append(p.grad.detach().clone())
    return {k: float(torch.stack([g.norm() for g in v]).mean() / torch.stack(v).mean(0).norm()) for k, v in grads.items()}


def alive(model: nn.Module, x: torch.Tensor) -> tuple[float, float | None]:
    """Share of block 2's (and the ReLU hidden layer's) units that fire on at least one input of ``x``."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [model.block2[1].register_forward_hook(lambda m, i, o: seen.__setitem__("block2", o))]
    if isinstance(model.hidden, nn.Sequential):
        hooks.append(model.hidden[1].register_forward_hook(lambda m, i, o: seen.__setitem__("hidden", o)))
    with torch.no_grad():
        model.eval()
        model(x)
    for hook in hooks:
        hook.remove()
    block2 = float((seen["block2"] > 0).flatten(2).any(2).any(0).float().mean())
    hidden = float((seen["hidden"] > 0).any(0).float().mean()) if "hidden" in seen else None
    return block2, hidden


def train(model: nn.Module, optimizer: str, x, y, steps: int) -> None:
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))[: steps * 32]
    model.train()
    for batch in order.split(32):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--gradient-batches", type=int, default=32, help="mini-batches of 32 in the gradient-noise ratio")
    parser.add_argument("--test-images", type=int, default=2000, help="test images the accuracy is measured on")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check the script runs end to end (figures meaningless)")
    args = parser.parse_args()
    if args.smoke:  # the smoke sizes replace the defaults; flags given still win
        parser.set_defaults(**SMOKE)
        args = parser.parse_args()
    data = load_dataset("mnist")
    x, y = torch.as_tensor(data.x_train), torch.as_tensor(data.y_train)
    xt, yt = torch.as_tensor(data.x_test[: args.test_images]), torch.as_tensor(data.y_test[: args.test_images])
    print(f"sigma {SIGMA:.4f}: post-noise gain {post_noise_gain(SIGMA):.3f} (was 4); steps {args.steps}, batch 32, 1 thread\n")

    print("1. at initialisation: mean ||g_batch|| / ||mean g||, per layer (larger = noisier gradient)")
    for name in ("cnn", "noise-only", "dipsen"):
        model = make(name, None)
        ratios = gradient_noise(model, x, y, args.gradient_batches)
        line = "  ".join(f"{k} {v:5.2f}" for k, v in ratios.items())
        if model.noise is not None:
            with torch.no_grad():
                signal = model.block1(x[:256])
            gain = model.block2[0].input_gain
            rms = gain * signal.pow(2).mean().sqrt()
            line += f"  | block-1 RMS after gain: signal {rms:.3f}, noise {gain * model.noise.std:.3f}"
        print(f"  {name:<10} {line}")

    print("\n2. short training: test accuracy (one draw), block-2 ReLU units alive, hidden ReLU units alive")
    for name in ("cnn", "noise-only", "dipsen"):
        for optimizer in ("sgd", "adam"):
            gains: tuple[float | None, ...] = (None,) if name == "cnn" else (None, 4.0)
            for gain in gains:
                model = make(name, gain)
                start = time.perf_counter()
                train(model, optimizer, x, y, args.steps)
                with torch.no_grad():
                    torch.manual_seed(0)
                    model.eval()
                    accuracy = float((model(xt).argmax(1) == yt).float().mean())
                block2, hidden = alive(model, xt[:500])
                label = "" if model.noise is None else f"gain {model.block2[0].input_gain:.2f}"
                hidden_text = "-" if hidden is None else f"{hidden:.2f}"
                print(
                    f"  {name:<10} {optimizer:<4} {label:<10} accuracy {accuracy:.3f}  block 2 alive {block2:.2f}  "
                    f"hidden alive {hidden_text}  ({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
    print(f"\n(numpy {np.__version__}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
