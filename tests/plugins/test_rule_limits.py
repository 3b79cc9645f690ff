"""``rule`` expressions under hostile input: every bomb ends fast, costs only its own sample a
score, and the other samples of the batch keep theirs."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from flywheel_middleware.config import parse_config
from flywheel_middleware.errors import ConfigError
from flywheel_middleware.loop.rewards import compute_rewards

from .helpers import record

BOMB_OUTPUT = "a" * 40 + "!"  # the one sample each bomb goes off on

BOMBS = {  # each would score its sample (a bool) if it ran without limits
    "format width": 'len("%0100000000d" % 1) > 0',
    "bytes repetition": 'len(b"x" * 100000000) > 0',
    "list repetition": "len([output_text] * 10000000) > 0",
    "concatenation": "len(output_text * 30000 + output_text * 30000) > 0",
    "mapping format": 'len("%(a)s%(a)s%(a)s" % {"a": output_text}) > 0',
    "integer product": 'int("9" * 4000) * int("9" * 4000) > 0',
    "nested generator": (
        "sum(1 for a in output_text * 3 for b in output_text * 3 for c in output_text * 3) > 0"
    ),
    "sum of lists": "len(sum([[1] * 1000 for c in output_text * 30], [])) > 0",
    "catastrophic regex": 'regex("^(a|aa)+$", output_text)',
    "regex from the data": "regex(output_text * 100, output_text)",
}


def _rule_config(expression: str) -> str:
    # the bomb only where the output is BOMB_OUTPUT; elsewhere a plain length test
    guarded = f'({expression}) if output_text == "{BOMB_OUTPUT}" else len(output_text) > 3'
    return f"rewards:\n  - type: rule\n    name: r\n    params: {{expression: '{guarded}'}}\n"


def _within(seconds: float, fn):
    """``fn()``'s result, failing (not hanging) if it takes longer than ``seconds``."""
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(out=fn()), daemon=True)
    started = time.monotonic()
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds}s"
    return box["out"], time.monotonic() - started


@pytest.mark.parametrize("bomb", list(BOMBS), ids=list(BOMBS))
def test_a_bomb_costs_only_its_own_sample_a_score(fw, caplog, bomb):
    good = record(fw, "q1", "a long enough answer")
    short = record(fw, "q2", "ab")
    bad = record(fw, "q3", BOMB_OUTPUT)
    fw.flush()
    config = parse_config(_rule_config(BOMBS[bomb].replace("'", "''")))
    with caplog.at_level(logging.WARNING, logger="flywheel_middleware.plugins.rewards"):
        run, took = _within(20, lambda: compute_rewards(fw.get_store(), config))
    assert took < 10
    assert run.failures == []
    assert run[bad].sources == {"r": None}
    assert run[good].sources == {"r": 1.0} and run[short].sources == {"r": 0.0}
    assert f"no score for 1 of 3 samples: {bad}" in caplog.text


def test_an_exception_on_one_sample_spares_the_others(fw):
    ok = record(fw, "q1", "fine answer")
    broken = record(fw, "q2", "zero")
    fw.flush()
    config = parse_config(
        "rewards:\n  - type: rule\n    name: r\n"
        "    params: {expression: '1 / (len(output_text) - 4) > 0'}\n"
    )
    run = compute_rewards(fw.get_store(), config)
    assert run.failures == []
    assert run[ok].sources == {"r": 1.0} and run[broken].sources == {"r": None}


def test_the_time_limit_is_a_parameter(fw):
    slow = record(fw, "q", "x" * 400)
    fw.flush()
    expression = "sum(1 for a in output_text for b in output_text for c in output_text) > 0"
    quick = parse_config(
        f"rewards:\n  - type: rule\n    name: r\n"
        f"    params: {{expression: '{expression}', time_limit: 0.05}}\n"
    )
    run, took = _within(20, lambda: compute_rewards(fw.get_store(), quick))
    assert run[slow].sources == {"r": None} and took < 5


def test_small_repetition_and_formatting_still_work():
    from flywheel_middleware.plugins.rewards import EXPRESSION_NAMES, SafeExpression

    expr = SafeExpression(
        '"-" * 3 + "%05.1f" % latency_ms == "---012.5" and len([1, 2] * 4) == 8',
        EXPRESSION_NAMES,
    )
    assert expr({"latency_ms": 12.5}) is True
    assert SafeExpression('regex("^a+$", output_text)', EXPRESSION_NAMES)({"output_text": "aaa"})


@pytest.mark.parametrize(
    ("expression", "why"),
    [
        ("-" * 200 + "1", "nests deeper than"),
        ("any(1 for a in spans for b in spans for c in spans for d in spans)", "nested 'for'"),
        ("any(any(1 for a in spans for b in spans) for c in spans for d in spans)", "nested"),
    ],
)
def test_expressions_too_deep_are_refused_at_load(expression, why):
    from flywheel_middleware.plugins.rewards import EXPRESSION_NAMES, SafeExpression

    with pytest.raises(ConfigError, match=why):
        SafeExpression(expression, EXPRESSION_NAMES)
