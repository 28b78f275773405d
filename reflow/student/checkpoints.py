"""Training checkpoints that load without pickle: tensors in safetensors files, everything else in JSON.

Checkpoints of ``OUT`` live in ``OUT.checkpoints/step-N`` (the two newest are kept); each appears by rename,
so a listed one is complete. :func:`save_checkpoint` writes one from the live :class:`TrainingState`,
:func:`check_resumable` refuses one that is not ours to load or was made with other run settings, and
:func:`resume` loads one back.

A checkpoint folder holds

- ``model.safetensors``: the (unwrapped) model's weights (``safetensors.torch.save_model``, so tied
  tensors are stored once);
- ``training_state.safetensors``: every tensor of the optimizer, the EMA and the grad scaler, named by
  where it sits (``optimizer.state.0.exp_avg``, ``ema.shadow_params.3``);
- ``reflow_checkpoint.json``: the step, the structure and scalars of those states (a tensor is the
  placeholder ``{"__tensor__": NAME}``, a tuple ``{"__tuple__": [...]}``, a dict with non-string keys
  ``{"__items__": [[key, value], ...]}``) and what the caller records (``info``: the run's settings);
- ``rng_state_R.json`` / ``rng_state_R.safetensors``: the random states of process R (Python, NumPy,
  torch CPU and CUDA), one pair per process.

Loading reads only JSON (``json``) and safetensors (``load_file``): no file in the folder is ever
unpickled, so a planted ``.pkl`` / ``.bin`` next to these files is inert. Folders written by older
versions (Accelerate's ``save_state``: pickled scheduler, EMA, RNG states) are recognised by
:func:`checkpoint_kind` so the caller can refuse them.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from reflow.errors import ReflowError
from reflow.folders.io import atomic_write_json
from reflow.student.config import differences, json_value

META = "reflow_checkpoint.json"
STATE = "training_state.safetensors"
MODEL = "model.safetensors"
FORMAT = "reflow-checkpoint"
VERSION = 1
PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth")
"""File endings of pickled state (Accelerate writes ``*.pkl`` and ``torch.save`` files named ``*.bin``)."""


def flatten(obj: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able skeleton of ``obj`` (nested dicts, lists, tuples, tensors and scalars); its tensors go
    into ``tensors`` under path names starting with ``name``. :func:`unflatten` inverts it."""
    if isinstance(obj, torch.Tensor):
        key = name
        while key in tensors:  # a dict key holding a dot could repeat a path
            key += "_"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, f"{name}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: flatten(v, f"{name}.{k}", tensors) for k, v in obj.items()}
        items = []
        for k, v in obj.items():
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise TypeError(f"cannot store a dict key of type {type(k).__name__} at {name} in a checkpoint")
            items.append([k, flatten(v, f"{name}.{k}", tensors)])
        return {"__items__": items}
    raise TypeError(f"cannot store a {type(obj).__name__} at {name} in a checkpoint")


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The object :func:`flatten` took apart, with its tensors from ``tensors``."""
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    if not isinstance(skeleton, dict):
        return skeleton
    if len(skeleton) == 1:
        ((tag, value),) = skeleton.items()
        if tag == "__tensor__":
            return tensors[value]
        if tag == "__tuple__":
            return tuple(unflatten(v, tensors) for v in value)
        if tag == "__items__":
            return {k: unflatten(v, tensors) for k, v in value}
    return {k: unflatten(v, tensors) for k, v in skeleton.items()}


def checkpoint_kind(folder: Path) -> Literal["safe", "pickle", "none"]:
    """``safe``: this module's format; ``pickle``: an older reflow's Accelerate ``save_state`` folder (pickled
    state, never read without ``--allow-pickle``); ``none``: neither."""
    if (folder / META).is_file():
        return "safe"
    if any(p.suffix in PICKLE_SUFFIXES for p in folder.iterdir()):
        return "pickle"
    return "none"


def _rng_files(folder: Path, rank: int) -> tuple[Path, Path]:
    return folder / f"rng_state_{rank}.json", folder / f"rng_state_{rank}.safetensors"


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (OSError, SafetensorError) as e:
        raise ReflowError(f"{path} is unreadable ({e}); delete {path.parent} to resume from the one before") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReflowError(f"{path} is unreadable ({e}); delete {path.parent} to resume from the one before") from None


def save_rng_state(folder: Path, rank: int) -> None:
    """This process's random states (Python, NumPy, torch CPU and CUDA) into ``folder``."""
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(states, "rng", tensors)
    json_file, tensor_file = _rng_files(folder, rank)
    _save(tensors, tensor_file)
    _write_json(json_file, skeleton)


def load_rng_state(folder: Path, rank: int) -> bool:
    """Restore this process's random states from ``folder``; False when it holds none for ``rank`` (a
    resume on more processes than wrote it: the extra ones keep their seeded states)."""
    import numpy as np

    json_file, tensor_file = _rng_files(folder, rank)
    if not json_file.is_file():
        return False
    states = unflatten(_read_json(json_file), _load(tensor_file))
    random.setstate(states["python"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return True


def save_training_state(
    folder: Path,
    *,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    ema: Any,
    scaler: Any = None,
    step: int,
    accelerator_step: int = 0,
    info: dict[str, Any] | None = None,
) -> None:
    """Write the model (unwrapped), optimizer, LR scheduler, EMA (diffusers ``EMAModel``), grad scaler
    (None: no fp16 scaling), the step and ``info`` (JSON-able) into ``folder``: the main process's part of
    a checkpoint."""
    from safetensors.torch import save_model

    save_model(model, str(folder / MODEL), metadata={"format": "pt"})
    tensors: dict[str, torch.Tensor] = {}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "step": step,
        "accelerator_step": accelerator_step,
        "optimizer": flatten(optimizer.state_dict(), "optimizer", tensors),
        "scheduler": flatten(scheduler.state_dict(), "scheduler", tensors),
        "ema": flatten(ema.state_dict(), "ema", tensors),
        "scaler": None if scaler is None else flatten(scaler.state_dict(), "scaler", tensors),
        "info": info or {},
    }
    _save(tensors, folder / STATE)
    _write_json(folder / META, meta)  # last: the folder is complete once it is renamed into place anyway


def read_meta(folder: Path) -> dict[str, Any]:
    """The JSON part of a checkpoint (step, ``info``, state skeletons); reads no tensors."""
    meta = _read_json(folder / META)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ReflowError(f"{folder / META} is not a reflow checkpoint; delete {folder} to resume from the one before")
    if meta.get("version", 0) > VERSION:
        raise ReflowError(f"{folder} was written by a newer reflow (format {meta['version']}); upgrade reflow")
    return meta


def load_training_state(
    folder: Path,
    *,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    ema: Any,
    scaler: Any = None,
) -> dict[str, Any]:
    """Load what :func:`save_training_state` wrote into live objects (the model unwrapped, on any device;
    the EMA's shadow parameters move to where they were). Returns the checkpoint's JSON part."""
    from safetensors.torch import load_model

    meta = read_meta(folder)
    try:
        load_model(model, str(folder / MODEL), strict=True, device="cpu")
    except RuntimeError as e:  # a size mismatch: another architecture
        first = str(e).strip().splitlines()[-1].strip()
        raise ReflowError(f"{folder} holds another model ({first}); delete {folder.parent} to start over") from None
    tensors = _load(folder / STATE)
    optimizer.load_state_dict(unflatten(meta["optimizer"], tensors))
    scheduler.load_state_dict(unflatten(meta["scheduler"], tensors))
    devices = [p.device for p in ema.shadow_params]
    ema.load_state_dict(unflatten(meta["ema"], tensors))
    ema.shadow_params = [p.to(d) for p, d in zip(ema.shadow_params, devices, strict=True)]
    if scaler is not None and meta.get("scaler") is not None:
        scaler.load_state_dict(unflatten(meta["scaler"], tensors))
    return meta


# --- checkpoint folders of a training ------------------------------------------------------------------


@dataclass
class TrainingState:
    """The live objects of a training: what a checkpoint saves and a resume restores."""

    accelerator: Any  # accelerate.Accelerator
    model: torch.nn.Module  # prepared by Accelerate (wrapped for DDP on many processes)
    raw: torch.nn.Module  # the same model unwrapped: what is saved, loaded and averaged
    optimizer: Any  # prepared by Accelerate
    scheduler: Any  # the LR schedule, not prepared: it steps once per optimizer step
    ema: Any  # diffusers.training_utils.EMAModel of ``raw``'s parameters


def checkpoint_root(out: Path) -> Path:
    """Where the checkpoints of a training into ``out`` live: ``OUT.checkpoints`` beside it."""
    return out.parent / f"{out.name}.checkpoints"


def _step_folders(root: Path) -> list[Path]:
    return [p for p in root.iterdir() if re.fullmatch(r"step-\d+", p.name)]


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint folder (they appear by rename, so a listed one is complete)."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return None
    found = [p for p in _step_folders(root) if (p / "reflow_step.json").is_file()]
    return max(found, key=lambda p: int(p.name.split("-")[1]), default=None)


def architecture(model: torch.nn.Module) -> dict[str, Any]:
    """The model's class and config (its UNet's for a UNetFlow), JSON-able: what its weights' shapes follow."""
    inner = getattr(model, "unet", model)
    config = {k: v for k, v in dict(getattr(inner, "config", {})).items() if not k.startswith("_")}
    arch = {"class": type(inner).__name__, **config}
    if inner is not model:
        arch["wrapper"] = type(model).__name__
    return json_value(arch)


def save_checkpoint(out: Path, state: TrainingState, step: int, settings: dict[str, Any]) -> Path:
    """Write the state after step ``step`` as ``OUT.checkpoints/step-N`` (safetensors + JSON, no pickle): every
    process its random states, the main process the rest, with the run ``settings`` and the model's
    architecture; the folder appears by rename. Call it on every process."""
    accelerator = state.accelerator
    root = checkpoint_root(out)
    final, tmp = root / f"step-{step:07d}", root / f".step-{step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)  # made here, before the barrier: every process writes its own RNG state into it
    accelerator.wait_for_everyone()
    try:
        save_rng_state(tmp, accelerator.process_index)
        if accelerator.is_main_process:
            save_training_state(
                tmp,
                model=state.raw,
                optimizer=state.optimizer,
                scheduler=state.scheduler,
                ema=state.ema,
                scaler=accelerator.scaler,
                step=step,
                accelerator_step=accelerator.step,
                info={"settings": settings, "architecture": architecture(state.raw)},
            )
            atomic_write_json(tmp / "reflow_step.json", {"step": step})
    except BaseException:  # a full disk, say: no half checkpoint stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()  # every process's random states are in
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for p in sorted(_step_folders(root))[:-2]:  # keep the two newest
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def check_resumable(ckpt: Path, settings: dict[str, Any], allow_pickle: bool) -> None:
    """Refuse, before any work, a checkpoint that is not ours to load or was made by other settings."""
    root = ckpt.parent
    kind = checkpoint_kind(ckpt)
    if kind == "pickle" and not allow_pickle:
        raise ReflowError(
            f"{ckpt} was written by an older reflow with pickle state; pass --allow-pickle to load it if you "
            f"trust it, or delete {root} and restart"
        )
    if kind == "none":
        raise ReflowError(f"{ckpt} holds no reflow checkpoint state; delete {root} and restart")
    if kind == "safe":
        recorded = read_meta(ckpt).get("info", {}).get("settings")
        diffs = differences(recorded, settings) if recorded is not None else []
        if diffs:
            raise ReflowError(
                f"{ckpt} was made with other settings: {', '.join(diffs)}; resume with the same settings, "
                f"or delete {root} to start over"
            )


def resume(ckpt: Path, state: TrainingState) -> int:
    """Load ``ckpt`` into the live ``state``; returns its step. A folder of an older reflow (pickle state,
    allowed by ``--allow-pickle``) goes through Accelerate's ``load_state``."""
    accelerator = state.accelerator
    if checkpoint_kind(ckpt) == "pickle":
        accelerator.register_for_checkpointing(state.scheduler)
        accelerator.register_for_checkpointing(state.ema)
        accelerator.load_state(str(ckpt))
        return json.loads((ckpt / "reflow_step.json").read_text())["step"]
    recorded = read_meta(ckpt).get("info", {}).get("architecture")
    diffs = differences(recorded, architecture(state.raw), "") if recorded is not None else []
    if diffs:
        raise ReflowError(
            f"{ckpt} holds another model architecture: {', '.join(diffs)}; resume with the same model, "
            f"or delete {ckpt.parent} to start over"
        )
    meta = load_training_state(
        ckpt,
        model=state.raw,
        optimizer=state.optimizer,
        scheduler=state.scheduler,
        ema=state.ema,
        scaler=accelerator.scaler,
    )
    load_rng_state(ckpt, accelerator.process_index)
    accelerator.step = meta["accelerator_step"]
    return meta["step"]
