"""The resolver: which workflow config serves this request.

This core version serves the workflow's configured config (version 1 from YAML); the loop
adds versions, deployments and experiments behind the same ``resolve`` call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Resolution:
    """The config chosen for one request, and how it was chosen (for offline evaluation)."""

    config: dict[str, Any]
    version_id: int | None = None
    experiment_id: int | None = None
    variant: str | None = None
    propensity: float | None = None


class StaticResolver:
    """Serves each workflow's configured config; used until versions exist."""

    def __init__(self, workflows: dict[str, Any]) -> None:
        self._configs = {name: wf.config for name, wf in workflows.items()}

    def resolve(self, workflow: str, unit_id: str | None = None) -> Resolution | None:
        config = self._configs.get(workflow)
        if config is None:
            return None
        return Resolution(config=config, propensity=1.0)
