"""Plugin loading and the stage registry (pluggy, entry-point group ``itmkit``).

Built-in stages come from the modules in ``DEFAULT_PLUGINS``, registered exactly like the
paper plugins and third-party packages, which arrive through the ``itmkit`` entry-point group.
A plugin that fails to import is recorded with its error and never breaks the others.
``ITMKIT_LOAD_PLUGINS`` (comma list of entry-point names; empty = none) restricts autoloading,
``ITMKIT_DISABLE_PLUGINS`` (comma list) skips the named ones.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import traceback
from collections.abc import Iterable
from types import ModuleType

import attrs
import pluggy

from itmkit import hookspecs
from itmkit.errors import ItmkitError, did_you_mean
from itmkit.inputs import input_file
from itmkit.stage import Stage, check_stage_class

DEFAULT_PLUGINS = ("itmkit.core_stages",)
ENTRY_POINT_GROUP = "itmkit"


class RegistryError(ItmkitError):
    """Two plugins claim one stage name, or a plugin returns something that is not a stage."""


@attrs.frozen
class PluginInfo:
    """What ``itmkit plugins`` shows about one plugin."""

    name: str
    version: str
    source: str  # "built-in" or the distribution that provides the entry point
    stages: tuple[str, ...] = ()
    error: str | None = None


@attrs.define
class Registry:
    """Loaded plugins and the stage classes they contribute, by registered name."""

    stages: dict[str, type[Stage]] = attrs.field(factory=dict)
    owners: dict[str, str] = attrs.field(factory=dict)
    importers: dict[str, object] = attrs.field(factory=dict)  # name -> converter (itmkit.importing)
    plugins: list[PluginInfo] = attrs.field(factory=list)

    def get(self, name: str) -> type[Stage]:
        try:
            return self.stages[name]
        except KeyError:
            raise KeyError(f"unknown stage {name!r}{did_you_mean(name, self.stages)}") from None

    def by_kind(self, kind: str | None = None) -> list[type[Stage]]:
        return [cls for n, cls in sorted(self.stages.items()) if kind is None or cls.kind == kind]


def _env_list(name: str) -> list[str] | None:
    value = os.environ.get(name)
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _short_error(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" ({last[0].filename}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"


def _register(pm: pluggy.PluginManager, module: object, info: PluginInfo) -> PluginInfo:
    """Register one plugin module with pluggy; a misspelled hook is recorded as its error."""
    try:
        pm.register(module, name=info.name)
        pm.check_pending()
    except Exception as exc:
        if pm.is_registered(module):
            pm.unregister(module)
        return attrs.evolve(info, error=_short_error(exc))
    return info


def _collect_stages(pm: pluggy.PluginManager, registry: Registry, infos: list[PluginInfo]) -> None:
    """Call each plugin's ``register_stages`` hook on its own, so one failure stays its own."""
    by_name = {info.name: i for i, info in enumerate(infos)}
    # get_hookimpls() lists implementations in registration order: built-ins claim names first.
    for impl in pm.hook.register_stages.get_hookimpls():
        index = by_name[impl.plugin_name]
        info = infos[index]
        try:
            contributed = list(impl.function() or [])
        except Exception as exc:
            infos[index] = attrs.evolve(info, error=_short_error(exc))
            continue
        names = []
        for cls in contributed:
            problems = check_stage_class(cls)
            if problems:
                raise RegistryError(f"plugin {info.name!r}: " + "; ".join(problems))
            if cls.name in registry.stages:
                raise RegistryError(
                    f"stage {cls.name!r} is registered twice: by plugin"
                    f" {registry.owners[cls.name]!r} and by plugin {info.name!r};"
                    " uninstall one of them or disable it with ITMKIT_DISABLE_PLUGINS"
                )
            registry.stages[cls.name] = cls
            registry.owners[cls.name] = info.name
            names.append(cls.name)
        infos[index] = attrs.evolve(info, stages=tuple(names))


def _collect_importers(pm: pluggy.PluginManager, registry: Registry, infos: list[PluginInfo]) -> None:
    """Gather ``register_importers`` results; a duplicate name is an error naming both plugins."""
    by_name = {info.name: i for i, info in enumerate(infos)}
    owners: dict[str, str] = {}
    for impl in pm.hook.register_importers.get_hookimpls():
        index = by_name[impl.plugin_name]
        try:
            contributed = dict(impl.function() or {})
        except Exception as exc:
            infos[index] = attrs.evolve(infos[index], error=_short_error(exc))
            continue
        for name, convert in contributed.items():
            if name in owners:
                raise RegistryError(f"importer {name!r} is registered twice: by plugin {owners[name]!r}"
                                    f" and by plugin {impl.plugin_name!r}")
            owners[name] = impl.plugin_name
            registry.importers[name] = convert


def load_registry(extra_modules: Iterable[ModuleType] = ()) -> Registry:
    """Load built-in plugins, entry-point plugins (subject to the env filters) and extras."""
    from itmkit import __version__

    pm = pluggy.PluginManager("itmkit")
    pm.add_hookspecs(hookspecs)
    infos: list[PluginInfo] = []

    for module_name in DEFAULT_PLUGINS:
        module = importlib.import_module(module_name)
        infos.append(_register(pm, module, PluginInfo(module_name, __version__, "built-in")))

    allow = _env_list("ITMKIT_LOAD_PLUGINS")
    deny = set(_env_list("ITMKIT_DISABLE_PLUGINS") or [])
    entry_points = sorted(
        importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name
    )
    for ep in entry_points:
        if (allow is not None and ep.name not in allow) or ep.name in deny:
            continue
        dist = ep.dist
        info = PluginInfo(
            name=ep.name,
            version=dist.version if dist else "?",
            source=f"{dist.name if dist else '?'} ({ep.value})",
        )
        try:
            module = ep.load()
        except Exception as exc:
            infos.append(attrs.evolve(info, error=_short_error(exc)))
            continue
        infos.append(_register(pm, module, info))

    for module in extra_modules:
        source = getattr(module, "__file__", None) or "?"
        infos.append(_register(pm, module, PluginInfo(module.__name__, "local", source)))

    registry = Registry()
    _collect_stages(pm, registry, infos)
    _collect_importers(pm, registry, infos)
    registry.plugins.extend(infos)
    return registry


def load_stage_file(path: str) -> ModuleType:
    """Import a local experimental stage file named on the command line (never from a recipe)."""
    import importlib.util

    input_file(path, "stage file", error=ItmkitError, missing="stage file not found: {path}")  # never a FIFO
    name = "itmkit_local_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ItmkitError(f"cannot import stage file {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = load_registry()
    return _REGISTRY


def reset_registry(registry: Registry | None = None) -> None:
    """Replace (or drop, to reload) the process-wide registry; for tests and --stages files."""
    global _REGISTRY
    _REGISTRY = registry
