"""Built-in filters: the rubric judge over real HTTP, json_schema and dedupe."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel

from flywheel_middleware.config import parse_config
from flywheel_middleware.errors import ConfigError
from flywheel_middleware.plugin_system.base import PluginContext
from flywheel_middleware.plugin_system.manager import plugin_manager
from flywheel_middleware.store.models import Span
from flywheel_middleware.testing.openai_server import OpenAIServer

from .helpers import sample


def judge_reply(request) -> str:
    """GOOD for questions about cats, BAD for dogs, garbage for anything else."""
    user = request.body["messages"][-1]["content"]
    if "cat" in user:
        return '{"verdict": "GOOD", "reason": "answers the question"}'
    if "dog" in user:
        return "BAD: the answer is wrong"
    return "I like turtles"


def build_rubric(base_url: str, **params):
    cfg = parse_config("filters:\n  - type: llm_rubric\n    params: {}\n", source="flywheel.yaml")
    cfg.filters[0].params = {"base_url": base_url, "model": "judge", "retry_wait": 0, **params}
    [rubric] = plugin_manager(cfg).build_all("filter", cfg, PluginContext(config=cfg))
    return rubric


def test_rubric_verdicts_garbage_and_concurrency_bound() -> None:
    questions = ["cat?", "dog?", "turtle?"] * 6
    samples = [sample(f"r{i}", q, f"answer {i}") for i, q in enumerate(questions)]
    with OpenAIServer() as server:
        server.set_responder(judge_reply)
        server.delay = 0.05
        rubric = build_rubric(
            server.base_url,
            max_concurrency=4,
            temperature=0.5,
            custom_rubrics="Answers must mention the animal.",
        )
        verdicts = rubric.filter(samples)
    assert [v.label for v in verdicts] == ["good", "bad", "error"] * 6
    assert [v.keep for v in verdicts] == [True, False, False] * 6  # on_error: drop (default)
    assert verdicts[0].reason == "answers the question"
    assert verdicts[1].reason == "the answer is wrong"
    assert "malformed judge answer" in verdicts[2].reason
    assert len(server.requests) == 18
    # really concurrent, never above the limit (counted by the server itself)
    assert 2 <= server.max_in_flight <= 4
    body = server.requests[0].body
    assert body["temperature"] == 0.5
    assert "Answers must mention the animal." in body["messages"][0]["content"]
    assert "language" in body["messages"][0]["content"]  # the default reviewer prompt is there


def test_rubric_on_error_keep_and_unreachable_endpoint() -> None:
    with OpenAIServer() as server:
        server.set_responder(judge_reply)
        rubric = build_rubric(server.base_url, on_error="keep", max_thread=2)
        assert rubric.params.max_concurrency == 2  # the seeds' max_thread spelling
        [v] = rubric.filter([sample("r1", "turtle?", "x")])
    assert (v.label, v.keep) == ("error", True)
    # server gone: every sample is an error verdict, no exception
    [v] = rubric.filter([sample("r2", "cat?", "x")])
    assert v.label == "error" and "judge request failed" in v.reason


def test_rubric_inside_running_loop_and_langchain_model(capsys: pytest.CaptureFixture) -> None:
    from flywheel_middleware.plugins.filters import LlmRubric

    model = FakeListChatModel(responses=['{"verdict":"BAD","reason":"off topic"}'])
    rubric = LlmRubric(LlmRubric.Params(print_reason=True), chat_model=model)

    async def main():
        return rubric.filter([sample("r1", "q", "a")])  # sync call from async code

    [v] = asyncio.run(main())
    assert (v.label, v.keep, v.reason) == ("bad", False, "off topic")
    assert "r1 BAD: off topic" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("GOOD", ("good", "")),
        ("bad - wrong answer", ("bad", "wrong answer")),
        ('```json\n{"verdict": "good", "reason": "ok"}\n```', ("good", "ok")),
        ("Verdict: BAD. Irrelevant.", ("bad", "Irrelevant.")),
        ("GOOD or BAD? hard to say", None),
        ('{"verdict": "maybe"}', None),
        ("The answer is not good", None),
        ("", None),
    ],
)
def test_parse_judgement(text: str, expected) -> None:
    from flywheel_middleware.plugins.filters import parse_judgement

    assert parse_judgement(text) == expected


def test_json_schema_on_output_and_span(tmp_path) -> None:
    from datetime import datetime, timezone

    from flywheel_middleware.plugins.filters import JsonSchema

    schema = {
        "type": "object",
        "required": ["answer"],
        "properties": {"answer": {"type": "string"}},
    }
    f = JsonSchema(JsonSchema.Params.model_validate({"schema": schema}))
    good = sample("a", "q", {"answer": "yes"})
    as_string = sample("b", "q", '{"answer": "yes"}')
    wrong_type = sample("c", "q", {"answer": 3})
    not_json = sample("d", "q", "plain words")
    verdicts = f.filter([good, as_string, wrong_type, not_json])
    assert [v.keep for v in verdicts] == [True, True, False, False]
    assert "answer" in verdicts[2].reason and "string" in verdicts[2].reason
    assert verdicts[3].reason == "output is not valid JSON"

    now = datetime.now(timezone.utc)
    by_span = JsonSchema(JsonSchema.Params.model_validate({"schema": schema, "span": "extract"}))
    s1 = sample("e", "q", "free text")
    s1.spans = [Span(id=1, rollout_id="e", name="extract", output={"answer": "x"}, started_at=now)]
    s2 = sample("f", "q", {"answer": "x"})
    [v1, v2] = by_span.filter([s1, s2])
    assert v1.keep and not v2.keep and "no span named 'extract'" in v2.reason

    with pytest.raises(ConfigError, match="not a valid JSON Schema"):
        JsonSchema(JsonSchema.Params.model_validate({"schema": {"type": "nonsense"}}))


def test_dedupe_keeps_first_across_batches() -> None:
    from flywheel_middleware.plugins.filters import Dedupe

    d = Dedupe()
    v = d.filter([sample("a", "q", "x"), sample("b", "q", "x"), sample("c", "q", "y")])
    assert [x.keep for x in v] == [True, False, True]
    assert v[1].reason == "duplicate of rollout a"
    [again] = d.filter([sample("d", "q", "y")])
    assert not again.keep and "rollout c" in again.reason
    norm = Dedupe(Dedupe.Params(normalize=True, fields=["output"]))
    v = norm.filter([sample("a", "q1", "Hello  World"), sample("b", "q2", "hello world")])
    assert [x.keep for x in v] == [True, False]
