"""Train the bundled class-conditional teacher: a DDPM on scikit-learn's 8x8 digits with classifier-free guidance.

The model is diffusers' own ``UNet2DModel`` with a class embedding (``num_class_embeds=11``): classes 0..9 are
the digits (``load_digits().target``) and class 10 is the NULL label, the unconditional model used for
classifier-free guidance. During training each label is replaced by the null class with probability
``--label-dropout`` (0.1). Network, ``DDPMScheduler`` configuration, optimizer and EMA are those of
``data/train_digits_teacher.py`` (whose functions this script reuses). The EMA weights are saved as a
``DDPMPipeline`` folder (safetensors), and ``"_reflow_null_class": 10`` is added to its ``model_index.json``:
the machine-readable declaration of the null label (diffusers ignores keys starting with "_").

After training the script measures deterministic DDIM (eta = 0, 50 steps) with classifier-free guidance,
eps = eps_null + w * (eps_cond - eps_null), for several guidance scales w: 1000 samples with labels i % 10 and
noise ``row_noise(seed=1, range(1000), (1, 8, 8))``. It reports classifier agreement (the fraction of samples
that ``reflow.eval.features.bundled_digits_net()`` classifies as the requested digit, overall and for the worst
class) and W2 against all 1797 real digits, once with diffusers' default ``DDIMScheduler.step`` and once with
``use_clipped_model_output=True`` (which guidance needs with this clip_sample=True scheduler; see the model card).
The numbers and how the model was trained go into ``OUT/README.md`` (a model card) and ``OUT/quality.json``.

    OMP_NUM_THREADS=1 nice -n 5 python data/train_digits_cond_teacher.py --out data/teachers/digits-cond-ddpm \\
        --steps 6000 --batch-size 64 --lr 1e-3 --seed 0 --threads 1 --log-every 500
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "data"):  # run as a plain script from a checkout; the unconditional script sits beside it
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from train_digits_teacher import (  # noqa: E402
    add_training_args,
    swap_into_place,
    train,
    training_lines,
    write_quality,
)

from reflow.core.noise import row_noise  # noqa: E402
from reflow.eval.features import bundled_digits_net, classify  # noqa: E402
from reflow.eval.metrics import w2  # noqa: E402
from reflow.folders.data import load_digits_array  # noqa: E402

NUM_DIGITS = 10
NULL_CLASS = 10  # the unconditional label
NUM_CLASS_EMBEDS = NUM_DIGITS + 1
NULL_CLASS_KEY = "_reflow_null_class"
EVAL_SEED = 1
GUIDANCE_SCALES = (1.0, 1.5, 2.0, 3.0, 4.0)
RECOMMEND_RANGE = (1.5, 3.0)  # the recommended scale is picked from this range
TARGET_AGREEMENT = 0.98


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_training_args(p, REPO / "data" / "teachers" / "digits-cond-ddpm")
    p.add_argument(
        "--label-dropout",
        type=float,
        default=0.1,
        help=f"probability of replacing a training label by the null class {NULL_CLASS}",
    )
    p.add_argument("--eval-samples", type=int, default=1000, help="guided samples per guidance scale (labels i %% 10)")
    p.add_argument("--eval-steps", type=int, default=50, help="DDIM steps of the evaluation sampler")
    p.add_argument(
        "--guidance-scales",
        type=str,
        default=",".join(f"{w:g}" for w in GUIDANCE_SCALES),
        help="comma-separated classifier-free guidance scales to evaluate",
    )
    p.add_argument("--eval-batch", type=int, default=1000, help="samples per guided UNet call during evaluation")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.lr <= 0:
        p.error("--steps, --batch-size and --lr must be positive")
    if not 0.0 <= args.label_dropout < 1.0:
        p.error("--label-dropout must be in [0, 1)")
    if args.eval_samples < 1 or args.eval_steps < 1 or args.eval_batch < 1:
        p.error("--eval-samples, --eval-steps and --eval-batch must be positive")
    try:
        args.guidance_scales = tuple(float(w) for w in args.guidance_scales.split(","))
    except ValueError:
        p.error(f"--guidance-scales must be comma-separated numbers, got {args.guidance_scales!r}")
    return args


def load_digit_labels() -> torch.Tensor:
    """The class of each row of :func:`reflow.folders.data.load_digits_array` (scikit-learn's targets, same order)."""
    return torch.from_numpy(load_digits().target.astype(np.int64))


def mark_null_class(folder: Path, null_class: int = NULL_CLASS) -> None:
    """Add ``"_reflow_null_class": null_class`` to ``folder/model_index.json``, in diffusers' own JSON layout."""
    path = folder / "model_index.json"
    index = json.loads(path.read_text())
    index[NULL_CLASS_KEY] = null_class
    path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")  # as diffusers' ConfigMixin writes it


@torch.inference_mode()
def guided_ddim(
    unet: UNet2DModel,
    scheduler: DDIMScheduler,
    z0: torch.Tensor,
    labels: torch.Tensor,
    guidance_scale: float,
    num_steps: int,
    null_class: int = NULL_CLASS,
    clipped_model_output: bool = False,
) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from noise ``z0`` with classifier-free guidance.

    eps = eps_null + w * (eps_cond - eps_null), the conditional and null-label predictions from one batched
    UNet call. At w = 1 this is exactly the conditional model, so the null pass is skipped.
    ``clipped_model_output`` is ``DDIMScheduler.step``'s ``use_clipped_model_output``: with ``clip_sample`` on,
    re-derive eps from the clipped x0 prediction (diffusers' default, False, keeps the unclipped eps).
    """
    scheduler.set_timesteps(num_steps)
    x = z0 * scheduler.init_noise_sigma
    n = len(x)
    null = torch.full_like(labels, null_class)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        if guidance_scale == 1.0:
            eps = unet(model_input, t, class_labels=labels).sample
        else:
            both = unet(torch.cat([model_input, model_input]), t, class_labels=torch.cat([labels, null])).sample
            eps_cond, eps_null = both[:n], both[n:]
            eps = eps_null + guidance_scale * (eps_cond - eps_null)
        x = scheduler.step(eps, t, x, eta=0.0, use_clipped_model_output=clipped_model_output).prev_sample
    return x


def recommend(by_scale: dict[str, dict], scale_range: tuple[float, float] = RECOMMEND_RANGE) -> str:
    """The recommended guidance scale: within ``scale_range``, the lowest W2 among scales whose agreement reaches
    TARGET_AGREEMENT; if none does, the highest agreement (ties: lower W2)."""
    candidates = {k: r for k, r in by_scale.items() if scale_range[0] <= float(k) <= scale_range[1]}
    if not candidates:
        candidates = by_scale
    good = {k: r for k, r in candidates.items() if r["agreement"] >= TARGET_AGREEMENT}
    if good:
        return min(good, key=lambda k: good[k]["w2"])
    return max(candidates, key=lambda k: (candidates[k]["agreement"], -candidates[k]["w2"]))


# quality.json key -> DDIMScheduler.step(use_clipped_model_output=...)
SAMPLERS = {"guidance": False, "guidance_clipped_model_output": True}


def evaluate(folder: Path, data: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace) -> dict:
    """Classifier agreement and W2 of guided DDIM samples for each guidance scale, with diffusers' default
    ``DDIMScheduler.step`` and with ``use_clipped_model_output=True``."""
    pipe = DDPMPipeline.from_pretrained(folder, use_safetensors=True)
    unet = pipe.unet.eval()
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    net = bundled_digits_net()
    n, b = args.eval_samples, args.eval_batch
    z0 = row_noise(EVAL_SEED, range(n), (1, 8, 8))
    y = torch.arange(n) % NUM_DIGITS
    real_pred = classify(net, data)
    results = {
        "num_samples": n,
        "num_reference": len(data),
        "noise": f"row_noise(seed={EVAL_SEED}, range({n}), (1, 8, 8))",
        "labels": f"i % {NUM_DIGITS}",
        "sampler": f"DDIM eta=0, {args.eval_steps} steps, DDIMScheduler.from_config(checkpoint scheduler)",
        "samplers": {key: {"use_clipped_model_output": flag} for key, flag in SAMPLERS.items()},
        "null_class": NULL_CLASS,
        "classifier_accuracy_on_real_digits": float((real_pred == labels.numpy()).mean()),
    }
    print(f"classifier accuracy on the {len(data)} real digits: {results['classifier_accuracy_on_real_digits']:.4f}")
    for key, clipped in SAMPLERS.items():
        results[key] = {}
        for w in args.guidance_scales:
            t0 = time.perf_counter()
            samples = torch.cat(
                [
                    guided_ddim(unet, scheduler, z0[i : i + b], y[i : i + b], w, args.eval_steps, NULL_CLASS, clipped)
                    for i in range(0, n, b)
                ]
            )
            seconds = time.perf_counter() - t0
            hit = classify(net, samples) == y.numpy()
            per_class = [float(hit[y.numpy() == c].mean()) for c in range(NUM_DIGITS) if (y == c).any()]
            classes = [c for c in range(NUM_DIGITS) if (y == c).any()]
            worst = int(np.argmin(per_class))
            d = w2(samples, data)
            results[key][f"{w:g}"] = {
                "guidance_scale": w,
                "agreement": float(hit.mean()),
                "agreement_min_class": per_class[worst],
                "worst_class": classes[worst],
                "agreement_per_class": dict(zip(map(str, classes), per_class, strict=True)),
                "w2": d,
                "sample_seconds": seconds,
                "frac_outside_unit": float((samples.abs() > 1.0).float().mean()),
            }
            print(
                f"use_clipped_model_output={clipped} w={w:g}: agreement {hit.mean():.4f} "
                f"(worst class {classes[worst]}: {per_class[worst]:.4f})  W2 {d:.4f}  "
                f"({n} samples vs {len(data)} digits, sampling {seconds:.1f} s)",
                flush=True,
            )
    results["recommended_guidance_scale"] = float(recommend(results["guidance_clipped_model_output"]))
    results["recommended_sampler"] = "DDIM eta=0, use_clipped_model_output=True"
    results["recommended_guidance_scale_default_step"] = float(recommend(results["guidance"], (0.0, float("inf"))))
    print(
        f"recommended guidance scale: {results['recommended_guidance_scale']:g} with use_clipped_model_output=True, "
        f"{results['recommended_guidance_scale_default_step']:g} with diffusers' default DDIM step",
        flush=True,
    )
    return results


def model_card(
    args: argparse.Namespace, command: str, info: dict, quality: dict | None, folder: Path, out: Path
) -> str:
    """The README.md of the folder being written (``folder``, which will be renamed to ``out``)."""
    weights_kib = sum(f.stat().st_size for f in folder.rglob("*.safetensors")) / 1024
    name = out.name
    path = os.path.relpath(out, REPO) if out.is_relative_to(REPO) else str(out)
    lines = [
        f"# {name}: the bundled class-conditional DDPM teacher",
        "",
        "A small class-conditional DDPM on scikit-learn's 1797 handwritten 8x8 digits (`load_digits`), pixels",
        "scaled to [-1, 1] (0..16 -> -1..1), shape (1, 8, 8), labels `load_digits().target`. A stock diffusers",
        "`DDPMPipeline` folder (`UNet2DModel` with `num_class_embeds=11` + `DDPMScheduler`), EMA weights,",
        "safetensors, trained with label dropout for classifier-free guidance (CFG).",
        "",
        "## Null-class convention",
        "",
        f"Classes 0..9 are the digits; **class {NULL_CLASS} is the unconditional label** (the null label of",
        "classifier-free guidance). `model_index.json` declares it machine-readably as",
        f'`"{NULL_CLASS_KEY}": {NULL_CLASS}` (keys starting with "_" are ignored by diffusers\' `from_pretrained`).',
        "Guided noise prediction: eps = eps(x, t, 10) + w * (eps(x, t, y) - eps(x, t, 10)); w = 1 is the plain",
        "conditional model.",
        "",
        f"**Class {NULL_CLASS} is the unconditional label; pass guidance_scale > 1 to reflow generate.**",
        "",
        "## Loading",
        "",
        "`DDPMPipeline.__call__` passes no class labels, so sample with a plain loop (or reflow):",
        "",
        "```python",
        "import torch",
        "from diffusers import DDIMScheduler, DDPMPipeline",
        "",
        f'pipe = DDPMPipeline.from_pretrained("{path}")',
        "unet, scheduler = pipe.unet, DDIMScheduler.from_config(pipe.scheduler.config)",
        "y = torch.arange(16) % 10  # requested digits",
        "null = torch.full_like(y, 10)  # the unconditional label",
        "w = 2.0  # guidance scale",
        "x = torch.randn(16, 1, 8, 8)",
        "scheduler.set_timesteps(50)",
        "with torch.no_grad():",
        "    for t in scheduler.timesteps:",
        "        eps_cond, eps_null = unet(torch.cat([x, x]), t, class_labels=torch.cat([y, null])).sample.chunk(2)",
        "        eps = eps_null + w * (eps_cond - eps_null)",
        "        # re-derive eps from the clipped x0: needed for w > 1 with clip_sample (see 'Sample quality')",
        "        x = scheduler.step(eps, t, x, eta=0.0, use_clipped_model_output=True).prev_sample",
        "images = (x + 1) / 2  # [0, 1]",
        "# unguided (w = 1) as reflow's deterministic teacher, z0 (B, 1, 8, 8) unit Gaussian -> z1 in model space:",
        "from reflow.teachers.ddpm import DiffusersTeacher",
        "",
        f'teacher = DiffusersTeacher("{path}", nfe=50, solver="ddim")',
        "z1 = teacher(torch.randn(16, 1, 8, 8), y)",
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
        "ResNet blocks at 8x8 and self-attention below, "
        f"`num_class_embeds={NUM_CLASS_EMBEDS}` (a learned class embedding added to the time embedding); "
        f"{info['params']:,} parameters. The same network as `data/teachers/digits-ddpm` plus the class embedding.",
        *training_lines(args, info, weights_kib),
        f"- Labels: `load_digits().target` (0..9), each replaced by the null class {NULL_CLASS} with probability "
        f"{args.label_dropout:g} per training example (classifier-free guidance).",
        "",
    ]
    if quality is not None:
        n = quality["num_samples"]
        rec = quality["recommended_guidance_scale"]
        rec_default = quality["recommended_guidance_scale_default_step"]
        plain, fixed = quality["guidance"], quality["guidance_clipped_model_output"]
        lines += [
            f"## Sample quality (guided deterministic DDIM, eta = 0, {args.eval_steps} steps)",
            "",
            f"{n} samples per guidance scale w, requested labels `{quality['labels']}`, noise `{quality['noise']}`,",
            "sampled by a plain classifier-free-guidance loop over `DDIMScheduler.from_config` of the checkpoint's",
            "scheduler (default `leading` spacing, clip_sample on); both predictions come from one batched UNet call.",
            "",
            "- Agreement: the fraction of samples that the bundled digits classifier",
            "  (`reflow.eval.features.classify(bundled_digits_net(), ...)`, `data/features/digits-cnn`) assigns to the",
            "  requested digit, overall and for the worst digit (min class). The classifier itself gets "
            f"{quality['classifier_accuracy_on_real_digits']:.2%}",
            "  of the 1797 real digits right (it was trained on a stratified 80% of them and scores",
            "  100% on the held-out 20%; see `data/features/digits-cnn`).",
            "- W2: the exact 2-Wasserstein distance (`reflow.eval.metrics.w2`, POT's network simplex) between the",
            f"  {n} samples and all {quality['num_reference']} real digits, as 64-dim vectors in [-1, 1]. Lower is "
            "better.",
            "- Two DDIM updates: `step(eps, t, x, eta=0.0)` (diffusers' default, as `DDIMPipeline` and reflow's",
            "  `DiffusersTeacher` call it) and `step(..., use_clipped_model_output=True)`.",
            "",
            "| guidance scale w | default step: agreement | min class (digit) | W2 "
            "| use_clipped_model_output: agreement | min class (digit) | W2 |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]

        def cells(r: dict) -> str:
            return f"{r['agreement']:.1%} | {r['agreement_min_class']:.1%} ({r['worst_class']}) | {r['w2']:.3f}"

        for key in plain:
            mark = " (recommended)" if float(key) == rec else ""
            lines.append(f"| {key}{mark} | {cells(plain[key])} | {cells(fixed[key])} |")
        reached = fixed[f"{rec:g}"]["agreement"] >= TARGET_AGREEMENT
        rule = (
            f"the lowest W2 among the scales with agreement >= {TARGET_AGREEMENT:.0%}"
            if reached
            else f"no scale reaches {TARGET_AGREEMENT:.0%} agreement there: the highest agreement"
        )
        lines += [
            "",
            f"**Recommended: guidance scale {rec:g} with `use_clipped_model_output=True`** (within "
            f"{RECOMMEND_RANGE[0]:g}..{RECOMMEND_RANGE[1]:g}, {rule}).",
        ]
        if fixed[f"{rec:g}"]["agreement"] > plain[f"{rec:g}"]["agreement"] + 0.01:
            lines += [
                "",
                "Guidance needs `use_clipped_model_output=True` here. The checkpoint's scheduler has",
                "`clip_sample=True`: `DDIMScheduler.step` clips the predicted x0 to [-1, 1] but by default keeps the",
                "unclipped eps for the direction to the next x. A guided eps (w > 1) overshoots, so x0 is clipped hard",
                "while the direction is not; the two disagree, the samples wash out (fewer saturated pixels, strokes",
                "filled in) and agreement falls as w grows. Re-deriving eps from the clipped x0",
                "(`use_clipped_model_output=True`) keeps the update consistent.",
            ]
        lines += [
            "",
            f"With the default step the best scale is w = {rec_default:g} "
            f"({plain[f'{rec_default:g}']['agreement']:.1%} agreement).",
        ]
        uncond = REPO / "data" / "teachers" / "digits-ddpm" / "quality.json"
        if uncond.is_file():
            ref = json.loads(uncond.read_text())
            lines += [
                "",
                f"For reference, the unconditional `data/teachers/digits-ddpm` has W2 {ref['ddim']['50']['w2']:.3f} at "
                f"DDIM-50 with {ref['num_samples']} samples",
                f"(empirical W2 shrinks as the sample count grows, so {n} samples sit somewhat higher than "
                f"{ref['num_samples']}).",
            ]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python " + shlex.join([os.path.relpath(__file__, Path.cwd()), *(sys.argv[1:] if argv is None else argv)])
    if os.nice(0) > 0:  # record how it was run: `nice -n N` and the OpenMP thread count
        command = f"nice -n {os.nice(0)} {command}"
    if os.environ.get("OMP_NUM_THREADS"):
        command = f"OMP_NUM_THREADS={shlex.quote(os.environ['OMP_NUM_THREADS'])} {command}"
    data = torch.from_numpy(load_digits_array())
    labels = load_digit_labels()
    if len(labels) != len(data):
        raise SystemExit(f"{len(data)} digits but {len(labels)} labels")

    ema_unet, scheduler, info = train(
        args,
        data,
        labels=labels,
        num_class_embeds=NUM_CLASS_EMBEDS,
        null_class=NULL_CLASS,
        label_dropout=args.label_dropout,
    )
    info["null_class"] = NULL_CLASS
    info["label_dropout"] = args.label_dropout

    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    DDPMPipeline(unet=ema_unet, scheduler=scheduler).save_pretrained(str(tmp), safe_serialization=True)
    mark_null_class(tmp)

    quality = None if args.skip_eval else evaluate(tmp, data, labels, args)
    write_quality(tmp, args, info, quality)
    (tmp / "README.md").write_text(model_card(args, command, info, quality, tmp, out))

    swap_into_place(tmp, out)


if __name__ == "__main__":
    main()
