"""Checkpoints: a directory of safetensors weights, the resolved TOML config and a JSON of
training state. Written to a temporary directory and renamed into place, so a kill never
leaves half a checkpoint; loading never unpickles anything."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import LimnerError

LATEST = "latest"


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file; a missing or corrupt file raises naming it."""
    if not path.is_file():
        raise LimnerError(f"checkpoint file missing: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LimnerError(f"corrupt checkpoint file {path}: {exc}") from None


def nonfinite_tensors(files: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """Names ("model: net.conv_in.weight") of floating tensors holding a NaN or an infinity."""
    return [f"{name}: {key}" for name, tensors in files.items() for key, t in tensors.items()
            if t.is_floating_point() and not torch.isfinite(t).all()]


def _first(items: list[str], sep: str = ", ", n: int = 3) -> str:
    """The first n items joined, with "..." when there are more."""
    return sep.join(items[:n]) + (f"{sep}..." if len(items) > n else "")


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temp folders of checkpoint writers that died mid-write (kill -9, power
    loss): `.step_N.tmp<pid>` whose pid is no longer running. Returns what was removed."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def write_checkpoint(folder: Path, files: dict[str, dict[str, torch.Tensor]], config_text: str,
                     state: dict[str, Any], point_latest: bool = True) -> Path:
    """Write `folder` atomically: every file into a sibling temp dir, then one rename; then
    (for a run's checkpoints) point the `latest` file beside it at it. Weights holding a NaN
    or an infinity are refused: a diverged model never replaces the last good checkpoint."""
    folder = Path(folder)
    bad = nonfinite_tensors(files)
    if bad:
        raise LimnerError(f"not writing {folder}: {len(bad)} tensors hold NaN or infinite values "
                          f"({_first(bad)}); the checkpoints already written are untouched")
    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, tensors in files.items():
        save_tensors(tensors, tmp / f"{name}.safetensors")
    (tmp / "config.toml").write_text(config_text)
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    if point_latest:
        _point_latest(folder)
    return folder


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file through a temp file beside it and a rename: a reader (or a kill)
    never sees half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _point_latest(folder: Path) -> None:
    write_text_atomic(folder.parent / LATEST, folder.name + "\n")


def find_checkpoint(path: str | Path) -> Path | None:
    """A checkpoint dir from itself, a checkpoints/ folder or a run folder; None if none yet."""
    path = Path(path)
    if (path / "config.toml").is_file() and (path / "state.json").is_file():
        return path
    for folder in (path, path / "checkpoints"):
        pointer = folder / LATEST
        if pointer.is_file():
            target = folder / pointer.read_text().strip()
            if target.is_dir():
                return target
    return None


def read_state(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise LimnerError(f"corrupt checkpoint state {folder / 'state.json'}: {exc}") from None


def load_module(module: torch.nn.Module, path: Path) -> None:
    """Load weights into `module`, naming the file on a missing or mismatched tensor."""
    tensors = load_tensors(path)
    own = module.state_dict()
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in tensors.items() if k in own and v.shape != own[k].shape]
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if wrong or missing or extra:
        parts = []
        if wrong:
            shown = _first([f"{k}: file {a}, model {b}" for k, a, b in wrong], sep="; ")
            parts.append(f"{len(wrong)} tensors have other shapes ({shown})")
        if missing:
            parts.append(f"{len(missing)} the model needs are missing ({_first(missing)})")
        if extra:
            parts.append(f"{len(extra)} are not in the model ({_first(extra)})")
        raise LimnerError(f"checkpoint {path} does not fit this model: {'; '.join(parts)}. Likely cause: the "
                          "config beside the weights was edited (a width, depth or component changed) or the "
                          "weights come from another run; use the config the checkpoint was trained with.")
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise LimnerError(f"checkpoint {path} does not fit this model (was the config changed?): {exc}") from None


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state split into tensors (for safetensors) and JSON-able rest."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, slots in sd["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *rest["scalars"].items()]:
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": rest["param_groups"]})
    # a saved moment comes back contiguous; its parameter may be channels_last, and the fused
    # optimizers pair them element by element in memory order: give each its parameter's strides
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    opt.state[p][key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer for configs: tables, inline tables (components), lists, scalars."""
    lines, tables = [], []
    for key, value in data.items():
        if value is None:  # TOML has no null: an absent key reads back as the default None
            continue
        if isinstance(value, dict) and "name" not in value:
            tables.append((f"{prefix}{key}", value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for name, value in tables:
        lines += ["", f"[{name}]", *to_toml(value, f"{name}.").splitlines()]
    return "\n".join(lines).strip() + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def export_checkpoint(src: str | Path, dest: str | Path, half: bool = True) -> Path:
    """A small release copy of a checkpoint: its config and EMA weights (fp16 if `half`)."""
    ckpt = find_checkpoint(src)
    if ckpt is None:
        raise LimnerError(f"no checkpoint found at {src}")
    state = read_state(ckpt)
    ema = ckpt / "ema.safetensors"
    tensors = load_tensors(ema if ema.is_file() else ckpt / "model.safetensors")
    if half:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    release = {"step": state.get("step"), "model_config": state.get("model_config"),
               "train_seconds": state.get("train_seconds")}
    dest = Path(dest)
    return write_checkpoint(dest, {"ema": tensors}, (ckpt / "config.toml").read_text(), release, point_latest=False)
