"""The evaluation report: REPORT/metrics.json, REPORT/report.md and PNG figures, from ``evaluate``'s result.

Every file is written to a temporary name and renamed, so a killed run leaves no half-written report.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from reflow.eval.evaluate import Evaluation, safe_name
from reflow.folders.io import atomic_write_bytes, atomic_write_json, atomic_write_text, clean_folder_debris, mark_output

LABELS = {
    "w2": "W2 to data",
    "fd_digits": "FD (digits net)",
    "kid_digits": "KID (digits net)",
    "fd_inception": "FID (Inception)",
    "kid_inception": "KID (Inception)",
    "mse_teacher": "MSE to teacher",
    "agreement": "classifier agreement with the label",
    "agreement_min_class": "classifier agreement, worst class",
    "w2_class_mean": "W2 to data of the same class (mean over classes)",
}


def metric_keys(metrics: dict[str, Any]) -> list[str]:
    """The metrics present in a report, in the order of LABELS."""
    present: set[str] = set()
    for m in metrics["models"]:
        for cell in m["nfe"].values():
            present.update(k for k in cell if k in LABELS)
    return [k for k in LABELS if k in present]


def _fmt(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "-"
    text = f"{value:.4g}" if abs(value) < 1e-3 or abs(value) >= 1e4 else f"{value:.4f}"
    if std:
        text += f" ± {std:.2g}"
    return text


def metric_table(metrics: dict[str, Any], key: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one metric: a row per model, a column per NFE, then the reference solve."""
    nfes = metrics["settings"]["nfes"]
    header = ["model", *[f"NFE {k}" for k in nfes], "reference solve (NFE)"]
    rows = []
    for m in metrics["models"]:
        cells = [m["name"]]
        for k in nfes:
            cell = m["nfe"][str(k)]
            cells.append(_fmt(cell.get(key), cell.get(f"{key}_std")))
        ref = m.get("reference_solve")
        if ref is not None and key in ref:
            cells.append(f"{_fmt(ref[key], ref.get(f'{key}_std'))} ({ref['solver']}, {ref['nfe']})")
        else:
            cells.append("-")
        rows.append(cells)
    return header, rows


def flow_table(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["model", "solver", "straightness S", "curvature K", "adaptive NFE"]
    spent = any("cpu_minutes" in m for m in metrics["models"])
    if spent:
        header.append("CPU minutes (cumulative)")
    rows = []
    for m in metrics["models"]:
        adaptive = str(m["adaptive_nfe"]) if "adaptive_nfe" in m else "-"
        s, k = m.get("straightness"), m.get("curvature")
        s = "-" if s is None else f"{s:.3g}"
        k = "-" if k is None else f"{k:.3g}"
        rows.append([m["name"], m["solver"], s, k, adaptive])
        if spent:
            cpu = m.get("cpu_minutes")
            rows[-1].append("-" if cpu is None else f"{cpu:.1f}")
    return header, rows


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    align = ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def report_markdown(metrics: dict[str, Any], figures: list[str]) -> str:
    s = metrics["settings"]
    seeds = s["seeds"]
    lines = [
        "# reflow evaluation",
        "",
        f"Reference: `{s['reference']}` ({metrics['num_reference']} samples). Each model draws "
        f"{s['num_samples']} samples per seed from noise seeds {', '.join(map(str, seeds))}; figures are the "
        f"mean{' ± standard deviation over seeds' if len(seeds) > 1 else ' (one seed: no spread)'}. "
        "Flows sample with Euler on their own grid, diffusers checkpoints with their own solver at the same "
        "number of network calls (NFE). Lower is better everywhere.",
        "",
    ]
    for name, what in metrics["feature_spaces"].items():
        lines.append(
            f"- FD/KID ({name}): Fréchet and kernel (KID, polynomial kernel, {s['kid_subsets']} subsets of "
            f"{s['kid_subset_size']}) distances in the feature space of {what}."
        )
    fid = metrics.get("fidelity")
    if fid:
        lines.append(
            f"- MSE to teacher: mean squared error per element between the model's output and the teacher's z1 "
            f"from the same z0, on {fid['rows']} held-out pairs of `{fid['pairs']}`."
        )
    lines.append(
        f"- Straightness S and curvature K along a {s['straightness_steps']}-step Euler solve of "
        f"{s['diagnostics_samples']} samples (0 = straight)."
    )
    for note in metrics["notes"]:
        lines.append(f"- Note: {note}")
    lines.append("")
    for key in metric_keys(metrics):
        lines += [f"## {LABELS[key]}", "", _markdown(*metric_table(metrics, key)), ""]
    lines += ["## Flow", "", _markdown(*flow_table(metrics)), ""]
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{f}]({f})" for f in figures]
        lines.append("")
    return "\n".join(lines)


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def _plot_quality(metrics: dict[str, Any], out: Path) -> str | None:
    import matplotlib.pyplot as plt

    keys = metric_keys(metrics)
    if not keys:
        return None
    nfes = metrics["settings"]["nfes"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for i, m in enumerate(metrics["models"]):
            color = f"C{i % 10}"
            ys = [m["nfe"][str(k)].get(key) for k in nfes]
            errs = [m["nfe"][str(k)].get(f"{key}_std", 0.0) for k in nfes]
            if all(y is None for y in ys):
                continue
            ax.errorbar(nfes, ys, yerr=errs, marker="o", color=color, label=m["name"], capsize=3)
            ref = m.get("reference_solve")
            if ref is not None and ref.get(key, 0) > 0:
                ax.axhline(ref[key], color=color, ls="--", lw=1, label=f"{m['name']} ({ref['solver']}, {ref['nfe']})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(nfes, [str(k) for k in nfes])
        ax.set_xlabel("network calls (NFE)")
        ax.set_title(LABELS[key])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out / "quality_vs_nfe.png")
    plt.close(fig)
    return "quality_vs_nfe.png"


def _tile(images: np.ndarray) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> one (H, N * (W + 1), C) strip in [0, 1] with 1-pixel gaps."""
    n, c, h, w = images.shape
    strip = np.ones((h, n * (w + 1) - 1, c))
    for i, im in enumerate(images):
        strip[:, i * (w + 1) : i * (w + 1) + w] = (np.clip(im, -1, 1).transpose(1, 2, 0) + 1) / 2
    return strip


def grid_png(images: np.ndarray, columns: int = 16, min_side: int = 64) -> bytes:
    """A PNG of (N, C, H, W) images in [-1, 1] (C = 1 or 3): rows of ``columns`` with 1-pixel gaps,
    each image enlarged by a whole factor to at least ``min_side`` pixels (an 8x8 digit is drawn 64x64)."""
    import matplotlib.image

    n, c, h, w = images.shape
    scale = max(1, -(-min_side // max(h, w)))
    big = images.repeat(scale, axis=2).repeat(scale, axis=3)
    width = min(n, columns) * (w * scale + 1) - 1
    strips = []
    for i in range(0, n, columns):
        strip = _tile(big[i : i + columns])  # a row of images, then a 1-pixel gap below it
        strips.append(np.pad(strip, ((0, 1), (0, width - strip.shape[1]), (0, 0)), constant_values=1))
    canvas = np.concatenate(strips)[:-1]
    buf = io.BytesIO()
    matplotlib.image.imsave(buf, canvas[..., 0] if c == 1 else canvas, cmap="gray", vmin=0, vmax=1, format="png")
    return buf.getvalue()


def _plot_grid(name: str, pics: dict[str, Any], teacher_row: np.ndarray | None, out: Path) -> str:
    import matplotlib.pyplot as plt

    rows = ([("teacher", teacher_row)] if teacher_row is not None else []) + [
        (f"NFE {k}", x) for k, x in pics["rows"].items()
    ]
    fig, axes = plt.subplots(len(rows), 1, figsize=(12, 0.95 * len(rows) + 0.4), squeeze=False)
    for ax, (label, x) in zip(axes[:, 0], rows, strict=True):
        strip = _tile(np.asarray(x))
        strip = strip[..., 0] if strip.shape[-1] == 1 else strip
        ax.imshow(strip, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    same = " as the teacher's" if teacher_row is not None else ""
    axes[0, 0].set_title(f"{name}: samples from the same noise{same}")
    file = f"samples_{safe_name(name)}.png"
    fig.tight_layout()
    _save(fig, out / file)
    plt.close(fig)
    return file


def _plot_scatter(name: str, pics: dict[str, Any], reference: np.ndarray, out: Path) -> list[str]:
    import matplotlib.pyplot as plt

    panels = [("reference", reference)] + [(f"NFE {k}", x) for k, x in pics["scatter"].items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    lim = float(np.abs(reference).max()) * 1.3
    for ax, (label, x) in zip(axes[0], panels, strict=True):
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.5, color="C0" if label == "reference" else "C1")
        ax.set_title(label)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    fig.suptitle(name)
    fig.tight_layout()
    file = f"scatter_{safe_name(name)}.png"
    _save(fig, out / file)
    plt.close(fig)
    files = [file]
    paths = pics.get("trajectories")
    if paths is not None:
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.plot(paths[:, :, 0], paths[:, :, 1], color="C2", lw=0.5, alpha=0.6)
        ax.scatter(paths[0, :, 0], paths[0, :, 1], s=3, color="k", label="z0 (t = 0)")
        ax.scatter(paths[-1, :, 0], paths[-1, :, 1], s=3, color="C3", label="z1 (t = 1)")
        ax.set_aspect("equal")
        ax.legend(fontsize=7)
        ax.set_title(f"{name}: trajectories ({len(paths) - 1} Euler steps)")
        file = f"trajectories_{safe_name(name)}.png"
        _save(fig, out / file)
        plt.close(fig)
        files.append(file)
    return files


def write_figures(evaluation: Evaluation, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    files = []
    quality = _plot_quality(evaluation.metrics, out)
    if quality:
        files.append(quality)
    pictures = evaluation.pictures
    for name, pics in pictures["models"].items():
        if pics["rows"]:
            files.append(_plot_grid(name, pics, pictures.get("teacher_row"), out))
        elif pics["scatter"]:
            files += _plot_scatter(name, pics, pictures["reference"], out)
    return files


def write_report(report: str | Path, evaluation: Evaluation, *, figures: bool = True) -> Path:
    """Write REPORT/metrics.json, REPORT/report.md and (``figures``) the PNGs; returns metrics.json's path."""
    out = Path(report)
    out.mkdir(parents=True, exist_ok=True)
    clean_folder_debris(out)  # a killed or failed earlier write (a full disk, say)
    mark_output(out, "eval")
    files = write_figures(evaluation, out) if figures else []
    metrics = dict(evaluation.metrics, figures=files)
    atomic_write_text(out / "report.md", report_markdown(metrics, files))
    atomic_write_json(out / "metrics.json", metrics)
    return out / "metrics.json"
