"""The resolver: which workflow config serves this request.

This core version serves the workflow's configured config (version 1 from YAML); the loop
adds versions, deployments and experiments behind the same ``resolve`` call.
"""

from __future__ import annotations

import copy
from typing import Any

import orjson

_FIELDS = ("version_id", "experiment_id", "variant", "propensity")


class Resolution:
    """The config chosen for one request, and how it was chosen (for offline evaluation).

    Resolvers hand the same ``Resolution`` to many requests, so ``config`` gives every caller
    a fresh copy (decoded from the JSON kept at construction, about a microsecond): a request
    that edits its config never changes what the next request — or the version — is.
    Immutable; ``replace`` derives one with other fields and the same config.
    """

    __slots__ = ("_json", "_other", *_FIELDS)

    version_id: int | None
    experiment_id: int | None
    variant: str | None
    propensity: float | None

    def __init__(
        self,
        config: dict[str, Any],
        version_id: int | None = None,
        experiment_id: int | None = None,
        variant: str | None = None,
        propensity: float | None = None,
    ) -> None:
        raw: bytes | None
        try:
            raw = orjson.dumps(config)
            if orjson.loads(raw) != config:  # tuples, NaN, datetimes: not exact as JSON
                raw = None
        except (TypeError, ValueError):
            raw = None
        setattr_ = object.__setattr__
        setattr_(self, "_json", raw)
        setattr_(self, "_other", None if raw is not None else copy.deepcopy(config))
        setattr_(self, "version_id", version_id)
        setattr_(self, "experiment_id", experiment_id)
        setattr_(self, "variant", variant)
        setattr_(self, "propensity", propensity)

    @property
    def config(self) -> dict[str, Any]:
        """A private copy of the chosen config (edit it freely)."""
        if self._json is not None:
            return orjson.loads(self._json)
        return copy.deepcopy(self._other)

    def replace(self, **changes: Any) -> Resolution:
        """The same config with other version/experiment/variant/propensity fields."""
        unknown = set(changes) - set(_FIELDS)
        if unknown:
            raise TypeError(f"Resolution has no field(s) {sorted(unknown)}")
        out = object.__new__(Resolution)
        setattr_ = object.__setattr__
        setattr_(out, "_json", self._json)
        setattr_(out, "_other", self._other)
        for name in _FIELDS:
            setattr_(out, name, changes.get(name, getattr(self, name)))
        return out

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Resolution is immutable (cannot set {name!r})")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Resolution is immutable (cannot delete {name!r})")

    def _key(self) -> tuple[Any, ...]:
        return (self.config, *(getattr(self, f) for f in _FIELDS))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Resolution):
            return NotImplemented
        return self._key() == other._key()

    __hash__ = None  # type: ignore[assignment]  # holds a dict, like the dataclass it replaced

    def __reduce__(self) -> tuple[Any, ...]:
        return (Resolution, (self.config, *(getattr(self, f) for f in _FIELDS)))

    def __repr__(self) -> str:
        fields = ", ".join(f"{f}={getattr(self, f)!r}" for f in _FIELDS)
        return f"Resolution(config={self.config!r}, {fields})"


class StaticResolver:
    """Serves each workflow's configured config; used until versions exist."""

    def __init__(self, workflows: dict[str, Any]) -> None:
        self._resolutions = {
            name: Resolution(config=wf.config, propensity=1.0) for name, wf in workflows.items()
        }

    def resolve(self, workflow: str, unit_id: str | None = None) -> Resolution | None:
        return self._resolutions.get(workflow)
