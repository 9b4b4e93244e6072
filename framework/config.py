"""TOML configs loaded into typed dataclasses.

A component is written as a table with its name and options, or as a bare name:

    [sampling]
    sampler = { name = "dpmpp_2m_sde", eta = 0.5 }
    schedule = "karras"

Every bad key or value is reported with its path in the file:
`sampling.sampler.etta: unknown option, did you mean eta?`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError, LimnerError, did_you_mean
from .registry import create, option_names, registry, singular

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


@dataclass
class ComponentConfig:
    """A component picked by name in a config, with the options for its factory."""

    kind: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def build(self, **extra: Any) -> Any:
        """limner.create(kind, name, **options, **extra)."""
        return create(self.kind, self.name, **self.options, **extra)


def path_options(section: Any) -> Iterator[tuple[str, ComponentConfig, str, str]]:
    """The file paths a config section's components read (options named `path` or `*_path`, in
    nested sections too): (field name, component, option name, path)."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, ComponentConfig):
            yield from path_options(value)
        if not isinstance(value, ComponentConfig):
            continue
        for key, option in value.options.items():
            if (key == "path" or key.endswith("_path")) and isinstance(option, str) and option:
                yield f.name, value, key, option


def component(kind: str, default: str | None = None, **options: Any) -> Any:
    """A dataclass field holding a ComponentConfig of `kind` (a default name makes it optional)."""
    meta = {"kind": kind}
    if default is None:
        return field(metadata=meta)
    return field(default_factory=lambda: ComponentConfig(kind, default, dict(options)), metadata=meta)


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None) -> Any:
    """A numeric field whose value must lie in a range, checked when a config is read."""
    return field(default=default, metadata={"range": (ge, gt, le, lt)})


def in_range(value: float, ge: float | None = None, gt: float | None = None, le: float | None = None,
             lt: float | None = None) -> bool:
    """Whether value lies within the bounds given (None: unbounded on that side)."""
    return (ge is None or value >= ge) and (gt is None or value > gt) and (le is None or value <= le) and \
        (lt is None or value < lt)


def range_text(ge: float | None = None, gt: float | None = None, le: float | None = None,
               lt: float | None = None) -> str:
    """The bounds in words: ">= 0 and < 1"."""
    parts = [(">=", ge), (">", gt), ("<=", le), ("<", lt)]
    return " and ".join(f"{op} {bound if isinstance(bound, int) else format(bound, 'g')}"
                        for op, bound in parts if bound is not None)


def check_range(value: float, where: str, ge: float | None = None, gt: float | None = None,
                le: float | None = None, lt: float | None = None) -> None:
    """Raise naming `where`, the value and the allowed range when value is outside it."""
    if not in_range(value, ge, gt, le, lt):
        raise ConfigError(f"{where}: must be {range_text(ge, gt, le, lt)}, got {value!r}")


def physical_memory() -> int:
    """Bytes of RAM on this machine (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def check_memory(nbytes: float, what: str, fix: str, share: float = 0.5) -> None:
    """Refuse work whose tensors alone (`nbytes`, a lower bound: activations come on top) would
    take more than `share` of this machine's RAM, with the estimate, before any is allocated."""
    ram = physical_memory()
    if ram and nbytes > share * ram:
        raise LimnerError(f"{what} needs at least {nbytes / 2**30:.1f} GiB for its tensors alone, more than "
                          f"{share:.0%} of this machine's {ram / 2**30:.0f} GiB; {fix}")


def components(kind: str, *defaults: str) -> Any:
    """A dataclass field holding a list of ComponentConfigs of `kind`."""
    return field(default_factory=lambda: [ComponentConfig(kind, d) for d in defaults], metadata={"kind": kind})


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file's tables; a missing file or bad TOML is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a TOML text file (byte {exc.start} is not UTF-8)") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None


def load_config(path: str | Path, schema: type[T], data: dict[str, Any] | None = None) -> T:
    """Read a TOML file (or `data` already read from it) into `schema`, raising ConfigError
    with the path of any bad entry."""
    path = Path(path)
    data = read_toml(path) if data is None else data
    try:
        return parse_config(data, schema)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_config(data: dict[str, Any], schema: type[T], path: str = "") -> T:
    """Build dataclass `schema` from a dict, checking keys, types and component names."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or '(top level)'}: expected a table, got {_show(data)}")
    hints = typing.get_type_hints(schema)
    known = {f.name: f for f in dataclasses.fields(schema)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{_join(path, key)}: unknown option{did_you_mean(key, known)}"
                              f" Valid options: {', '.join(known)}.")
    values, missing = {}, []
    for name, f in known.items():
        where = _join(path, name)
        if name in data:
            values[name] = _convert(data[name], hints[name], f.metadata.get("kind"), where)
            if "range" in f.metadata:
                check_range(values[name], where, *f.metadata["range"])
        elif (
            hints[name] is not ComponentConfig and dataclasses.is_dataclass(hints[name]) and _has_required(hints[name])
        ):
            values[name] = parse_config({}, hints[name], where)  # names the section's missing options
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            missing.append(where)
    if missing:  # all of a section's at once, not one per run
        raise ConfigError(f"{', '.join(missing)}: missing required option{'s' if len(missing) > 1 else ''}")
    return schema(**values)


def _has_required(schema: type) -> bool:
    return any(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               for f in dataclasses.fields(schema))


def set_option(cfg: Any, key: str, value: Any) -> None:
    """Set a dotted option ("train.steps") on a parsed config with the checks a file gets."""
    *sections, name = key.split(".")
    target = cfg
    for section in sections:
        target = getattr(target, section)
    f = {f.name: f for f in dataclasses.fields(target)}.get(name)
    if f is None:
        raise ConfigError(f"{key}: unknown option")
    value = _convert(value, typing.get_type_hints(type(target))[name], f.metadata.get("kind"), key)
    if "range" in f.metadata:
        check_range(value, key, *f.metadata["range"])
    setattr(target, name, value)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _convert(value: Any, hint: Any, kind: str | None, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is ComponentConfig:
        return _component(value, kind, where)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], kind, where) if len(inner) == 1 else value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {_show(value)}")
        return [_convert(v, args[0], kind, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return parse_config(value, hint, where)
    return _scalar(value, hint, where)


def _scalar(value: Any, hint: Any, where: str) -> Any:
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: must be a finite number, got {value!r}")
    if hint in (int, float, str, bool):
        if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"{where}: expected {hint.__name__}, got {_show(value)}")
    if hint is dict or typing.get_origin(hint) is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"{where}: expected a table, got {_show(value)}")
    return value


def _component(value: Any, kind: str | None, where: str) -> ComponentConfig:
    if kind is None:
        raise LimnerError(f"schema error: {where} is a ComponentConfig without a kind")
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise ConfigError(f"{where}: expected a {singular(kind)} name or a table with name = \"...\","
                          f" got {_show(value)}")
    options = {k: v for k, v in value.items() if k != "name"}
    for key, option in options.items():
        if isinstance(option, float) and not math.isfinite(option):
            raise ConfigError(f"{where}.{key}: must be a finite number, got {option!r}")
    try:
        spec = registry().component(kind, value["name"]).spec
    except LimnerError as exc:
        raise ConfigError(f"{where}.name: {exc}") from None
    valid = option_names(spec.load())
    if valid is not None:
        for key in options:
            if key not in valid:
                raise ConfigError(f"{where}.{key}: unknown option{did_you_mean(key, valid)}"
                                  f" Valid options of {singular(kind)} {spec.name!r}:"
                                  f" {', '.join(valid) if valid else '(none)'}.")
    return ComponentConfig(kind, spec.name, options)
