"""Train the bundled digits perceptual network: the feature network of ``--loss lpips`` / ``lpips_huber`` on digits.

A small ReLU CNN (three 3x3 convolutions, 32 / 64 / 96 channels, the second with stride 2; a tap after each ReLU)
is trained as a digit classifier through a throw-away linear head on its last tap; the head is then dropped and
the convolutions are saved as a :class:`reflow.models.perceptual.PerceptualNet` (channel weights 1, as the
``lpips`` package's ``lpips=False``; not calibrated). LPIPS's finding (Zhang et al. 2018) is that the
features of a network trained to classify are perceptual; this is that recipe at 8x8.

It is independent of ``data/features/digits-cnn``, the network behind ``reflow eval``'s Fréchet distance: another
architecture (ReLU, strided conv, no pooling, no linear feature layer), another split (``random_state=1``), seed,
optimiser (SGD with Nesterov momentum), loss (label smoothing) and augmentation, trained from scratch; nothing of
that network is imported or copied. A student distilled with this loss is judged in a feature space it never saw.

Data: ``reflow.folders.data.load_digits_array()`` (float32 (1797, 1, 8, 8) in [-1, 1]) with the labels of
``sklearn.datasets.load_digits``, split 80/20 by ``train_test_split(..., test_size=0.2, stratify=labels,
random_state=1)``; only the 80% is trained on, the 20% gives the reported test accuracy. Augmentation: random
shifts of up to 1 pixel, ink intensity jitter, strong additive Gaussian noise (std 0.3, so the features learn to
ignore noise). No blur: the loss exists to penalise the blur pixel losses reward, so the network is not taught to
ignore it.

Deterministic given ``--seed`` on the CPU (all randomness from one ``torch.Generator``).

    OMP_NUM_THREADS=1 python data/train_digits_perceptual.py --out data/perceptual/digits-lpips --seed 1 --threads 1
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from reflow.core.perceptual import perceptual_distance  # noqa: E402
from reflow.folders.data import load_digits_array  # noqa: E402
from reflow.models.perceptual import PerceptualNet, save_perceptual  # noqa: E402

SPLIT_SEED = 1  # digits-cnn (the FD network) uses random_state=0
TEST_SIZE = 0.2
PROBE_SEED = 4321  # fixed perturbations of the test split for the sanity table
ARCHITECTURE = {
    "in_channels": 1,
    "layers": [
        {"conv": [32, 3, 1, 1]},
        "relu",
        "tap",  # 32 x 8 x 8
        {"conv": [64, 3, 2, 1]},
        "relu",
        "tap",  # 64 x 4 x 4
        {"conv": [96, 3, 1, 1]},
        "relu",
        "tap",  # 96 x 4 x 4
    ],
    "calibrated": False,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out",
        type=Path,
        default=REPO / "data" / "perceptual" / "digits-lpips",
        help="folder to write (replaced if it exists, only once the new one is complete)",
    )
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05, help="peak SGD learning rate (cosine decay to 0)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--noise-std", type=float, default=0.3, help="std of additive Gaussian noise in model space")
    p.add_argument("--max-shift", type=int, default=1, help="random shifts of up to this many pixels")
    p.add_argument("--jitter", type=float, default=0.2, help="ink intensity scaled by U(1 - jitter, 1 + jitter)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        p.error("--epochs, --batch-size and --lr must be positive")
    return args


def split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stratified 80/20 split (random_state=SPLIT_SEED): x_train (N, 1, 8, 8), y_train (N,), x_test, y_test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits_array(), load_digits().target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=TEST_SIZE, stratify=labels, random_state=SPLIT_SEED
    )
    return torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te)


def shift(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, s: int) -> torch.Tensor:
    """Each image of (B, 1, 8, 8) moved by (dy - s, dx - s) pixels, the background (-1) filling in."""
    padded = F.pad(x, (s, s, s, s), value=-1.0)[:, 0]
    ar = torch.arange(8)
    rows = (dy[:, None] + ar)[:, :, None]
    cols = (dx[:, None] + ar)[:, None, :]
    return padded[torch.arange(len(x))[:, None, None], rows, cols][:, None]


def blur(x: torch.Tensor) -> torch.Tensor:
    """A 3x3 binomial blur ([1, 2, 1] / 4 in each direction) of (B, 1, 8, 8), background-padded."""
    k = torch.tensor([1.0, 2.0, 1.0]) / 4
    return F.conv2d(F.pad(x, (1, 1, 1, 1), value=-1.0), (k[:, None] * k[None, :])[None, None])


def augment(x: torch.Tensor, g: torch.Generator, args: argparse.Namespace) -> torch.Tensor:
    """Random shift, ink-intensity jitter and Gaussian noise of (B, 1, 8, 8) in [-1, 1]."""
    b, s = len(x), args.max_shift
    if s > 0:
        x = shift(x, torch.randint(0, 2 * s + 1, (b,), generator=g), torch.randint(0, 2 * s + 1, (b,), generator=g), s)
    scale = 1.0 + args.jitter * (2.0 * torch.rand((b, 1, 1, 1), generator=g) - 1.0)
    x = (x + 1.0) * scale - 1.0  # scale the ink (distance from the -1 background)
    return x + args.noise_std * torch.randn(x.shape, generator=g)


def logits(net: PerceptualNet, head: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Class logits of the throw-away head on the last tap (B, 96, 4, 4), flattened."""
    return head(net(x)[-1].flatten(1))


def train(args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor) -> tuple[PerceptualNet, torch.nn.Linear]:
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    net, head = PerceptualNet(ARCHITECTURE), torch.nn.Linear(96 * 4 * 4, 10)
    params = [*net.parameters(), *head.parameters()]
    opt = torch.optim.SGD(params, lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    total = args.epochs * -(-len(x) // args.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(len(x), generator=g)
        loss_sum, correct = 0.0, 0
        for i in range(0, len(x), args.batch_size):
            idx = perm[i : i + args.batch_size]
            out = logits(net, head, augment(x[idx], g, args))
            loss = F.cross_entropy(out, y[idx], label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((out.argmax(1) == y[idx]).sum())
        if epoch % 5 == 0 or epoch == args.epochs:
            print(
                f"epoch {epoch}/{args.epochs}  loss {loss_sum / len(x):.4f}  train acc (augmented) "
                f"{correct / len(x):.4f}  {time.perf_counter() - start:.1f} s",
                flush=True,
            )
    return net.eval(), head.eval()


@torch.no_grad()
def accuracy(net: PerceptualNet, head: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    return int((logits(net, head, x).argmax(1) == y).sum()) / len(y)


@torch.no_grad()
def sanity(net: PerceptualNet, x: torch.Tensor, y: torch.Tensor) -> dict[str, dict[str, float]]:
    """Mean LPIPS and pixel MSE between each test digit and a perturbed copy of it, per perturbation: the
    perceptual loss should rank blur, shifts and other digits far above faint noise, unlike the pixel MSE."""
    g = torch.Generator().manual_seed(PROBE_SEED)
    one = torch.ones(len(x), dtype=torch.long)
    same = torch.stack([next(j for j in torch.nonzero(y == y[i]).flatten() if j != i) for i in range(len(y))])
    other = torch.stack([torch.nonzero(y == (y[i] + 1) % 10).flatten()[0] for i in range(len(y))])
    blurred = blur(x)
    blur_std = (x - blurred).pow(2).mean().sqrt().item()
    probes = {
        "noise std 0.02": x + 0.02 * torch.randn(x.shape, generator=g),
        "noise std 0.1": x + 0.1 * torch.randn(x.shape, generator=g),
        "3x3 binomial blur": blurred,
        f"noise std {blur_std:.2f} (the blur's pixel MSE)": x + blur_std * torch.randn(x.shape, generator=g),
        "shift 1 px right": shift(x, one, one - 1, 1),
        "another digit, same class": x[same],
        "another digit, next class": x[other],
    }
    return {
        name: {"lpips": perceptual_distance(net, x, p).mean().item(), "pixel_mse": (x - p).pow(2).mean().item()}
        for name, p in probes.items()
    }


def model_card(args: argparse.Namespace, info: dict) -> str:
    rows = [f"| {name} | {v['lpips']:.3g} | {v['pixel_mse']:.3g} |" for name, v in info["sanity"].items()]
    lpips = [v["lpips"] for v in info["sanity"].values()]
    blur_ratio = lpips[2] / lpips[3]  # the blur against noise of the blur's pixel MSE
    return "\n".join(
        [
            "# digits-lpips: reflow's digits perceptual network",
            "",
            "The feature network of `--loss lpips` / `--loss lpips_huber` on scikit-learn's 8x8 digits (inputs",
            "(N, 1, 8, 8) in model space [-1, 1], as `reflow.folders.data.load_digits_array()` returns them):",
            "",
            "```bash",
            "reflow distill --pairs PAIRS --init MODEL --out STUDENT --loss lpips_huber \\",
            "    --perceptual-weights data/perceptual/digits-lpips",
            "```",
            "",
            "```python",
            "from reflow.core.perceptual import perceptual_distance",
            "from reflow.models.perceptual import load_perceptual",
            "net = load_perceptual('data/perceptual/digits-lpips')  # frozen, eval mode",
            "d = perceptual_distance(net, x, y)  # (B,) LPIPS distances of (B, 1, 8, 8) images",
            "```",
            "",
            "## What it is, and what it is not",
            "",
            "LPIPS (Zhang et al. 2018) compares images in the unit-normalised feature maps of a network trained to",
            "classify; its features are perceptual because recognising a digit needs strokes and their positions,",
            "not exact pixel values. This is that recipe at 8x8: a small ReLU CNN trained as a digit classifier,",
            "its classification head dropped, a tap after every ReLU, channel weights 1 (`calibrated: false`, the sum",
            "over channels as the `lpips` package's `lpips=False`:",
            "there are no human similarity judgements of 8x8 digits to calibrate on).",
            "",
            "**It is independent of `data/features/digits-cnn`**, the network behind `reflow eval`'s Fréchet",
            "distance: a loss that optimised the metric's own features would prove nothing. Different",
            "architecture (ReLU, a strided convolution, no pooling, no linear feature layer vs GELU, max-pooling and a",
            f"64-d linear layer), different split (`random_state={SPLIT_SEED}` vs 0), seed ({args.seed} vs 0),",
            "optimiser (SGD with Nesterov momentum vs AdamW), loss (label smoothing) and augmentation; trained from",
            "scratch by its own script, which imports nothing of that network.",
            "",
            "## Architecture",
            "",
            "```",
            "conv(1 -> 32, 3x3, pad 1) - ReLU - tap              32 x 8 x 8",
            "conv(32 -> 64, 3x3, stride 2, pad 1) - ReLU - tap   64 x 4 x 4",
            "conv(64 -> 96, 3x3, pad 1) - ReLU - tap             96 x 4 x 4",
            "```",
            "",
            f"{info['params']:,} parameters (float32, `model.safetensors`); `config.json` is the `PerceptualNet`",
            "description and, under `info`, how the weights were made. During training a linear head",
            "(1536 -> 10) on the last tap classified the digits; it is not saved.",
            "",
            "## Training",
            "",
            "```bash",
            f"OMP_NUM_THREADS={args.threads} {info['command']}",
            "```",
            "",
            f"- Split: `train_test_split(images, labels, test_size={TEST_SIZE}, stratify=labels, "
            f"random_state={SPLIT_SEED})`:",
            f"  {info['train_size']} training and {info['test_size']} test digits; only the training part is trained",
            "  on, the test split was used for nothing but the figures below.",
            f"- Augmentation: random shifts of up to {args.max_shift} pixel (background-padded), ink intensity scaled",
            f"  by U({1 - args.jitter:g}, {1 + args.jitter:g}), Gaussian noise (std {args.noise_std:g}). No blur",
            "  and no flips: the loss exists to penalise the blur that pixel losses reward, so the network is not",
            "  taught to ignore it. The noise is strong on purpose: features taught to ignore noise tell a blur from",
            "  noise of the same pixel error (with std 0.05 the two cost about the same; see the last table).",
            f"- Cross-entropy with label smoothing {args.label_smoothing:g}; SGD, Nesterov momentum 0.9, peak lr",
            f"  {args.lr:g} with cosine decay, weight decay {args.weight_decay:g}, batch size {args.batch_size},",
            f"  {args.epochs} epochs, seed {args.seed}; deterministic on the CPU.",
            f"- {info['train_seconds']:.1f} s wall ({info['train_cpu_seconds']:.1f} s CPU) of training with "
            f"{args.threads} torch thread(s) on {platform.processor() or platform.machine()}, torch "
            f"{info['torch_version']}.",
            "",
            "## Accuracy of the classifier it was cut from",
            "",
            "| split | digits | accuracy |",
            "|---|---:|---:|",
            f"| test (held out) | {info['test_size']} | {info['test_accuracy']:.4f} |",
            f"| train | {info['train_size']} | {info['train_accuracy']:.4f} |",
            "",
            "## Is it perceptual?",
            "",
            f"Mean distance between each of the {info['test_size']} test digits and a changed copy of it "
            f"(seed {PROBE_SEED}):",
            "",
            "| change | LPIPS (this network) | pixel MSE |",
            "|---|---:|---:|",
            *rows,
            "",
            f"Faint noise is nearly free; a blur costs {blur_ratio:.2f}x as much as Gaussian noise of the same pixel",
            "MSE (the pixel loss cannot tell them apart), and a one-pixel shift or another digit more again. The",
            "network was trained to ignore noise and never shown blur: trained with noise std 0.05 instead, it",
            "scores the two about the same.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    command = "python " + shlex.join([os.path.relpath(__file__, Path.cwd()), *(sys.argv[1:] if argv is None else argv)])
    x_tr, y_tr, x_te, y_te = split()
    print(f"{len(x_tr)} training digits, {len(x_te)} test digits", flush=True)
    wall, cpu = time.perf_counter(), time.process_time()
    net, head = train(args, x_tr, y_tr)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    info = {
        "purpose": "the feature network of --loss lpips / lpips_huber on 8x8 digits",
        "independent_of": "data/features/digits-cnn (reflow eval's FD network): own architecture, split, seed, weights",
        "test_accuracy": accuracy(net, head, x_te, y_te),
        "train_accuracy": accuracy(net, head, x_tr, y_tr),
        "train_size": len(x_tr),
        "test_size": len(x_te),
        "split": f"train_test_split(test_size={TEST_SIZE}, stratify=labels, random_state={SPLIT_SEED})",
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "label_smoothing": args.label_smoothing,
        "augmentation": {"max_shift": args.max_shift, "jitter": args.jitter, "noise_std": args.noise_std},
        "params": sum(p.numel() for p in net.parameters()),
        "command": command,
        "train_seconds": round(wall, 2),
        "train_cpu_seconds": round(cpu, 2),
        "threads": args.threads,
        "torch_version": torch.__version__,
        "sanity": sanity(net, x_te, y_te),
    }
    print(
        f"test accuracy {info['test_accuracy']:.4f}, train accuracy {info['train_accuracy']:.4f}, "
        f"{info['params']:,} parameters, {wall:.1f} s wall, {cpu:.1f} s CPU",
        flush=True,
    )
    for name, v in info["sanity"].items():
        print(f"  {name:42s} lpips {v['lpips']:.3g}  pixel mse {v['pixel_mse']:.3g}", flush=True)
    out = save_perceptual(net, args.out.resolve(), info, extra_files={"README.md": model_card(args, info)})
    print(f"saved {out}", flush=True)


if __name__ == "__main__":
    main()
