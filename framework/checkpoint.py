"""Checkpoints: a directory of safetensors weights, the resolved TOML config and a JSON of
training state. Written to a temporary directory and renamed into place, so a kill never
leaves half a checkpoint; loading never unpickles anything."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .errors import LimnerError
from .files import temp_dir, write_atomic, write_text_atomic

LATEST = "latest"


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A safetensors file; a failed write (a full disk) raises OSError naming it."""
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
        os.chmod(path, 0o644)  # safetensors creates 0600: a checkpoint is for sharing, as the config beside it
    except SafetensorError as exc:
        raise OSError(28 if "No space" in str(exc) else 5, str(exc).split(": ", 1)[-1], str(path)) from None


def write_weights(path: Path, tensors: dict[str, torch.Tensor], half: bool = False) -> None:
    """A safetensors file written atomically (limner.files.write_atomic); `half`: floating
    tensors stored in float16 (a shipped model's size halved)."""
    from safetensors.torch import save

    data = save({k: (v.half() if half and v.is_floating_point() else v).detach().contiguous().cpu()
                 for k, v in tensors.items()})
    write_atomic(path, lambda f: f.write(data))


class SafetensorsFile:
    """The keys, shapes and dtypes of a .safetensors file (its header, checked by safetensors'
    own reader: offsets in bounds, no overlap), and its tensors read one by one with plain reads
    into memory of their own, not memory-mapped: a mapped file's pages stay resident, counted in
    the process's memory, for as long as any tensor views them, so an SD 1.5 file read mapped and
    then held in bf16 peaked at the file plus its copy (benchmarks/results/sd15-speed.md). Raises
    SafetensorError, OSError or ValueError; callers name the file in their own words."""

    DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}

    def __init__(self, path: Path):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            self.metadata = handle.metadata() or {}
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        header.pop("__metadata__", None)
        self.entries = header  # key -> {"dtype", "shape", "data_offsets": [begin, end] after the header}
        self.shapes = {k: tuple(v["shape"]) for k, v in header.items()}
        self.start, self.path = 8 + size, Path(path)

    def dtype(self, key: str) -> str:
        """The tensor's dtype as the file names it (F32, F16, BF16, ...)."""
        return self.entries[key]["dtype"]

    def read(self, key: str) -> torch.Tensor:
        """The tensor `key` in its stored dtype, in memory of its own."""
        if self.dtype(key) not in self.DTYPES:
            raise ValueError(f"tensor {key!r} is stored as {self.dtype(key)}, which limner does not read (it reads "
                             f"{', '.join(self.DTYPES)})")
        t = torch.empty(self.shapes[key], dtype=self.DTYPES[self.dtype(key)])
        begin, end = self.entries[key]["data_offsets"]
        raw = t.view(-1).view(torch.uint8)
        if raw.numel() != end - begin:
            raise ValueError(f"tensor {key!r} of shape {list(t.shape)} {self.dtype(key)} spans {end - begin} bytes, "
                             f"not {raw.numel()}")
        with open(self.path, "rb") as fh:
            fh.seek(self.start + begin)
            if fh.readinto(memoryview(raw.numpy())) != raw.numel():
                raise ValueError(f"the file ends inside tensor {key!r}")
        return t


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file (SafetensorsFile: read, not mapped); a missing or corrupt file raises naming it."""
    if not path.is_file():
        raise LimnerError(f"checkpoint file missing: {path}")
    try:
        f = SafetensorsFile(path)
        return {k: f.read(k) for k in f.shapes}
    except (SafetensorError, OSError, ValueError) as exc:
        raise LimnerError(f"corrupt checkpoint file {path}: {exc}") from None


def nonfinite_tensors(files: dict[str, dict[str, torch.Tensor]]) -> list[str]:
    """Names ("model: net.conv_in.weight") of floating tensors holding a NaN or an infinity."""
    return [f"{name}: {key}" for name, tensors in files.items() for key, t in tensors.items()
            if t.is_floating_point() and not _finite(t)]


def _finite(t: torch.Tensor) -> bool:
    """Whether every value is finite: a NaN or an infinity makes the sum non-finite, so a finite
    sum settles it in one pass with no [N] mask (25x faster than isfinite().all() on the CPU); a
    sum that overflows is checked element by element."""
    total = t.sum(dtype=torch.float32) if t.dtype in (torch.float16, torch.bfloat16) else t.sum()
    return bool(torch.isfinite(total)) or bool(torch.isfinite(t).all())


def _first(items: list[str], sep: str = ", ", n: int = 3) -> str:
    """The first n items joined, with "..." when there are more."""
    return sep.join(items[:n]) + (f"{sep}..." if len(items) > n else "")


CHECKPOINT_FILES = ("config.toml", "state.json")
ATTACHED = "files"  # the folder of the files a checkpoint's [model] reads by path (train.attach_paths)


def is_checkpoint(folder: Path) -> bool:
    """Whether `folder` is a checkpoint limner wrote (and so may replace): a real folder holding
    config.toml, state.json and nothing but those, *.safetensors files and the files/ folder of
    the attachments its state.json lists."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    entries = list(folder.iterdir())
    names = {e.name for e in entries}
    if not all(n in names for n in CHECKPOINT_FILES):
        return False
    if ATTACHED in names:
        attached = folder / ATTACHED
        listed = _attachments(folder)
        if attached.is_symlink() or not attached.is_dir() or {e.name for e in attached.iterdir()} != set(listed):
            return False
    return all(e.name == ATTACHED or e.is_file() and not e.is_symlink()
               and (e.name in CHECKPOINT_FILES or e.name.endswith(".safetensors")) for e in entries)


def _attachments(folder: Path) -> list[str]:
    """The attachment names a checkpoint's state.json lists (none when it cannot be read)."""
    try:
        listed = json.loads((folder / "state.json").read_text(encoding="utf-8")).get("attachments", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [n for n in listed if _plain_name(n)] if isinstance(listed, list) else []


def _plain_name(name: Any) -> bool:
    """A file name with no folder in it: what an attachment's name must be (a stranger's state.json
    naming '../x' points nowhere outside files/)."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def attach(source: Path, dest: Path) -> None:
    """`source` (a file or a folder of files) at `dest`: hard links where the file system allows
    them (a multi-GB language model costs no space per checkpoint), copies elsewhere."""
    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:  # another file system, or links not allowed
            shutil.copy2(src, dst)

    if source.is_dir():
        shutil.copytree(source, dest, copy_function=link_or_copy)
    else:
        link_or_copy(str(source), str(dest))


def check_destination(folder: Path, force: bool = False) -> None:
    """Refuse to write a checkpoint at `folder` unless it is new, an empty folder, or (with
    `force`) a checkpoint limner wrote: nothing of the user's is ever replaced."""
    folder = Path(folder)
    if folder.is_symlink():
        raise LimnerError(f"not writing {folder}: it is a symbolic link; give a new folder")
    if not folder.exists():
        return
    if not folder.is_dir():
        raise LimnerError(f"not writing {folder}: it is a file; give a new folder")
    entries = sorted(e.name for e in folder.iterdir())
    if not entries:
        return
    if not is_checkpoint(folder):
        raise LimnerError(f"not writing {folder}: the folder holds files that are not a limner checkpoint "
                          f"({_first(entries)}); nothing was changed. Give a new or empty folder.")
    if not force:
        raise LimnerError(f"not writing {folder}: it already holds a checkpoint; nothing was changed. "
                          "Give a new folder, or --force to replace that checkpoint.")


def write_checkpoint(folder: Path, files: dict[str, dict[str, torch.Tensor]], config_text: str,
                     state: dict[str, Any], point_latest: bool = True,
                     attachments: dict[str, Path] | None = None) -> Path:
    """Write `folder` atomically: every file into a new, exclusively created temp folder beside
    it, then one rename; then (for a run's checkpoints) point the `latest` file beside it at it.
    An existing `folder` is replaced only when it is empty or a checkpoint limner wrote. Weights
    holding a NaN or an infinity are refused: a diverged model never replaces the last good
    checkpoint. `attachments` (name -> file or folder) go into its files/ folder, listed in
    state.json."""
    folder = Path(folder)
    bad = nonfinite_tensors(files)
    if bad:
        raise LimnerError(f"not writing {folder}: {len(bad)} tensors hold NaN or infinite values "
                          f"({_first(bad)}); the checkpoints already written are untouched")
    check_destination(folder, force=True)
    tmp = temp_dir(folder)
    try:
        for name, tensors in files.items():
            save_tensors(tensors, tmp / f"{name}.safetensors")
        (tmp / "config.toml").write_text(config_text)
        if attachments:
            bad = [name for name in attachments if not _plain_name(name)]
            if bad:
                raise LimnerError(f"not writing {folder}: attachment names must be plain file names, got {bad}")
            (tmp / ATTACHED).mkdir()
            for name, source in attachments.items():
                attach(Path(source), tmp / ATTACHED / name)
            state = {**state, "attachments": sorted(attachments)}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if point_latest:
        _point_latest(folder)
    return folder


def _point_latest(folder: Path) -> None:
    write_text_atomic(folder.parent / LATEST, folder.name + "\n")


def find_checkpoint(path: str | Path) -> Path | None:
    """A checkpoint dir from itself, a checkpoints/ folder or a run folder; None if there is
    none yet. A `latest` that names no checkpoint folder beside it is an error, never "none
    yet": a run must not silently start again from step 0 over its own checkpoints."""
    path = Path(path)
    if (path / "config.toml").is_file() and (path / "state.json").is_file():
        return path
    for folder in (path, path / "checkpoints"):
        pointer = folder / LATEST
        if pointer.is_file():
            try:
                name = pointer.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise LimnerError(f"cannot read {pointer}: {exc}") from None
            target = folder / name
            if not name or "/" in name or "\\" in name or name in (".", "..") or not is_checkpoint(target):
                steps = _step_checkpoints(folder)
                have = (f"the checkpoints there are {_first(steps[::-1], n=4)}: write one of their names into "
                        f"{pointer} to go on from it" if steps else "there is no checkpoint folder beside it")
                raise LimnerError(f"{pointer} names {name[:80]!r}, which is not a checkpoint folder beside it; "
                                  f"{have}, or remove the run folder to start again from step 0.")
            return target
        steps = _step_checkpoints(folder)
        if steps:
            raise LimnerError(f"{folder} holds checkpoints ({_first(steps[::-1], n=4)}) but no `latest` file naming "
                              f"the one to use; write one of their names into {pointer} (the newest: "
                              f"{steps[-1]}), or remove the run folder to start again from step 0.")
    return None


def _step_checkpoints(folder: Path) -> list[str]:
    """The names of the step_* checkpoints in `folder`, oldest first (none if it is no folder)."""
    return sorted(p.name for p in folder.glob("step_*") if is_checkpoint(p)) if folder.is_dir() else []


def read_state(folder: Path) -> dict[str, Any]:
    """A checkpoint's state.json: a JSON object, or an error naming the file."""
    path = folder / "state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bytes that are not UTF-8
        raise LimnerError(f"corrupt checkpoint state {path}: {exc}") from None
    if not isinstance(state, dict):
        raise LimnerError(f"corrupt checkpoint state {path}: expected a JSON object, got {type(state).__name__}")
    return state


def load_module(module: torch.nn.Module, path: Path) -> None:
    """Load weights into `module`, naming the file on a missing or mismatched tensor, a tensor
    of another kind (integer weights for float parameters) or one holding NaN or infinity."""
    load_state(module, load_tensors(path), path)


@contextlib.contextmanager
def without_init():
    """Modules built inside skip torch.nn.init's random initialisation (as transformers'
    no_init_weights does), for a model whose every weight is about to come from a file: a
    real build saves the random numbers, a meta-device one the import of torch._dynamo (1.5 s)
    that init's reference kernels need there. Not thread-safe: torch.nn.init is patched."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(torch.nn.init, n, fn)


def load_state(module: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path | str,
               assign: bool = False) -> None:
    """load_module's checks and load for tensors already read (from `path`, which errors name);
    `assign`: the tensors become the module's parameters (a module built on the meta device)."""
    path = Path(path)
    own = module.state_dict()
    wrong = [
        (k, tuple(v.shape), tuple(own[k].shape)) for k, v in tensors.items() if k in own and v.shape != own[k].shape
    ]
    missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    kinds = [f"{k}: file {v.dtype}, model {own[k].dtype}" for k, v in tensors.items()
             if k in own and v.is_floating_point() != own[k].is_floating_point()]
    if wrong or missing or extra or kinds:
        parts = []
        if wrong:
            shown = _first([f"{k}: file {a}, model {b}" for k, a, b in wrong], sep="; ")
            parts.append(f"{len(wrong)} tensors have other shapes ({shown})")
        if missing:
            parts.append(f"{len(missing)} the model needs are missing ({_first(missing)})")
        if extra:
            parts.append(f"{len(extra)} are not in the model ({_first(extra)})")
        if kinds:
            parts.append(f"{len(kinds)} are of another kind ({_first(kinds, sep='; ')})")
        raise LimnerError(f"checkpoint {path} does not fit this model: {'; '.join(parts)}. Likely cause: the "
                          "config beside the weights was edited (a width, depth or component changed) or the "
                          "weights come from another run; use the config the checkpoint was trained with.")
    bad = nonfinite_tensors({path.stem: tensors})
    if bad:
        raise LimnerError(f"checkpoint {path} holds NaN or infinite weights ({len(bad)} tensors: {_first(bad)}); "
                          "it would draw blank images. Use an earlier checkpoint of the run.")
    try:
        module.load_state_dict(tensors, strict=True, assign=assign)
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


def restore_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], rest: Any,
                      path: Path | str = "optimizer state") -> None:
    """Load what optimizer_tensors saved into `opt`, checked first: every moment must have its
    parameter's shape, be floating and finite, and the parameter groups must match (a wrong
    shape would let the fused update write outside its buffers). `path` names the file."""
    params = [p for group in opt.param_groups for p in group["params"]]

    def refuse(why: str) -> LimnerError:
        return LimnerError(f"optimizer state {path} does not fit this run: {why}. The file is damaged or comes "
                           "from another run; nothing was loaded.")

    if not isinstance(rest, dict) or not isinstance(rest.get("param_groups"), list) \
            or not isinstance(rest.get("scalars"), dict):
        raise refuse("its record in state.json lacks param_groups or scalars")
    groups = rest["param_groups"]
    own_groups = opt.state_dict()["param_groups"]
    if len(groups) != len(own_groups) or any(
            not isinstance(g, dict) or g.get("params") != o["params"] for g, o in zip(groups, own_groups)):
        raise refuse(f"its parameter groups differ from the model's ({len(own_groups)} groups of "
                     f"{[len(o['params']) for o in own_groups]} parameters)")
    state: dict[int, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *rest["scalars"].items()]:
        idx, _, key = flat.partition(".")
        if not idx.isdigit() or int(idx) >= len(params) or not key:
            raise refuse(f"entry {flat!r} names no parameter (the model has {len(params)})")
        param = params[int(idx)]
        if isinstance(value, torch.Tensor):
            if not value.is_floating_point():
                raise refuse(f"{flat} is {value.dtype}, not a floating tensor")
            if key == "step" and value.dim() != 0:
                raise refuse(f"{flat} has shape {tuple(value.shape)}; a step count is a scalar")
            if key != "step" and value.shape != param.shape:
                raise refuse(f"{flat} has shape {tuple(value.shape)}, its parameter {tuple(param.shape)}")
            if not torch.isfinite(value).all():
                raise refuse(f"{flat} holds NaN or infinite values")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise refuse(f"{flat} is {type(value).__name__}, not a number")
        state.setdefault(int(idx), {})[key] = value
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise refuse(str(exc)) from None
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


def weights_of(ckpt: Path) -> Path:
    """The weights a checkpoint draws with: ema.safetensors where there is one, else
    model.safetensors; an ema entry that is not a plain file is named, never passed over."""
    ema = ckpt / "ema.safetensors"
    if ema.is_symlink() or (ema.exists() and not ema.is_file()):
        raise LimnerError(f"{ema} is not a plain file (a link, folder or pipe); a checkpoint's weights are plain "
                          "safetensors files")
    return ema if ema.exists() else ckpt / "model.safetensors"


def export_checkpoint(src: str | Path, dest: str | Path, half: bool = True, force: bool = False) -> Path:
    """A small release copy of a checkpoint: its config, EMA weights (fp16 if `half`) and attached
    files (train.attach_paths; hard links where they can be). `dest`
    must be new or empty, or (with `force`) a checkpoint limner wrote other than the source."""
    ckpt = find_checkpoint(src)
    if ckpt is None:
        raise LimnerError(f"no checkpoint found at {src}")
    dest = Path(dest)
    source = ckpt.resolve()
    if dest.exists() and (dest.resolve() == source or dest.resolve() in source.parents):
        raise LimnerError(f"not writing {dest}: it {'is' if dest.resolve() == source else 'holds'} the checkpoint "
                          f"being exported ({ckpt}); give a new folder")
    check_destination(dest, force)
    state = read_state(ckpt)
    tensors = load_tensors(weights_of(ckpt))
    if half:
        tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    release = {"step": state.get("step"), "model_config": state.get("model_config"),
               "train_seconds": state.get("train_seconds")}
    from .config import read_toml

    read_toml(ckpt / "config.toml")  # a config that does not read back is named, not copied
    attached = {name: ckpt / ATTACHED / name for name in _attachments(ckpt)}
    missing = [name for name, path in attached.items() if not path.exists()]
    if missing:
        raise LimnerError(f"{ckpt}: its state.json lists the attached files {', '.join(missing)}, which are not in "
                          f"its {ATTACHED}/ folder; nothing was written")
    return write_checkpoint(dest, {"ema": tensors}, (ckpt / "config.toml").read_text(encoding="utf-8"), release,
                            point_latest=False, attachments=attached)
