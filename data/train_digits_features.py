"""Train the bundled digits feature network: a small CNN classifier on scikit-learn's 8x8 digits.

Its 64-d penultimate layer is the feature space of reflow's digits Fréchet distance / KID, and its logits
check class agreement of class-conditional samples. See ``reflow/eval/features.py``.

Data: ``reflow.folders.data.load_digits_array()`` (float32 (1797, 1, 8, 8) in [-1, 1]) with the labels of
``sklearn.datasets.load_digits``, split 80/20 by ``train_test_split(..., test_size=0.2,
stratify=labels, random_state=0)``. Only the 80% is trained on; the 20% gives the reported test accuracy
(no model selection on it). Augmentation keeps digits recognisable when generated samples are slightly
off: random shifts of up to 1 pixel (pad with background, crop), intensity jitter and additive Gaussian
noise. No flips (a mirrored digit is no digit).

Deterministic given ``--seed`` on the CPU (all randomness from one ``torch.Generator``).

    OMP_NUM_THREADS=1 python data/train_digits_features.py --out data/features/digits-cnn --epochs 40 --seed 0 \\
        --threads 1
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

from reflow.eval.features import DigitsNet, classify, save_feature_net  # noqa: E402
from reflow.folders.data import load_digits_array  # noqa: E402

SPLIT_SEED = 0
TEST_SIZE = 0.2
ROBUST_SEED = 12345  # fixed perturbations of the test split for the robustness figure


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out",
        type=Path,
        default=REPO / "data" / "features" / "digits-cnn",
        help="folder to write (replaced if it exists, only once the new one is complete)",
    )
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (cosine decay to 0)")
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--noise-std", type=float, default=0.1, help="std of additive Gaussian noise in model space")
    p.add_argument("--max-shift", type=int, default=1, help="random shifts of up to this many pixels")
    p.add_argument("--jitter", type=float, default=0.15, help="ink intensity scaled by U(1 - jitter, 1 + jitter)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0:
        p.error("--epochs, --batch-size and --lr must be positive")
    return args


def split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fixed stratified 80/20 split: x_train (N, 1, 8, 8), y_train (N,), x_test, y_test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits_array(), load_digits().target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images, labels, test_size=TEST_SIZE, stratify=labels, random_state=SPLIT_SEED
    )
    return torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_te), torch.from_numpy(y_te)


def augment(x: torch.Tensor, g: torch.Generator, max_shift: int, jitter: float, noise_std: float) -> torch.Tensor:
    """Random shift (background-padded crop), ink-intensity jitter and Gaussian noise of (B, 1, 8, 8) in [-1, 1]."""
    b = len(x)
    if max_shift > 0:
        s = max_shift
        padded = F.pad(x, (s, s, s, s), value=-1.0)[:, 0]  # (B, 8 + 2s, 8 + 2s), background is -1
        dy = torch.randint(0, 2 * s + 1, (b,), generator=g)
        dx = torch.randint(0, 2 * s + 1, (b,), generator=g)
        ar = torch.arange(8)
        rows = (dy[:, None] + ar)[:, :, None]  # (B, 8, 1)
        cols = (dx[:, None] + ar)[:, None, :]  # (B, 1, 8)
        x = padded[torch.arange(b)[:, None, None], rows, cols][:, None]
    if jitter > 0:
        scale = 1.0 + jitter * (2.0 * torch.rand((b, 1, 1, 1), generator=g) - 1.0)
        x = (x + 1.0) * scale - 1.0  # scale the ink (distance from the -1 background)
    if noise_std > 0:
        x = x + noise_std * torch.randn(x.shape, generator=g)
    return x


def accuracy(net: DigitsNet, x: torch.Tensor, y: torch.Tensor) -> float:
    return int((torch.from_numpy(classify(net, x)) == y).sum()) / len(y)


def train(args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor) -> tuple[DigitsNet, float]:
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    net = DigitsNet()
    steps_per_epoch = -(-len(x) // args.batch_size)
    total = args.epochs * steps_per_epoch
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=total, pct_start=0.1)
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        net.train()
        perm = torch.randperm(len(x), generator=g)
        loss_sum, correct = 0.0, 0
        for i in range(0, len(x), args.batch_size):
            idx = perm[i : i + args.batch_size]
            xb = augment(x[idx], g, args.max_shift, args.jitter, args.noise_std)
            logits = net(xb)
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == y[idx]).sum())
        if epoch % 5 == 0 or epoch == args.epochs:
            print(
                f"epoch {epoch}/{args.epochs}  loss {loss_sum / len(x):.4f}  train acc (augmented) "
                f"{correct / len(x):.4f}  {time.perf_counter() - start:.1f} s",
                flush=True,
            )
    return net.eval(), time.perf_counter() - start


def model_card(args: argparse.Namespace, info: dict, n_params: int, weights_bytes: int) -> str:
    return "\n".join(
        [
            "# digits-cnn: reflow's digits feature network",
            "",
            "A small CNN classifier on scikit-learn's 1797 handwritten 8x8 digits (`load_digits`), inputs",
            "(N, 1, 8, 8) in model space [-1, 1] (pixel = value / 8 - 1 from sklearn's 0..16 scale, as",
            "returned by `reflow.folders.data.load_digits_array()`).",
            "",
            "- Its 64-d penultimate layer (`DigitsNet.features`) is the feature space of reflow's digits",
            "  Fréchet distance and KID on generated digits.",
            "- Its logits (`DigitsNet.forward`, `reflow.eval.features.classify`) check class agreement of",
            "  class-conditional samples.",
            "",
            "**This is not an Inception network.** Fréchet distances in this feature space are not comparable",
            "to FID figures in papers; compare them only with each other (same network, same sample counts).",
            "",
            "```python",
            "from reflow.eval.features import bundled_digits_net, classify, extract_features",
            "net = bundled_digits_net()  # or load_feature_net('data/features/digits-cnn')",
            "feats = extract_features(net, images)  # images (N, 1, 8, 8) in [-1, 1] -> float64 (N, 64)",
            "labels = classify(net, images)  # int64 (N,)",
            "```",
            "",
            "## Architecture",
            "",
            "`DigitsNet(channels=(32, 64), feature_dim=64, num_classes=10)`, all convolutions 3x3 with padding 1,",
            "GELU activations:",
            "",
            "```",
            "conv(1 -> 32) - GELU - conv(32 -> 64) - GELU - maxpool 2     8x8 -> 4x4",
            "conv(64 -> 64) - GELU - flatten (1024)",
            "linear(1024 -> 64) - GELU                                    <- the 64-d features",
            "linear(64 -> 10)                                             <- logits",
            "```",
            "",
            f"{n_params:,} parameters; `model.safetensors` is {weights_bytes / 1024:.0f} KiB (float32).",
            "`config.json` holds the constructor arguments and, under `info`, how the weights were made.",
            "",
            "## Training",
            "",
            "```",
            info["command"],
            "```",
            "",
            f"- Split: `sklearn.model_selection.train_test_split(images, labels, test_size={TEST_SIZE}, "
            f"stratify=labels, random_state={SPLIT_SEED})`:",
            f"  {info['train_size']} training and {info['test_size']} test digits. Only the training part is",
            "  trained on; the test split was not used to pick anything.",
            f"- Augmentation: random shifts of up to {args.max_shift} pixel (background-padded crop), ink intensity",
            f"  scaled by U({1 - args.jitter:g}, {1 + args.jitter:g}), additive Gaussian noise (std "
            f"{args.noise_std:g}); no flips.",
            f"- AdamW, one-cycle schedule with peak lr {args.lr:g}, weight decay {args.weight_decay:g}, "
            f"batch size {args.batch_size},",
            f"  {args.epochs} epochs, seed {args.seed}; deterministic on the CPU.",
            f"- {info['train_seconds']:.0f} s of training with {args.threads} torch thread(s) on "
            f"{platform.processor() or platform.machine()}, torch {info['torch_version']}.",
            "",
            "## Accuracy",
            "",
            "| split | digits | accuracy |",
            "|---|---:|---:|",
            f"| test (held out, clean) | {info['test_size']} | {info['test_accuracy']:.4f} |",
            f"| test, shifted <= 1 px + noise std 0.1 (seed {ROBUST_SEED}) | {info['test_size']} | "
            f"{info['test_accuracy_perturbed']:.4f} |",
            f"| train (clean) | {info['train_size']} | {info['train_accuracy']:.4f} |",
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

    net, seconds = train(args, x_tr, y_tr)
    n_params = sum(p.numel() for p in net.parameters())
    test_acc = accuracy(net, x_te, y_te)
    train_acc = accuracy(net, x_tr, y_tr)
    g = torch.Generator().manual_seed(ROBUST_SEED)
    perturbed_acc = accuracy(net, augment(x_te, g, max_shift=1, jitter=0.0, noise_std=0.1), y_te)
    print(
        f"test accuracy {test_acc:.4f} (perturbed {perturbed_acc:.4f}), train accuracy {train_acc:.4f}, "
        f"{n_params:,} parameters, {seconds:.1f} s",
        flush=True,
    )

    info = {
        "test_accuracy": test_acc,
        "test_accuracy_perturbed": perturbed_acc,
        "train_accuracy": train_acc,
        "train_size": len(x_tr),
        "test_size": len(x_te),
        "split": f"train_test_split(test_size={TEST_SIZE}, stratify=labels, random_state={SPLIT_SEED})",
        "split_seed": SPLIT_SEED,
        "seed": args.seed,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "augmentation": {"max_shift": args.max_shift, "jitter": args.jitter, "noise_std": args.noise_std},
        "params": n_params,
        "command": command,
        "train_seconds": round(seconds, 2),
        "threads": args.threads,
        "torch_version": torch.__version__,
    }
    from safetensors.torch import save as safetensors_bytes

    weights_bytes = len(safetensors_bytes({k: v.contiguous() for k, v in net.state_dict().items()}))
    out = save_feature_net(
        net, args.out.resolve(), info, extra_files={"README.md": model_card(args, info, n_params, weights_bytes)}
    )
    print(f"saved {out}", flush=True)


if __name__ == "__main__":
    main()
