"""YAML configuration, validated with pydantic; errors name the file, the key path and the line.

``${ENV_VAR}`` (or ``${ENV_VAR:-default}``) in any string value is replaced from the environment,
so secrets stay out of the file. A workflow's ``config`` keeps its references as written: it is
stored as config versions and served over HTTP, so its values are filled in only where the
agent uses it (``expand_env``, by the resolver of the agent's process).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from flywheel_middleware.errors import ConfigError

DEFAULT_CONFIG_PATH = "flywheel.yaml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StoreConfig(_Strict):
    url: str = "sqlite:///flywheel.db"
    queue_size: int = Field(100_000, ge=100)
    batch_size: int = Field(2_000, ge=1)
    flush_interval: float = Field(0.2, gt=0)
    # the journal's folder (default: beside a SQLite file, else under $XDG_STATE_HOME/flywheel)
    spill_dir: str | None = None
    # how long exit and SIGTERM wait for the store; the journal keeps what it has not taken
    exit_timeout: float = Field(10.0, ge=0)
    # who writes rows: a child process on a SQLite file ("auto"), or a thread
    writer: Literal["auto", "process", "thread"] = "auto"
    # "journal": every record on local disk within journal_interval seconds, so a crash
    # loses at most that; "memory": the journal only past max_buffer_mb or at exit
    durability: Literal["journal", "memory"] = "journal"
    journal_interval: float = Field(0.05, gt=0, le=5)
    max_buffer_mb: float = Field(64, gt=0)
    # journal on SIGTERM/SIGINT before the application's own handler (or the default) runs
    handle_signals: bool = True


class OtelConfig(_Strict):
    """Mirroring into OpenTelemetry: off unless asked for, so an application's own OTel SDK
    (an APM, Langfuse) does not slow every recorded call down."""

    emit: bool = False


class TunableRange(_Strict):
    """A parameter mutators may explore: a numeric range with a step, or a list of choices."""

    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _one_shape(self) -> TunableRange:
        numeric = self.min is not None or self.max is not None
        if self.choices is not None and numeric:
            raise ValueError("give either min/max/step or choices, not both")
        if self.choices is None:
            if self.min is None or self.max is None:
                raise ValueError("a numeric tunable needs both min and max")
            if self.min > self.max:
                raise ValueError(f"min ({self.min}) is greater than max ({self.max})")
            if self.step is not None and self.step <= 0:
                raise ValueError("step must be positive")
        elif not self.choices:
            raise ValueError("choices must not be empty")
        return self


class ErrorBudget(_Strict):
    """P(any false promotion over a workflow's whole life) ≤ ``level``, spent over its
    experiments (``loop.error_control``); a candidate whose share is below ``min_alpha`` is not
    promoted: the budget is spent."""

    level: float = Field(0.05, gt=0, lt=0.5)
    min_alpha: float = Field(1e-4, gt=0, lt=0.5)

    @model_validator(mode="after")
    def _floor_below_level(self) -> ErrorBudget:
        if self.min_alpha >= self.level:
            raise ValueError(f"min_alpha ({self.min_alpha:g}) must be below level ({self.level:g})")
        return self


class ExperimentSettings(_Strict):
    unit: Literal["user_id", "session_id", "request"] = "user_id"
    candidate_traffic: float = Field(0.05, gt=0, le=0.5)
    max_candidates: int = Field(2, ge=1, le=10)
    min_samples: int = Field(100, ge=1)
    # null: no loop-level control (each experiment gets the promoter's alpha afresh)
    error_budget: ErrorBudget | None = Field(default_factory=ErrorBudget)


class Guardrails(_Strict):
    latency_ratio_max: float = Field(1.2, gt=0)
    error_rate_max_increase: float = Field(0.01, ge=0)
    cost_ratio_max: float | None = Field(None, gt=0)


class Objective(_Strict):
    metric: Literal["positive_feedback_rate", "mean_reward", "success_rate"] = (
        "positive_feedback_rate"
    )
    guardrails: Guardrails = Field(default_factory=Guardrails)


_RUNNER = re.compile(r"[A-Za-z_][\w.]*(:[A-Za-z_][\w.]*)?")


class EvaluationConfig(_Strict):
    """The pre-live regression gate (seed 000's verify stage): each candidate runs on the
    validation tasks plus recent bad cases through ``runner`` before it gets any traffic, and
    is dropped if its judged mean is below the baseline's by more than ``margin``."""

    runner: str = Field(
        description="'pkg.module:function' or an entry point of group flywheel_middleware.runners;"
        " called as runner(config, input) and returns the answer"
    )
    judges: list[PluginSpec] = Field(
        default_factory=list,
        description="reward sources that score the answers (default: the rewards: list)",
    )
    margin: float = Field(0.05, ge=0, le=1, description="tolerated drop of the mean score")
    max_cases: int = Field(50, ge=1, le=10_000)
    min_cases: int = Field(
        5, ge=1, description="fewer judged cases: no verdict, the candidate goes on unverified"
    )
    bad_case_days: float = Field(7, gt=0, description="how far back bad cases are taken")

    @field_validator("runner")
    @classmethod
    def _runner_shape(cls, value: str) -> str:
        if not _RUNNER.fullmatch(value.strip()):
            raise ValueError(
                f"{value!r} is neither a dotted path like 'mypkg.agent:run' nor an entry point name"
            )
        return value.strip()


class WorkflowConfig(_Strict):
    config: dict[str, Any] = Field(default_factory=dict)
    tunable: dict[str, TunableRange] = Field(default_factory=dict)
    experiment: ExperimentSettings = Field(default_factory=ExperimentSettings)
    objective: Objective = Field(default_factory=Objective)
    # overrides the top-level evaluation: for this workflow
    evaluation: EvaluationConfig | None = None


class PluginSpec(_Strict):
    """One plugin selected by ``type``, the shape of the seeds' ASTune config."""

    type: str
    enabled: bool = True
    name: str | None = None
    weight: float = Field(1.0, ge=0)
    params: dict[str, Any] = Field(default_factory=dict)


class LowRatingTrigger(_Strict):
    """Fire when low ratings among the last ``window`` rollouts reach ``threshold``."""

    window: int = Field(50, ge=1)
    threshold: int = Field(10, ge=1)
    max_rating: float = Field(2, ge=1, le=5)


class TriggersConfig(_Strict):
    low_rating: LowRatingTrigger = Field(default_factory=LowRatingTrigger)


class AnalysisConfig(_Strict):
    """The thresholds that make a (workflow, node) group a hot problem."""

    since_minutes: float = Field(60, gt=0)
    min_calls: int = Field(50, ge=1)
    latency_ms_max: float = Field(3000, gt=0)
    error_rate_max: float = Field(0.05, ge=0, le=1)
    low_rating_rate_max: float = Field(0.2, ge=0, le=1)
    implicit_satisfaction_min: float = Field(0.5, ge=0, le=1)


class ControllerConfig(_Strict):
    mode: Literal["suggest", "experiment", "auto"] = "suggest"
    every: str = "10m"
    report_dir: str = "flywheel-reports"
    dataset_dir: str | None = None


_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*")
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """'90d', '2w', '12h', '10m', '30s' or plain seconds → seconds (ValueError otherwise)."""
    match = _DURATION.fullmatch(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a duration like 30s, 10m, 12h, 90d or 2w")
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"the interval must be positive, got {text!r}")
    return seconds


MAX_RETENTION_SECONDS = 100 * 365 * 86_400


class RetentionConfig(_Strict):
    """How long the growing tables keep their rows: rollouts, spans, feedback and telemetry
    older than ``keep`` go, except what running experiments need. ``flywheel run`` prunes
    daily when it is set; ``flywheel db prune`` takes it as its default age."""

    keep: str | None = Field(
        None,
        description="an age like 90d or 12w, pruned daily by flywheel run; unset keeps everything",
    )

    @field_validator("keep")
    @classmethod
    def _is_duration(cls, value: str | None) -> str | None:
        if value is not None and parse_duration(value) > MAX_RETENTION_SECONDS:
            raise ValueError(f"{value!r} is longer than 100 years; leave keep unset to keep all")
        return value


class ServiceConfig(_Strict):
    """``api_keys`` may write and read; ``read_keys`` may only read (the dashboard, the resolver)."""

    api_keys: list[str] = Field(default_factory=list)
    read_keys: list[str] = Field(default_factory=list)
    cors_origins: list[str] = Field(default_factory=list)
    max_body_bytes: int = Field(256_000, ge=1024)
    max_batch_events: int = Field(500, ge=1)
    # free-form JSON (feedback metadata, telemetry payloads): checked before any validation
    max_json_depth: int = Field(64, ge=2, le=200)
    max_json_keys: int = Field(1_000, ge=1, description="keys in one JSON object")
    max_json_items: int = Field(10_000, ge=1, description="JSON values in one body")


class AgentSpec(_Strict):
    id: str
    skills: list[str] = Field(default_factory=list)
    capacity: int = Field(10, ge=1)


class RoutingConfig(_Strict):
    agents: list[AgentSpec] = Field(default_factory=list)
    floor: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="each eligible agent's least probability (at most 1/n), even at capacity: "
        "the exploration that lets flywheel evaluate estimate other routing policies",
    )
    load_penalty: float = Field(0.5, ge=0)
    weight_min: float = 0.1
    weight_max: float = 2.0


class ResolverConfig(_Strict):
    """How each process serves configs: ``FLYWHEEL_RESOLVER_TTL`` overrides ``ttl``."""

    ttl: float = Field(2.0, gt=0, description="seconds a process keeps a deployment cached")
    forced: dict[str, str] = Field(
        default_factory=dict, description="workflow -> variant served to every request (QA)"
    )


class RedactionConfig(_Strict):
    """The default secret redactor: API keys, bearer tokens and values under credential-named
    keys become ``[REDACTED]`` before a record is stored. ``secrets: false`` turns it off."""

    secrets: bool = True
    patterns: list[str] = Field(
        default_factory=list,
        description="extra regular expressions whose matches are redacted (group 1 is kept)",
    )
    keys: list[str] = Field(
        default_factory=list,
        description="extra key names whose values are redacted (also as a name's _suffix)",
    )

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from None
        return value


class ImplicitConfig(_Strict):
    min_labels: int = Field(50, ge=2)
    positive_rating: float = Field(4, ge=1, le=5)


class FlywheelConfig(_Strict):
    """The whole ``flywheel.yaml``."""

    store: StoreConfig = Field(default_factory=StoreConfig)
    workflows: dict[str, WorkflowConfig] = Field(default_factory=dict)
    filters: list[PluginSpec] = Field(default_factory=list)
    rewards: list[PluginSpec] = Field(default_factory=list)
    mutators: list[PluginSpec] = Field(default_factory=list)
    promoters: list[PluginSpec] = Field(default_factory=list)
    redactors: list[PluginSpec] = Field(default_factory=list)
    redaction: RedactionConfig = Field(default_factory=RedactionConfig)
    plugins: list[str] = Field(default_factory=list, description="dotted paths of extra plugins")
    triggers: TriggersConfig = Field(default_factory=TriggersConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)
    controller: ControllerConfig = Field(default_factory=ControllerConfig)
    service: ServiceConfig = Field(default_factory=ServiceConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    resolver: ResolverConfig = Field(default_factory=ResolverConfig)
    implicit: ImplicitConfig = Field(default_factory=ImplicitConfig)
    otel: OtelConfig = Field(default_factory=OtelConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    evaluation: EvaluationConfig | None = None

    def evaluation_for(self, workflow: str) -> EvaluationConfig | None:
        """The regression gate settings of ``workflow``: its own, else the top-level ones."""
        wf = self.workflows.get(workflow)
        return (wf.evaluation if wf is not None else None) or self.evaluation

    @field_validator("workflows")
    @classmethod
    def _names(cls, value: dict[str, WorkflowConfig]) -> dict[str, WorkflowConfig]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9_.\-]{1,200}", name):
                raise ValueError(f"workflow name {name!r} may use letters, digits, '_', '-', '.'")
        return value

    _source: str | None = PrivateAttr(default=None)
    _lines: dict[tuple[Any, ...], int] = PrivateAttr(default_factory=dict)
    _folder: Path | None = PrivateAttr(default=None)

    @property
    def source(self) -> str | None:
        """The file (or label) this configuration was read from."""
        return self._source

    @property
    def folder(self) -> Path | None:
        """The folder of the file this configuration was read from (None if not a file):
        dotted-path plugins next to ``flywheel.yaml`` import from there."""
        return self._folder

    def line_of(self, *path: str | int) -> int | None:
        """The line of the YAML file that holds ``path`` (e.g. ``"rewards", 0, "type"``)."""
        return _line_at(self._lines, path)

    def where(self, *path: str | int) -> str:
        """``file, line N: rewards[0].type``: how a message names the value at ``path``."""
        line = self.line_of(*path)
        source = self._source or "configuration"
        at = f"{source}, line {line}" if line else source
        return f"{at}: {key_path(path)}" if path else at


# -- loading with line numbers ------------------------------------------------------------

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _LineLoader(yaml.SafeLoader):
    """A safe loader that remembers the line of every mapping key."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict[str, Any]:
    loader.flatten_mapping(node)
    mapping: dict[Any, Any] = {}
    lines: dict[Any, int] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in mapping:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice")
        mapping[key] = loader.construct_object(value_node, deep=True)
        lines[key] = key_node.start_mark.line + 1
    return _LinedDict(mapping, lines)


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> list[Any]:
    items = [loader.construct_object(child, deep=True) for child in node.value]
    return _LinedList(items, [child.start_mark.line + 1 for child in node.value])


class _LinedDict(dict):
    __slots__ = ("lines",)

    def __init__(self, data: dict, lines: dict) -> None:
        super().__init__(data)
        self.lines = lines


class _LinedList(list):
    """A YAML sequence that remembers the line of each item."""

    __slots__ = ("lines",)

    def __init__(self, items: list, lines: list[int]) -> None:
        super().__init__(items)
        self.lines = lines


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


class MissingEnvError(ConfigError):
    """A ``${VAR}`` reference to an environment variable that is not set (``name`` says which)."""

    def __init__(self, message: str, name: str) -> None:
        super().__init__(message)
        self.name = name


def expand_env(
    value: Any,
    where: str = "configuration",
    on_missing: Callable[[MissingEnvError], None] | None = None,
) -> Any:
    """``value`` with every ``${VAR}`` / ``${VAR:-default}`` in its strings filled in from the
    environment (containers are copied). An unset variable without a default raises
    ``MissingEnvError`` naming it and ``where``; with ``on_missing`` it is passed there instead
    and the reference is left as written."""
    if isinstance(value, str):
        if "${" not in value:
            return value

        def sub(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in os.environ:
                return os.environ[name]
            if default is not None:
                return default
            error = MissingEnvError(f"{where}: environment variable {name} is not set", name)
            if on_missing is None:
                raise error
            on_missing(error)
            return match.group(0)

        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: expand_env(v, where, on_missing) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, where, on_missing) for v in value]
    return value


def _interpolate(value: Any, where: str, path: tuple[Any, ...] = ()) -> Any:
    """The parsed YAML with ``${VAR}`` filled in, except inside a workflow's ``config``: that
    is stored and served, so it keeps the reference (the agent's resolver fills it in)."""
    if len(path) == 3 and path[0] == "workflows" and path[2] == "config":
        return value
    if isinstance(value, dict):
        items = {k: _interpolate(v, where, (*path, k)) for k, v in value.items()}
        return _LinedDict(items, value.lines) if isinstance(value, _LinedDict) else items
    if isinstance(value, list):
        items = [_interpolate(v, where, path) for v in value]
        return _LinedList(items, value.lines) if isinstance(value, _LinedList) else items
    return expand_env(value, where)


def _key_lines(data: Any, path: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], int]:
    """The line of every key and sequence item of the parsed YAML, by key path."""
    out: dict[tuple[Any, ...], int] = {}
    if isinstance(data, dict):
        lines = data.lines if isinstance(data, _LinedDict) else {}
        children: Any = data.items()
    elif isinstance(data, list):
        lines = dict(enumerate(data.lines)) if isinstance(data, _LinedList) else {}
        children = enumerate(data)
    else:
        return out
    for key, value in children:
        if key in lines:
            out[(*path, key)] = lines[key]
        out.update(_key_lines(value, (*path, key)))
    return out


def _line_at(lines: dict[tuple[Any, ...], int], loc: tuple[Any, ...]) -> int | None:
    """The line of ``loc``, or of the nearest enclosing key the file has."""
    for end in range(len(loc), 0, -1):
        line = lines.get(tuple(loc[:end]))
        if line is not None:
            return line
    return None


def key_path(loc: tuple[Any, ...]) -> str:
    """``("rewards", 0, "params", "alpha")`` as ``rewards[0].params.alpha``."""
    text = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
    return text.lstrip(".") or "(top level)"


def _valid_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    """The keys allowed at the mapping that holds ``loc[-1]``."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            if hasattr(current, "__args__"):
                args = [
                    a for a in current.__args__ if isinstance(a, type) and issubclass(a, BaseModel)
                ]
                current = args[0] if args else None
            if current is None:
                return None
        field = current.model_fields.get(part) if isinstance(current, type) else None
        if field is None:
            # a dict[str, Model]: the part is a free name (a workflow), stay on the value type
            continue
        annotation = field.annotation
        sub = _model_in(annotation)
        if sub is None:
            return None
        current = sub
    if isinstance(current, type) and issubclass(current, BaseModel):
        return sorted(current.model_fields)
    return None


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _format_errors(exc: ValidationError, key_lines: dict[tuple[Any, ...], int], source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        path = key_path(loc)
        line = _line_at(key_lines, loc)
        where = f"{source}, line {line}" if line else source
        if err["type"] == "extra_forbidden":
            valid = _valid_keys(FlywheelConfig, loc)
            hint = f" (valid keys here: {', '.join(valid)})" if valid else ""
            lines.append(f"{where}: unknown key {path!r}{hint}")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
            lines.append(f"{where}: {path}: {err['msg']}{shown}")
    return "invalid flywheel configuration:\n  " + "\n  ".join(lines)


def parse_config(text: str, source: str = "<string>") -> FlywheelConfig:
    """Validate YAML text; raises ConfigError with the source, key path and line."""
    try:
        data = yaml.load(text, Loader=_LineLoader)  # noqa: S506 (a SafeLoader subclass)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    data = _interpolate(data, source)
    key_lines = _key_lines(data)
    try:
        config = FlywheelConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, key_lines, source)) from None
    config._source = source
    config._lines = key_lines
    return config


def load_config(
    path: str | os.PathLike[str] | None = None, *, required: bool = False
) -> FlywheelConfig:
    """Read ``path`` (default ``$FLYWHEEL_CONFIG`` or ``./flywheel.yaml``); defaults if absent."""
    chosen = Path(path or os.environ.get("FLYWHEEL_CONFIG") or DEFAULT_CONFIG_PATH)
    if not chosen.exists():
        if required or path is not None:
            raise ConfigError(f"configuration file {str(chosen)!r} does not exist")
        return FlywheelConfig()
    config = parse_config(chosen.read_text(encoding="utf-8"), source=str(chosen))
    config._folder = chosen.resolve().parent
    return config


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> FlywheelConfig:
    try:
        config = FlywheelConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, {}, source)) from None
    config._source = source
    return config
