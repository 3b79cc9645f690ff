"""Mutators: param stays inside the declared space and never repeats; prompt_rewrite keeps placeholders."""

from __future__ import annotations

import pytest
from flywheel_middleware.plugins.mutators import (
    PromptRewriteMutator,
    in_space,
    placeholders,
    space_values,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.language_models.fake_chat_models import FakeListChatModel

from flywheel_middleware.capture.records import utcnow
from flywheel_middleware.config import TunableRange
from flywheel_middleware.loop.versions import config_hash, get_path
from flywheel_middleware.plugin_system.base import Sample
from flywheel_middleware.plugin_system.manager import plugin_manager
from flywheel_middleware.store.models import Feedback, Rollout

from .helpers import BASE, make_config

TUNABLE = {
    "llm.temperature": TunableRange(min=0.0, max=1.0, step=0.1),
    "rag.top_k": TunableRange(choices=[2, 3, 4, 5]),
    "nodes.qa_agent.enabled": TunableRange(choices=[True, False]),
}


def _param(seed=0):
    return plugin_manager(make_config()).build(
        "mutator", {"type": "param", "params": {"seed": seed}}
    )


def test_param_stays_in_the_space_and_never_repeats_until_exhausted():
    mutator = _param()
    base = {**BASE, "llm": {"model": "m", "temperature": 0.3}}
    tried = {config_hash(base)}
    seen = []
    while True:
        batch = mutator.propose(
            base, workflow="qa", tunable=TUNABLE, bad_cases=[], tried=tried, n=7
        )
        if not batch:
            break
        for cand in batch:
            h = config_hash(cand.config)
            assert h not in tried  # never a config already tried
            tried.add(h)
            seen.append(cand.config)
            for path, spec in TUNABLE.items():
                assert in_space(get_path(cand.config, path), spec), (path, cand.config)
            assert cand.config["llm"]["model"] == "m"  # untouched keys stay
    # the whole space is 11 × 4 × 2 = 88 points, the base is one of them
    assert len(seen) == 87
    assert len({config_hash(c) for c in seen}) == 87


def test_param_proposes_neighbours_first_and_is_seeded():
    a = _param(seed=3).propose(BASE, workflow="qa", tunable=TUNABLE, bad_cases=[], tried=set(), n=4)
    b = _param(seed=3).propose(BASE, workflow="qa", tunable=TUNABLE, bad_cases=[], tried=set(), n=4)
    assert [c.config for c in a] == [c.config for c in b]
    for cand in a:  # one change each, to a neighbouring value
        changed = [p for p in TUNABLE if get_path(cand.config, p) != get_path(BASE, p)]
        assert len(changed) == 1
        if changed == ["llm.temperature"]:
            assert get_path(cand.config, "llm.temperature") in (pytest.approx(0.8), 1.0)


@settings(max_examples=40, deadline=None)
@given(
    lo=st.integers(0, 20),
    width=st.integers(1, 30),
    step=st.sampled_from([0.5, 1, 2, 3, 0.25]),
    start=st.integers(0, 60),
)
def test_numeric_grid_respects_bounds_and_steps(lo, width, step, start):
    spec = TunableRange(min=lo, max=lo + width, step=step)
    values = space_values(spec)
    assert values[0] == lo and values[-1] <= lo + width
    assert all(abs((v - lo) / step - round((v - lo) / step)) < 1e-9 for v in values)
    base = {"x": {"y": values[start % len(values)]}}
    out = _param().propose(
        base, workflow="w", tunable={"x.y": spec}, bad_cases=[], tried=set(), n=3
    )
    for cand in out:
        assert in_space(cand.config["x"]["y"], spec)
        assert cand.config["x"]["y"] != base["x"]["y"]


def _bad_case(text, comment):
    rollout = Rollout(id="r" * 32, workflow="qa", input=text, output="wrong", started_at=utcnow())
    fb = Feedback(
        rollout_id=rollout.id, key="rating", value=1, comment=comment, created_at=utcnow()
    )
    return Sample(rollout=rollout, feedback=[fb])


def test_prompt_rewrite_keeps_placeholders_with_a_langchain_model():
    template = "You help customers of {company}. Context: {context}"
    model = FakeListChatModel(
        responses=[
            "You help customers. Context: {context}",  # lost {company}: discarded
            "You help {company} customers. {extra} Context: {context}",  # added {extra}: discarded
            "```\nYou help customers of {company}. Answer only from {context}.\n```",
        ]
    )
    params = PromptRewriteMutator.Params(path="prompts.system", retries=0)
    mutator = PromptRewriteMutator(params, chat_model=model)
    base = {"prompts": {"system": template}}
    out = mutator.propose(
        base, workflow="qa", tunable={}, bad_cases=[_bad_case("hi", "made up")], tried=set(), n=1
    )
    assert len(out) == 1
    new = out[0].config["prompts"]["system"]
    assert new == "You help customers of {company}. Answer only from {context}."
    assert placeholders(new) == {"company", "context"}
    assert [r["reason"] for r in mutator.rejected] == [
        "placeholders lost ['company'] added []",
        "placeholders lost [] added ['extra']",
    ]


def test_prompt_rewrite_over_the_openai_protocol(openai_server):
    openai_server.enqueue("Be precise about {topic}; cite the policy.")
    config = make_config(
        mutators=[
            {
                "type": "prompt_rewrite",
                "params": {
                    "path": "p",
                    "base_url": openai_server.base_url,
                    "api_key_env": "FW_TEST_KEY",
                    "retries": 0,
                },
            }
        ]
    )
    import os

    os.environ["FW_TEST_KEY"] = "sk-test"
    mutator = plugin_manager(config).build_all("mutator", config)[0]
    out = mutator.propose(
        {"p": "Talk about {topic}."},
        workflow="qa",
        tunable={},
        bad_cases=[_bad_case("q", "the reviewer said: vague")],
        tried=set(),
        n=1,
    )
    assert out[0].config == {"p": "Be precise about {topic}; cite the policy."}
    sent = openai_server.requests[-1].body["messages"][-1]["content"]
    assert "the reviewer said: vague" in sent and "Talk about {topic}." in sent


def test_prompt_rewrite_names_a_bad_path():
    mutator = PromptRewriteMutator(
        PromptRewriteMutator.Params(path="nope.x"), chat_model=FakeListChatModel(responses=["x"])
    )
    with pytest.raises(ValueError, match="'nope.x'.*not a string"):
        mutator.propose({"a": 1}, workflow="qa", tunable={}, bad_cases=[], tried=set(), n=1)


def test_param_does_not_repeat_a_config_that_differs_only_as_1_vs_1_0(store):
    """YAML's ``temperature: 1`` and the grid's ``1.0`` are one config, tried once."""
    from flywheel_middleware.loop import versions

    tunable = {"t": TunableRange(min=0, max=1, step=0.5), "k": TunableRange(choices=[2, 3])}
    base = {"t": 1, "k": 2}  # on the grid, written as an int
    mutator = _param()
    tried = {config_hash(base)}
    seen = []
    while batch := mutator.propose(
        base, workflow="w", tunable=tunable, bad_cases=[], tried=tried, n=3
    ):
        for cand in batch:
            tried.add(config_hash(cand.config))
            seen.append(cand.config)
    # 3 × 2 points, the base is one: five candidates, none equal to another or to the base
    assert len(seen) == 5
    as_numbers = [(float(c["t"]), c["k"]) for c in seen]
    assert len(set(as_numbers)) == 5 and (1.0, 2) not in as_numbers
    # and "tried" from the store counts a version written with 1.0 as tried for 1
    versions.create_version(store, "w", {"t": 1.0, "k": 3})
    stored = versions.tried_hashes(store, "w")
    out = mutator.propose(base, workflow="w", tunable=tunable, bad_cases=[], tried=stored, n=10)
    assert {"t": 1, "k": 3} not in [c.config for c in out] and len(out) == 4


def test_param_with_many_tunables_samples_combinations_instead_of_listing_them():
    tunable = {f"p{i}": TunableRange(choices=list(range(8))) for i in range(12)}
    base = {f"p{i}": 0 for i in range(12)}
    mutator = plugin_manager(make_config()).build(
        "mutator", {"type": "param", "params": {"max_changes": 5}}
    )
    # 12 × 7 single moves, 3,234 valid pairs; C(84, 4) ≈ 1.9·10⁶ and C(84, 5) ≈ 3·10⁷
    # combinations would not fit in memory and time if listed
    tried = {config_hash(base)}
    singles = mutator.propose(base, workflow="w", tunable=tunable, bad_cases=[], tried=tried, n=84)
    tried |= {config_hash(c.config) for c in singles}
    out = mutator.propose(base, workflow="w", tunable=tunable, bad_cases=[], tried=tried, n=3300)
    assert len(out) == 3300
    sizes = [sum(cand.config[k] != base[k] for k in base) for cand in out]
    assert sizes.count(2) == 3234 and all(3 <= n <= 5 for n in sizes[3234:])
    assert len({config_hash(c.config) for c in out}) == 3300
    assert not {config_hash(c.config) for c in out} & tried
