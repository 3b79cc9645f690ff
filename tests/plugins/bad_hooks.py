"""A plugin (loaded by dotted path) with one hook that raises and one that works."""

from flywheel_middleware import hookimpl
from flywheel_middleware.plugin_system.base import RewardSource


class Constant(RewardSource):
    type_name = "constant_half"

    def score(self, samples):
        return [0.5 for _ in samples]


@hookimpl
def register_filters():
    raise RuntimeError("cannot list my filters")


@hookimpl
def register_reward_sources():
    return [Constant, object]


class _Hooks:
    """Hooks on an object (registered by a dotted path to the object)."""

    class Halves(Constant):
        type_name = "halves"

    @hookimpl
    def register_reward_sources(self):
        return [self.Halves]


HOOKS = _Hooks()


@hookimpl
def register_filter():  # a typo: the hook is register_filters
    return []
