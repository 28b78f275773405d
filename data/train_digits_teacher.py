"""Train the bundled teacher: a small DDPM on scikit-learn's 1797 8x8 digits, in stock diffusers.

The model is diffusers' own ``UNet2DModel`` trained with ``DDPMScheduler`` in the configuration of the
public ``google/ddpm-*`` checkpoints (1000 steps, linear betas 1e-4..0.02, epsilon prediction,
clip_sample=True). The EMA weights are saved as a ``DDPMPipeline`` folder (safetensors), so
``DDPMPipeline.from_pretrained(OUT)`` and reflow's ``DiffusersTeacher(OUT)`` both load it.

After training the script measures deterministic DDIM (eta = 0) sample quality at 50, 10, 4, 2 and
1 steps: W2 between 1797 samples (noise ``row_noise(seed=1, range(1797), (1, 8, 8))``) and all 1797
real digits, plus a real-vs-real floor (two disjoint random halves of the digits). The numbers and how
the model was trained go into ``OUT/README.md`` (a model card) and ``OUT/quality.json``.

Pixels are in [-1, 1], NCHW. Digits are not flipped or otherwise augmented (a mirrored 2 is no digit).

    nice -n 10 python data/train_digits_teacher.py --out data/teachers/digits-ddpm \
        --steps 6000 --batch-size 64 --lr 1e-3 --seed 0 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a plain script from a checkout
    sys.path.insert(0, str(REPO))

from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402
from diffusers.optimization import get_cosine_schedule_with_warmup  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402

from reflow.core.noise import row_noise  # noqa: E402
from reflow.eval.metrics import w2  # noqa: E402
from reflow.folders.data import load_digits_array  # noqa: E402
from reflow.teachers.ddpm import DiffusersTeacher  # noqa: E402

EVAL_SEED = 1
EVAL_STEPS = (50, 10, 4, 2, 1)
FLOOR_SEED = 0


def add_training_args(p: argparse.ArgumentParser, out: Path) -> None:
    """The training options both digits teacher scripts share (this one and train_digits_cond_teacher.py)."""
    p.add_argument("--out", type=Path, default=out, help="pipeline folder to write (replaced if it exists)")
    p.add_argument("--steps", type=int, default=6000, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps before the cosine decay")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema-max-decay", type=float, default=0.999)
    p.add_argument("--channels", type=str, default="32,64", help="UNet block_out_channels, comma-separated")
    p.add_argument("--layers-per-block", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for this small UNet)")
    p.add_argument("--log-every", type=int, default=250)
    p.add_argument("--skip-eval", action="store_true", help="save the pipeline only (no quality table)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_training_args(p, REPO / "data" / "teachers" / "digits-ddpm")
    p.add_argument("--eval-batch", type=int, default=1797, help="samples per teacher call during evaluation")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.lr <= 0:
        p.error("--steps, --batch-size and --lr must be positive")
    return args


def make_unet(channels: tuple[int, ...], layers_per_block: int, num_class_embeds: int | None = None) -> UNet2DModel:
    # 8x8 -> 4x4 (-> 2x2 ...): plain ResNet blocks at full resolution, self-attention below it.
    # num_class_embeds: a learned class embedding added to the time embedding (class-conditional teacher).
    n = len(channels)
    down = ("DownBlock2D",) + ("AttnDownBlock2D",) * (n - 1)
    up = ("AttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=layers_per_block,
        block_out_channels=channels,
        down_block_types=down,
        up_block_types=up,
        attention_head_dim=32,
        norm_num_groups=32,
        **({"num_class_embeds": num_class_embeds} if num_class_embeds is not None else {}),
    )


def make_scheduler() -> DDPMScheduler:
    # The configuration of the public google/ddpm-* checkpoints.
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=True,
        variance_type="fixed_small",
    )


def train(
    args: argparse.Namespace,
    data: torch.Tensor,
    labels: torch.Tensor | None = None,
    num_class_embeds: int | None = None,
    null_class: int | None = None,
    label_dropout: float = 0.0,
) -> tuple[UNet2DModel, DDPMScheduler, dict]:
    """Train on ``data``; with ``labels`` (one int per row) a class-conditional UNet with ``num_class_embeds``
    classes, each batch label replaced by ``null_class`` with probability ``label_dropout`` (for CFG)."""
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    channels = tuple(int(c) for c in args.channels.split(","))
    unet = make_unet(channels, args.layers_per_block, num_class_embeds if labels is not None else None)
    scheduler = make_scheduler()
    n_params = sum(p.numel() for p in unet.parameters())
    classes = f" num_class_embeds={num_class_embeds}" if labels is not None else ""
    print(
        f"UNet2DModel block_out_channels={channels} layers_per_block={args.layers_per_block}{classes}: "
        f"{n_params:,} parameters",
        flush=True,
    )

    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    lr_schedule = get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=args.warmup, num_training_steps=args.steps
    )
    # EMA warm-up (decay 1 - (1 + step)^-power, capped at --ema-max-decay) follows the model early on.
    ema = EMAModel(unet.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, power=0.75)

    n = len(data)
    perm, pos = torch.randperm(n, generator=g), 0
    unet.train()
    start = time.perf_counter()
    running = 0.0
    for step in range(1, args.steps + 1):
        # Epoch-wise shuffling without replacement; no augmentation.
        if pos + args.batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos : pos + args.batch_size]
        x1 = data[idx]
        pos += args.batch_size
        noise = torch.randn(x1.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x1),), generator=g)
        xt = scheduler.add_noise(x1, noise, t)
        cond = {}
        if labels is not None:  # conditional: drop labels to the null class at random (classifier-free guidance)
            y = labels[idx]
            if label_dropout > 0:
                y = torch.where(torch.rand(len(y), generator=g) < label_dropout, null_class, y)
            cond["class_labels"] = y
        loss = F.mse_loss(unet(xt, t, **cond).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        ema.step(unet.parameters())
        running += loss.item()
        if step % args.log_every == 0 or step == args.steps:
            k = args.log_every if step % args.log_every == 0 else step % args.log_every
            elapsed = time.perf_counter() - start
            print(
                f"step {step}/{args.steps}  loss {running / k:.4f}  lr {lr_schedule.get_last_lr()[0]:.2e}  "
                f"ema decay {ema.cur_decay_value:.4f}  {elapsed / 60:.1f} min",
                flush=True,
            )
            running = 0.0
    train_seconds = time.perf_counter() - start

    ema_unet = copy.deepcopy(unet)
    ema.copy_to(ema_unet.parameters())
    ema_unet.eval()
    info = {
        "params": n_params,
        "block_out_channels": list(channels),
        "layers_per_block": args.layers_per_block,
        **({"num_class_embeds": num_class_embeds} if labels is not None else {}),
        "train_seconds": train_seconds,
        "step_seconds": train_seconds / args.steps,
    }
    return ema_unet, scheduler, info


def evaluate(folder: Path, data: torch.Tensor, eval_batch: int) -> dict:
    """W2 of DDIM (eta = 0) samples against all real digits, and the real-vs-real half-split floor."""
    n = len(data)
    z0 = row_noise(EVAL_SEED, range(n), (1, 8, 8))
    results = {
        "num_samples": n,
        "num_reference": n,
        "noise": f"row_noise(seed={EVAL_SEED}, range({n}), (1, 8, 8))",
        "ddim": {},
    }
    for nfe in EVAL_STEPS:
        teacher = DiffusersTeacher(folder, nfe=nfe, solver="ddim")
        t0 = time.perf_counter()
        samples = torch.cat([teacher(z0[i : i + eval_batch]) for i in range(0, n, eval_batch)])
        seconds = time.perf_counter() - t0
        d = w2(samples, data)
        outside = float((samples.abs() > 1.0).float().mean())
        results["ddim"][str(nfe)] = {"w2": d, "sample_seconds": seconds, "frac_outside_unit": outside}
        print(f"DDIM-{nfe}: W2 {d:.4f}  ({n} samples vs {n} digits, sampling {seconds:.1f} s)", flush=True)
    g = torch.Generator().manual_seed(FLOOR_SEED)
    perm = torch.randperm(n, generator=g)
    half = n // 2
    a, b = data[perm[:half]], data[perm[half : 2 * half]]
    floor = w2(a, b)
    results["real_vs_real_half"] = {"w2": floor, "sizes": [half, half], "seed": FLOOR_SEED}
    print(f"real vs real (two disjoint halves, {half} vs {half}): W2 {floor:.4f}", flush=True)
    return results


def training_lines(args: argparse.Namespace, info: dict, weights_kib: float) -> list[str]:
    """The model card's lines on how the network was trained (shared with train_digits_cond_teacher.py)."""
    return [
        "- Noise schedule: `DDPMScheduler`, 1000 train steps, linear betas 1e-4 .. 0.02, epsilon prediction,",
        "  clip_sample=True, fixed_small variance (the config of the public `google/ddpm-*` checkpoints).",
        "- Objective: MSE on the noise, timesteps uniform in 0..999; data shuffled per epoch, no augmentation",
        "  (no flips: mirrored digits are not digits).",
        f"- Optimizer: AdamW, peak lr {args.lr:g}, weight decay {args.weight_decay:g}, grad-norm clip 1.0, "
        f"{args.warmup} warmup steps then cosine decay to 0 (`diffusers.optimization`).",
        f"- {args.steps} steps at batch size {args.batch_size} "
        f"(about {args.steps * args.batch_size / 1797:.0f} epochs), seed {args.seed}.",
        f"- EMA (`diffusers.training_utils.EMAModel`): warm-up decay 1 - (1 + step)^-0.75, capped at "
        f"{args.ema_max_decay:g}; the saved UNet is the EMA.",
        f"- Wall clock: {info['train_seconds'] / 60:.1f} CPU minutes of training "
        f"({info['step_seconds'] * 1000:.0f} ms/step) with {args.threads} torch threads on "
        f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, shared), "
        f"torch {torch.__version__}, diffusers {__import__('diffusers').__version__}.",
        f"- Weights: {weights_kib:.0f} KiB (float32 safetensors).",
    ]


def write_quality(tmp: Path, args: argparse.Namespace, info: dict, quality: dict | None) -> None:
    """quality.json: how the teacher was trained and what it measured (nothing when evaluation was skipped)."""
    if quality is not None:
        (tmp / "quality.json").write_text(
            json.dumps(
                {
                    "training": info,
                    "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                    **quality,
                },
                indent=2,
            )
            + "\n"
        )


def swap_into_place(tmp: Path, out: Path) -> None:
    """Swap the finished folder into place; an interrupted run leaves the old one intact."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old)
    print(f"saved {out}", flush=True)


def model_card(args: argparse.Namespace, command: str, info: dict, quality: dict | None, folder: Path) -> str:
    weights_kib = sum(f.stat().st_size for f in folder.rglob("*.safetensors")) / 1024

    def ratio(k: int) -> float:
        return quality["ddim"][str(k)]["w2"] / quality["ddim"]["50"]["w2"]

    lines = [
        "# digits-ddpm: the bundled DDPM teacher",
        "",
        "A small unconditional DDPM on scikit-learn's 1797 handwritten 8x8 digits (`load_digits`),",
        "pixels scaled to [-1, 1] (0..16 -> -1..1), shape (1, 8, 8). A stock diffusers `DDPMPipeline`",
        "(`UNet2DModel` + `DDPMScheduler`), EMA weights, safetensors. It is the teacher that reflow",
        "distills on digits.",
        "",
        "```python",
        "from diffusers import DDIMScheduler, DDPMPipeline",
        'pipe = DDPMPipeline.from_pretrained("data/teachers/digits-ddpm")',
        "pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # deterministic (eta = 0)",
        'images = pipe(batch_size=16, num_inference_steps=50, output_type="np").images  # [0, 1]',
        "# or as reflow's deterministic teacher, z0 (B, 1, 8, 8) unit Gaussian -> z1 in model space:",
        "from reflow.teachers.ddpm import DiffusersTeacher",
        'teacher = DiffusersTeacher("data/teachers/digits-ddpm", nfe=50, solver="ddim")',
        "```",
        "",
        "## Training",
        "",
        "```",
        command,
        "```",
        "",
        f"- Network: `UNet2DModel`, sample_size 8, 1 -> 1 channels, block_out_channels "
        f"{tuple(info['block_out_channels'])}, layers_per_block {info['layers_per_block']}, "
        "ResNet blocks at 8x8 and self-attention below; "
        f"{info['params']:,} parameters.",
        *training_lines(args, info, weights_kib),
        "",
    ]
    if quality is not None:
        n = quality["num_samples"]
        lines += [
            "## Sample quality (deterministic DDIM, eta = 0)",
            "",
            "W2 is the exact 2-Wasserstein distance (`reflow.eval.metrics.w2`, POT's network simplex) between",
            f"{n} samples and all {quality['num_reference']} real digits, as 64-dim vectors in [-1, 1]. Noise:",
            f'`{quality["noise"]}`, sampled with `DiffusersTeacher(folder, nfe=K, solver="ddim")`',
            "(the checkpoint's own scheduler config turned into `DDIMScheduler`, default `leading` spacing,",
            "clip_sample on). Lower is better.",
            "",
            "| sampler | network calls | samples | reference | W2 |",
            "|---|---:|---:|---:|---:|",
        ]
        for nfe in EVAL_STEPS:
            r = quality["ddim"][str(nfe)]
            lines.append(f"| DDIM | {nfe} | {n} | {quality['num_reference']} | {r['w2']:.3f} |")
        fl = quality["real_vs_real_half"]
        lines += [
            f"| real vs real (floor) | - | {fl['sizes'][0]} | {fl['sizes'][1]} | {fl['w2']:.3f} |",
            "",
            f"The floor compares two disjoint random halves of the real digits ({fl['sizes'][0]} vs "
            f"{fl['sizes'][1]}, permutation seed {fl['seed']}).",
            "It is a half-size comparison: empirical W2 shrinks as the sample count grows, so a full-size",
            f"({n} vs {n}) comparison of fresh real digits would sit somewhat lower.",
            "Few-step DDIM relative to the 50-call teacher (W2 ratio): "
            + ", ".join(f"{k} call{'s' if k > 1 else ''} x{ratio(k):.2f}" for k in (1, 2, 4, 10))
            + ".",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python " + shlex.join([os.path.relpath(__file__, Path.cwd()), *(sys.argv[1:] if argv is None else argv)])
    data = torch.from_numpy(load_digits_array())

    ema_unet, scheduler, info = train(args, data)

    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    DDPMPipeline(unet=ema_unet, scheduler=scheduler).save_pretrained(str(tmp), safe_serialization=True)

    quality = None if args.skip_eval else evaluate(tmp, data, args.eval_batch)
    write_quality(tmp, args, info, quality)
    (tmp / "README.md").write_text(model_card(args, command, info, quality, tmp))

    swap_into_place(tmp, out)


if __name__ == "__main__":
    main()
