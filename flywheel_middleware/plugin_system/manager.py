"""The plugin manager: finds plugins, builds them from YAML specs, and contains their failures.

Plugins come from three places, in this order: the built-ins in ``plugins/``, every installed
distribution that declares the ``flywheel_middleware`` entry-point group, and dotted paths listed
under ``plugins:`` in flywheel.yaml. A plugin module that fails to import, or a hook that raises,
is recorded in ``errors`` by name and skipped; the rest keep working.

A configuration's plugin references (every ``type``, ``params`` and dotted path) are checked
with ``check_config``: each problem names the file, the line, the key path and the valid
choices. The config file's folder is on the import path, so a plugin module next to
``flywheel.yaml`` can be named by its dotted path.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.metadata
import logging
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pluggy
from pydantic import BaseModel, ValidationError

from flywheel_middleware.config import FlywheelConfig, PluginSpec, key_path
from flywheel_middleware.errors import ConfigError, PluginError
from flywheel_middleware.plugin_system import hookspecs
from flywheel_middleware.plugin_system.base import PLUGIN_KINDS, Plugin, PluginContext

log = logging.getLogger("flywheel_middleware.plugins")

BUILTIN_MODULES = (
    "flywheel_middleware.plugins.filters",
    "flywheel_middleware.plugins.rewards",
    "flywheel_middleware.plugins.mutators",
    "flywheel_middleware.plugins.promoters",
    "flywheel_middleware.plugins.implicit",
)

KIND_HOOKS = {
    "filter": "register_filters",
    "reward": "register_reward_sources",
    "mutator": "register_mutators",
    "promoter": "register_promoters",
    "redactor": "register_redactors",
}
"""Plugin kind -> the hook that registers its classes."""

CONFIG_LISTS = {
    "filter": "filters",
    "reward": "rewards",
    "mutator": "mutators",
    "promoter": "promoters",
    "redactor": "redactors",
}
"""Plugin kind -> the YAML list that selects its instances."""

DOTTED_ORIGIN = "dotted path"
"""How ``PluginInfo.origin`` starts for a plugin named under ``plugins:``."""

P = TypeVar("P", bound=Plugin)


@dataclass
class PluginInfo:
    """One plugin class: its kind, YAML type, class and where it came from."""

    kind: str
    type_name: str
    cls: type[Plugin]
    origin: str
    module: str
    description: str = ""


@dataclass
class PluginFailure:
    """A plugin that could not be loaded or raised while running."""

    name: str
    error: str
    where: str = ""

    def __str__(self) -> str:
        where = f" ({self.where})" if self.where else ""
        return f"plugin {self.name}{where} failed: {self.error}"


class PluginSpecError(ConfigError, PluginError):
    """A plugin reference in the configuration that does not build; ``problems`` has one
    line per problem, each naming the file, line and key path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid plugin configuration:\n  " + "\n  ".join(problems))
        self.problems = problems


Locate = Callable[..., str]
"""``locate(*key_path)`` -> how a message names that key (``config.where`` bound to a spec)."""


@dataclass
class _Source:
    origin: str
    label: str


@dataclass
class FlywheelPluginManager:
    """A pluggy ``PluginManager`` for project ``flywheel_middleware`` plus the type registry."""

    pm: pluggy.PluginManager = field(default_factory=lambda: _new_pluggy())
    errors: list[PluginFailure] = field(default_factory=list)
    dotted_problems: list[str] = field(default_factory=list)
    """The config's ``plugins:`` entries that did not import, one line each."""
    _sources: dict[str, _Source] = field(default_factory=dict)
    _types: dict[str, dict[str, PluginInfo]] | None = None

    # -- loading --------------------------------------------------------------------------

    def register(self, plugin: Any, *, origin: str, label: str | None = None) -> bool:
        """Register a module or object; a second registration of the same object is ignored."""
        if self.pm.is_registered(plugin):
            return False
        name = label or getattr(plugin, "__name__", None) or repr(plugin)
        if self.pm.has_plugin(name):
            name = f"{name}#{id(plugin)}"
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:  # a hookimpl that does not match its spec
            self._fail(PluginFailure(name, f"{type(exc).__name__}: {exc}", origin))
            return False
        self._sources[name] = _Source(origin, name)
        self._types = None
        return True

    def load_builtins(self) -> None:
        for module_name in BUILTIN_MODULES:
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:
                self._fail(PluginFailure(module_name, _describe(exc), "built-in"))
                continue
            self.register(module, origin="built-in", label=module_name)

    def load_entry_points(self, group: str = hookspecs.PROJECT) -> None:
        """What pluggy's ``load_setuptools_entrypoints`` does, but one bad package is contained."""
        for ep in third_party_entry_points(group):  # our own are loaded as built-ins
            dist = ep.dist
            dist_name = dist.metadata["Name"] if dist is not None else "?"
            origin = f"entry point {ep.name} ({dist_name} {dist.version if dist else ''})".strip()
            try:
                plugin = ep.load()
            except Exception as exc:
                self._fail(PluginFailure(ep.value, _describe(exc), origin))
                continue
            self.register(plugin, origin=origin, label=ep.value)

    def _fail(self, failure: PluginFailure) -> None:
        """Record a failure once (the registry is rebuilt after each registration)."""
        if failure not in self.errors:
            self.errors.append(failure)

    def package_failures(self) -> list[PluginFailure]:
        """Installed packages (and built-ins) that failed to load: not the config's own."""
        return [f for f in self.errors if not f.where.startswith(DOTTED_ORIGIN)]

    def load_dotted(self, paths: Iterable[str], config: FlywheelConfig | None = None) -> None:
        """Load ``plugins:`` entries from YAML; each that fails is a line of
        ``dotted_problems`` naming its file, line and key path."""
        for index, path in enumerate(paths):
            where = config.where("plugins", index) if config is not None else f"plugins[{index}]"
            try:
                obj = _import_dotted(path)
            except ConfigError as exc:
                self.dotted_problems.append(f"{where}: {exc}")
                continue
            self.register(obj, origin=f"{DOTTED_ORIGIN} {path}", label=path)

    # -- the type registry ----------------------------------------------------------------

    def _collect(self) -> dict[str, dict[str, PluginInfo]]:
        types: dict[str, dict[str, PluginInfo]] = {kind: {} for kind in KIND_HOOKS}
        for kind, hook_name in KIND_HOOKS.items():
            base = PLUGIN_KINDS[kind]
            hook = getattr(self.pm.hook, hook_name)
            # get_hookimpls() lists the oldest registration first: built-ins win a name clash.
            for impl in hook.get_hookimpls():
                source = self._sources.get(impl.plugin_name, _Source("?", impl.plugin_name))
                try:
                    classes = impl.function() or []
                except Exception as exc:
                    self._fail(
                        PluginFailure(
                            impl.plugin_name, f"{hook_name}: {_describe(exc)}", source.origin
                        )
                    )
                    continue
                for cls in classes:
                    problem = _check_class(cls, base)
                    if problem:
                        self._fail(
                            PluginFailure(
                                impl.plugin_name, f"{hook_name}: {problem}", source.origin
                            )
                        )
                        continue
                    existing = types[kind].get(cls.type_name)
                    if existing is not None and existing.cls is not cls:
                        self._fail(
                            PluginFailure(
                                impl.plugin_name,
                                f"{kind} type {cls.type_name!r} is already provided by "
                                f"{existing.origin} ({existing.module}); ignoring this one",
                                source.origin,
                            )
                        )
                        continue
                    types[kind][cls.type_name] = PluginInfo(
                        kind=kind,
                        type_name=cls.type_name,
                        cls=cls,
                        origin=source.origin,
                        module=f"{cls.__module__}.{cls.__qualname__}",
                        description=cls.description or _first_line(cls.__doc__),
                    )
        return types

    def types(self, kind: str) -> dict[str, PluginInfo]:
        """Every registered class of ``kind`` ('filter', 'reward', ...) by its YAML type name."""
        if kind not in KIND_HOOKS:
            raise PluginError(f"unknown plugin kind {kind!r}; kinds: {', '.join(KIND_HOOKS)}")
        if self._types is None:
            self._types = self._collect()
        return self._types[kind]

    def all_plugins(self) -> list[PluginInfo]:
        return [info for kind in KIND_HOOKS for info in self.types(kind).values()]

    # -- building instances from YAML -----------------------------------------------------

    def build(
        self,
        kind: str,
        spec: PluginSpec | dict[str, Any],
        *,
        where: str | None = None,
        context: PluginContext | None = None,
        locate: Locate | None = None,
    ) -> Plugin:
        """One plugin instance from its spec. Errors (``PluginSpecError``) name the spec by
        ``locate`` (file, line and key path) or else by ``where`` (e.g. 'default mutator')."""
        if locate is None:
            prefix = where or f"{CONFIG_LISTS[kind]}[?]"

            def locate(*sub: str | int) -> str:
                return f"{prefix}.{key_path(sub)}" if sub else prefix

        spec, info, params = self.resolve(kind, spec, locate)
        try:
            plugin = info.cls(params, context)
        except (ConfigError, PluginError) as exc:  # the plugin's own check of its params
            raise PluginSpecError([f"{locate('params')}: {exc}"]) from None
        except Exception as exc:
            raise PluginSpecError(
                [f"{locate()}: could not create {kind} {spec.type!r}: {_describe(exc)}"]
            ) from exc
        plugin.name = spec.name or spec.type
        plugin.weight = spec.weight
        return plugin

    def resolve(
        self, kind: str, spec: PluginSpec | dict[str, Any], locate: Locate
    ) -> tuple[PluginSpec, PluginInfo, BaseModel]:
        """The spec's plugin class and validated params, without creating the plugin."""
        if isinstance(spec, dict):
            try:
                spec = PluginSpec.model_validate(spec)
            except ValidationError as exc:
                raise PluginSpecError(_params_errors(exc, locate, (), PluginSpec)) from None
        info = self.types(kind).get(spec.type)
        if info is None:
            raise PluginSpecError([self._unknown_type(kind, spec.type, locate("type"))])
        try:
            params = info.cls.Params.model_validate(spec.params)
        except ValidationError as exc:
            raise PluginSpecError(
                _params_errors(exc, locate, ("params",), info.cls.Params)
            ) from None
        return spec, info, params

    def _unknown_type(self, kind: str, name: str, where: str) -> str:
        """An unknown type, the valid ones, a near miss, and packages that did not load."""
        known = sorted(self.types(kind))
        text = f"{where}: unknown {kind} type {name!r}"
        close = difflib.get_close_matches(name, known, n=1)
        if close:
            text += f" (did you mean {close[0]!r}?)"
        text += f"; known {kind} types: {', '.join(known) or '(none installed)'}"
        broken = self.package_failures()
        if broken:
            names = ", ".join(sorted({f.name for f in broken}))
            text += f" (not loaded, see `flywheel plugins`: {names})"
        return text

    def build_all(
        self, kind: str, config: FlywheelConfig, context: PluginContext | None = None
    ) -> list[Plugin]:
        """The enabled plugins of ``kind`` from the configuration, in YAML order."""
        list_name = CONFIG_LISTS[kind]
        if context is None:
            context = PluginContext(config=config)
        out = []
        for index, spec in enumerate(getattr(config, list_name)):
            if spec.enabled:
                locate = functools.partial(config.where, list_name, index)
                out.append(self.build(kind, spec, context=context, locate=locate))
        return out

    # -- redaction ------------------------------------------------------------------------

    def redactor(
        self, config: FlywheelConfig | None = None
    ) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
        """A function that runs every ``redact_span`` hook and configured redactor on a row dict."""
        impls = list(self.pm.hook.redact_span.get_hookimpls())  # registration order
        redactors = self.build_all("redactor", config) if config is not None else []
        if not impls and not redactors:
            return None
        reported: set[str] = set()

        def redact(row: dict[str, Any]) -> dict[str, Any]:
            steps: list[tuple[str, Callable[..., Any]]] = [
                (impl.plugin_name, lambda r, f=impl.function: f(span=r)) for impl in impls
            ] + [(r.name, r.redact) for r in redactors]
            for name, fn in steps:
                try:
                    result = fn(row)
                except Exception as exc:
                    if name not in reported:
                        reported.add(name)
                        log.error(
                            "redactor %s failed: %s (row kept unredacted by it)",
                            name,
                            _describe(exc),
                        )
                    continue
                if isinstance(result, dict):
                    row = result
            return row

        return redact


def _import_dotted(path: str) -> Any:
    """The module or object ``pkg.mod``, ``pkg.mod:obj`` or ``pkg.mod.obj`` names."""
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        head, _, tail = module_name.rpartition(".")
        try:  # 'pkg.mod.object' written without a colon
            if attr or not head or exc.name != module_name:
                raise
            obj, attr = importlib.import_module(head), tail
            module_name = head
        except ImportError:
            raise ConfigError(f"cannot import {module_name!r}: {exc}") from None
    except Exception as exc:
        raise ConfigError(f"importing {module_name!r} failed: {_describe(exc)}") from None
    for part in filter(None, attr.split(".")):
        if not hasattr(obj, part):
            raise ConfigError(f"{module_name!r} has no attribute {part!r}")
        obj = getattr(obj, part)
    return obj


def _new_pluggy() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""


def _check_class(cls: Any, base: type) -> str | None:
    if not (isinstance(cls, type) and issubclass(cls, base)):
        return f"{cls!r} is not a subclass of {base.__name__}"
    if not cls.type_name:
        return f"{cls.__name__} has no type_name"
    if not (isinstance(cls.Params, type) and issubclass(cls.Params, BaseModel)):
        return f"{cls.__name__}.Params is not a pydantic model"
    return None


def _params_errors(
    exc: ValidationError, locate: Locate, prefix: tuple[str, ...], model: type[BaseModel]
) -> list[str]:
    lines = []
    for err in exc.errors():
        where = locate(*prefix, *err["loc"])
        if err["type"] == "extra_forbidden":
            lines.append(
                f"{where}: unknown key (valid keys: {', '.join(sorted(model.model_fields))})"
            )
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
            lines.append(f"{where}: {err['msg']}{shown}")
    return lines


# -- the process's manager ---------------------------------------------------------------------

_lock = threading.Lock()
_cache: dict[tuple[str, ...], FlywheelPluginManager] = {}


def plugin_manager(
    config: FlywheelConfig | None = None,
    *,
    fresh: bool = False,
    strict: bool = True,
    log_failures: bool = True,
) -> FlywheelPluginManager:
    """Built-ins + entry points + the config's ``plugins:`` (cached per config folder and list
    of dotted paths). ``strict``: a ``plugins:`` entry that does not import raises ConfigError
    (else it is in ``dotted_problems``); ``log_failures``: packages that failed to load are
    logged as warnings when the manager is made."""
    folder = _import_from(config.folder if config is not None else None)
    paths = tuple(config.plugins) if config is not None else ()
    key = (folder, *paths)
    with _lock:
        manager = None if fresh else _cache.get(key)
        if manager is None:
            manager = _new_manager(config, paths, log_failures)
            _cache[key] = manager
    if strict and manager.dotted_problems:
        raise PluginSpecError(manager.dotted_problems)
    return manager


def _new_manager(
    config: FlywheelConfig | None, paths: tuple[str, ...], log_failures: bool
) -> FlywheelPluginManager:
    manager = FlywheelPluginManager()
    manager.load_builtins()
    manager.load_entry_points()
    manager.load_dotted(paths, config)
    try:  # a @hookimpl whose name matches no hook is a typo worth reporting
        manager.pm.check_pending()
    except pluggy.PluginValidationError as exc:
        name = manager.pm.get_name(exc.plugin) or "?"
        origin = manager._sources.get(name, _Source("", name)).origin
        manager._fail(PluginFailure(name, f"unknown hook: {exc}", origin))
    if log_failures:
        for failure in manager.errors:
            log.warning("%s", failure)
    return manager


def _import_from(folder: Path | None) -> str:
    """Put a config file's folder at the end of ``sys.path`` (installed packages keep
    precedence), so ``plugins:`` and dotted-path params can name modules beside it."""
    if folder is None:
        return ""
    entry = str(folder)
    if entry not in sys.path:
        sys.path.append(entry)
        importlib.invalidate_caches()
    return entry


def reset_cache() -> None:
    """Forget managers (after installing a package in the same process)."""
    with _lock:
        _cache.clear()


def config_plugin_specs(
    config: FlywheelConfig,
) -> Iterator[tuple[str, tuple[Any, ...], PluginSpec]]:
    """Every plugin reference of the configuration: (kind, key path, spec)."""
    for kind, list_name in CONFIG_LISTS.items():
        for index, spec in enumerate(getattr(config, list_name)):
            yield kind, (list_name, index), spec
    # the regression gate's judges are reward sources, top-level and per workflow
    scopes = [((), config), *((("workflows", n), wf) for n, wf in config.workflows.items())]
    for prefix, scope in scopes:
        evaluation = getattr(scope, "evaluation", None)
        for index, spec in enumerate(getattr(evaluation, "judges", None) or []):
            yield "reward", (*prefix, "evaluation", "judges", index), spec


def check_config(config: FlywheelConfig, *, create: bool = True) -> list[str]:
    """Every problem with the configuration's own plugins, one line each naming the file,
    line and key path: ``plugins:`` entries that do not import or whose hooks fail, unknown
    types (with the valid ones), invalid params, and with ``create`` what the plugins' own
    checks refuse (a dotted-path param that does not import, an unsafe rule expression).
    Empty when all build. Installed packages the configuration does not use are not its
    problems (``package_failures``)."""
    manager = plugin_manager(config, strict=False)
    problems = list(manager.dotted_problems)
    for index, path in enumerate(config.plugins):
        for failure in manager.errors:
            if failure.where == f"{DOTTED_ORIGIN} {path}":
                problems.append(f"{config.where('plugins', index)}: {failure.error}")
    for kind, path, spec in config_plugin_specs(config):
        locate = functools.partial(config.where, *path)
        try:
            if create:
                manager.build(kind, spec, locate=locate).close()
            else:
                manager.resolve(kind, spec, locate)
        except PluginSpecError as exc:  # report every bad spec, not just the first
            problems.extend(exc.problems)
        except Exception as exc:
            problems.append(f"{config.where(*path)}: {_describe(exc)}")
    return problems


def require_valid_plugins(config: FlywheelConfig, *, create: bool = True) -> None:
    """Raise ConfigError listing ``check_config``'s problems, if any: every command checks
    types and params when it loads the file (``create=False``: no plugin module is imported
    beyond ``plugins:``), the loop also creates each plugin first, so a run never silently
    learns from nothing."""
    if config.plugins or any(True for _ in config_plugin_specs(config)):
        problems = check_config(config, create=create)
        if problems:
            raise PluginSpecError(problems)


def build_plugins(
    kind: str, config: FlywheelConfig, context: PluginContext | None = None
) -> list[Plugin]:
    """The configured, enabled plugins of one kind (the controller's one-call entry)."""
    return plugin_manager(config).build_all(kind, config, context)


def run_contained(
    plugin: Plugin | str, fn: Callable[[], Any], failures: list[PluginFailure], where: str = ""
) -> tuple[bool, Any]:
    """Call ``fn``; on an exception record a PluginFailure with the plugin's name, return (False, None)."""
    try:
        return True, fn()
    except Exception as exc:
        name = plugin if isinstance(plugin, str) else f"{plugin.kind} {plugin.name!r}"
        failure = PluginFailure(name, _describe(exc), where)
        failures.append(failure)
        log.error("%s", failure)
        return False, None


def third_party_entry_points(group: str = hookspecs.PROJECT) -> list[importlib.metadata.EntryPoint]:
    """The group's entry points other than our built-ins, without loading any of them."""
    return [
        ep for ep in importlib.metadata.entry_points(group=group) if ep.value not in BUILTIN_MODULES
    ]


def install_redaction(recorder: Any, config: FlywheelConfig) -> bool:
    """Add the redact_span hooks and ``redactors:`` to a recorder as a transform (True if any).

    The transform turns each record into a dict (with ``table``), redacts it, and copies the
    fields back, so hooks see plain data and never the recorder's internals. The default
    secret redactor is not a plugin: the recorder runs it where rows are built
    (``recording.secrets``), after this, leaving what a plugin redacted as it is.
    """
    if not (config.redactors or config.plugins or _cache or third_party_entry_points()):
        return False  # only the built-ins, which define no redact_span hook: nothing to load
    try:
        redact = plugin_manager(config).redactor(config)
    except Exception as exc:  # never break the recorder (the host agent) over a redactor
        log.error(
            "could not set up redaction plugins, rows are stored without them: %s", _describe(exc)
        )
        return False
    if redact is None:
        return False

    def transform(record: Any) -> None:
        row = {name: getattr(record, name, None) for name in record.COLUMNS}
        row["table"] = record.TABLE
        result = redact(row)
        for name in record.COLUMNS:
            if name in result:
                setattr(record, name, result[name])

    recorder.add_transform(transform)
    return True
