"""A plugin loaded by dotted path whose filter always raises (to show containment)."""

from flywheel_middleware import hookimpl
from flywheel_middleware.plugin_system.base import Filter


class AlwaysFails(Filter):
    type_name = "always_fails"

    def filter(self, samples):
        raise RuntimeError("filter exploded")


@hookimpl
def register_filters():
    return [AlwaysFails]
