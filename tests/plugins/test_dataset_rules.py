"""The consumers' rules for exported files: a good row passes, each broken rule is named."""

from __future__ import annotations

import json

import pytest

from flywheel_middleware.loop.dataset_rules import check_file, check_lines

GOOD_SFT = {
    "messages": [
        {"role": "system", "content": "You answer support questions."},
        {"role": "user", "content": "How do I delete my account?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "search_docs", "arguments": '{"q": "delete account"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Settings → Account → Delete"},
        {"role": "assistant", "content": "Open Settings → Account and choose Delete."},
    ],
    "tools": [
        {
            "type": "function",
            "function": {"name": "search_docs", "parameters": {"type": "object"}},
        }
    ],
}


def _problems(row: object, kind: str = "sft") -> list[str]:
    return [p.message for p in check_lines([json.dumps(row)], kind)]


def test_a_good_sft_row_with_tools_passes(tmp_path):
    path = tmp_path / "good.sft.jsonl"
    path.write_text(json.dumps(GOOD_SFT) + "\n" + json.dumps(GOOD_SFT) + "\n")
    assert check_file(path, "sft") == []


def _broken(change) -> dict:
    row = json.loads(json.dumps(GOOD_SFT))
    change(row)
    return row


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda r: r.update(rollout_id="x", reward=1.0), "top-level keys ['reward', 'rollout_id']"),
        (lambda r: r["messages"][1].update(content=""), "messages[1].content must be a non-empty"),
        (lambda r: r["messages"][1].update(role="human"), "role 'human'"),
        (
            lambda r: r["messages"][2]["tool_calls"][0].update(
                {"name": "search_docs", "args": {"q": 1}, "type": "tool_call"}
            ),
            "OpenAI's shape",
        ),
        (
            lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments={"q": 1}),
            "arguments must be a JSON string",
        ),
        (lambda r: r["messages"].pop(3), "'call_1' is never answered"),
        (lambda r: r.pop("tools"), "calls tools but the row has no 'tools'"),
        (lambda r: r["tools"][0]["function"].update(name="other"), "not declared in 'tools'"),
        (
            lambda r: r.update(messages=[{"role": "user", "content": "hi"}]),
            "no assistant message",
        ),
    ],
)
def test_each_broken_sft_rule_is_named(change, said):
    problems = _problems(_broken(change))
    assert any(said in p for p in problems), problems


def test_problems_name_their_line(tmp_path):
    path = tmp_path / "mixed.sft.jsonl"
    path.write_text(json.dumps(GOOD_SFT) + "\nnot json\n" + json.dumps({"messages": []}) + "\n")
    problems = check_file(path, "sft")
    assert [p.line for p in problems] == [2, 3]
    assert "not JSON" in str(problems[0]) and str(problems[1]).startswith("line 3:")


def test_preference_rows_in_openai_and_trl_shape():
    question = [{"role": "user", "content": "How do I delete my account?"}]
    good = [{"role": "assistant", "content": "Settings → Account → Delete."}]
    bad = [{"role": "assistant", "content": "Invoices are under Billing."}]
    openai_row = {
        "input": {"messages": question},
        "preferred_output": good,
        "non_preferred_output": bad,
    }
    trl_row = {"prompt": question, "chosen": good, "rejected": bad}
    assert _problems(openai_row, "preference") == []
    assert _problems(trl_row, "trl") == []
    assert any("same answer" in p for p in _problems({**trl_row, "rejected": good}, "trl"))
    assert any(
        "assistant messages only" in p
        for p in _problems({**openai_row, "preferred_output": question}, "preference")
    )
    assert any("not allowed" in p for p in _problems({**trl_row, "margin": 0.5}, "trl"))


def test_export_check_from_the_command_line(tmp_path):
    from click.testing import CliRunner

    from flywheel_middleware.cli import main

    good = tmp_path / "good.sft.jsonl"
    good.write_text(json.dumps(GOOD_SFT) + "\n")
    bad = tmp_path / "bad.sft.jsonl"
    bad.write_text(json.dumps({**GOOD_SFT, "reward": 1.0}) + "\n")
    runner = CliRunner()
    ok = runner.invoke(main, ["export", "sft", "--check", str(good)])
    assert ok.exit_code == 0 and "every row follows the sft rules" in ok.output
    failed = runner.invoke(main, ["export", "sft", "--check", str(bad)])
    assert failed.exit_code == 1
    assert "line 1: top-level keys ['reward']" in " ".join(failed.output.split())
    missing = runner.invoke(main, ["export", "sft"])
    assert missing.exit_code == 2 and "--workflow and --out" in missing.output


# -- the rest of OpenAI's data-format guide, and tools ------------------------------------------


def _message(i: int, **change) -> object:
    """GOOD_SFT with message ``i`` changed (a key set to None is removed)."""

    def apply(row: dict) -> None:
        row["messages"][i].update(change)
        for key in [k for k, v in change.items() if v is None]:
            del row["messages"][i][key]

    return apply


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda r: r.pop("messages"), "'messages' must be a non-empty list"),
        (_message(1, role=None), "role None, not one of system, user, assistant, tool"),
        (_message(0, role="developer"), "role 'developer'"),
        (_message(1, content=None), "messages[1].content must be a non-empty string"),
        (_message(4, content=[{"type": "text", "text": "hi"}]), "messages[4].content must be"),
        (_message(1, content=[]), "messages[1].content is an empty list"),
        (_message(1, content=[{"type": "text", "text": " "}]), "a text part without text"),
        (_message(1, content=[{"type": "image_url"}]), "an image part without image_url.url"),
        (_message(1, content=[{"type": "audio"}]), "must be a text or image_url part"),
        (_message(1, extra=1), "messages[1]: key 'extra' is not one a message may have"),
        (_message(4, function_call={"name": "f"}), "deprecated format: use 'tool_calls'"),
        (lambda r: r.update(functions=[]), "deprecated function-calling format: use 'tools'"),
        (_message(1, weight=1), "messages[1].weight is only for assistant messages"),
        (_message(4, weight=0.5), "messages[4].weight must be 0 or 1"),
        (
            lambda r: [m.update(weight=0) for m in r["messages"] if m["role"] == "assistant"],
            "every assistant message has weight 0",
        ),
        (_message(1, name=""), "messages[1].name must be a non-empty string"),
        (_message(1, tool_calls=[]), "only assistant messages call tools"),
        (_message(1, tool_call_id="call_1"), "tool_call_id belongs on tool messages only"),
        (_message(3, tool_call_id=None), "a tool message without a tool_call_id"),
        (_message(3, tool_call_id="call_9"), "answers 'call_9', which no earlier call asked"),
        (
            lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="[1, 2]"),
            "arguments must encode a JSON object",
        ),
        (
            lambda r: r["messages"][2]["tool_calls"][0]["function"].update(name="search docs"),
            "name 'search docs' is not [A-Za-z0-9_-]{1,64}",
        ),
        (
            lambda r: r["messages"][2]["tool_calls"].append(r["messages"][2]["tool_calls"][0]),
            "tool call id 'call_1' is used twice",
        ),
        (
            lambda r: r["messages"].insert(3, {"role": "assistant", "content": "Looking it up."}),
            "tool call 'call_1' is never answered before messages[3]",
        ),
        (lambda r: r["tools"][0].pop("type"), "tools[0] must have type 'function'"),
        (lambda r: r["tools"][0]["function"].pop("name"), "tools[0].function.name must be"),
        (
            lambda r: r["tools"][0]["function"].update(parameters="object"),
            "tools[0].function.parameters must be a JSON schema object",
        ),
        (lambda r: r.update(tools={"search_docs": {}}), "'tools' must be a list"),
        (lambda r: r.update(parallel_tool_calls="yes"), "'parallel_tool_calls' must be true"),
    ],
)
def test_each_rule_of_the_openai_guide_is_named(change, said):
    problems = _problems(_broken(change))
    assert any(said in p for p in problems), problems


def test_what_the_openai_guide_allows_passes():
    """Image parts in a user turn, weights, a name, parallel calls answered in any order."""
    row = _broken(lambda r: None)
    row["messages"][1] = {
        "role": "user",
        "name": "ana",
        "content": [
            {"type": "text", "text": "What does this error mean?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/error.png"}},
        ],
    }
    calls = row["messages"][2]["tool_calls"]
    calls.append({**calls[0], "id": "call_2"})
    row["messages"][2].pop("content")  # OpenAI's own examples leave it out
    row["messages"][3:3] = [{"role": "tool", "tool_call_id": "call_2", "content": "none"}]
    row["messages"][-1]["weight"] = 1
    row["parallel_tool_calls"] = True
    assert _problems(row) == []
    assert _problems({"messages": GOOD_SFT["messages"][:2] + GOOD_SFT["messages"][-1:]}) == []


def test_rows_that_are_not_objects_and_empty_files(tmp_path):
    assert [p.message for p in check_lines(["[1, 2]\n"], "sft")] == [
        "a row must be a JSON object, not list"
    ]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert [str(p) for p in check_file(empty, "tasks")] == ["line 0: the file holds no rows"]
    with pytest.raises(ValueError, match="no rules for 'csv'"):
        list(check_lines([], "csv"))


# -- AgentJet tasks and Agent Lightning triplets -----------------------------------------------

GOOD_TASK = {
    "main_query": "How do I delete my account?",
    "init_messages": [{"role": "system", "content": "You answer support questions."}],
    "task_id": "r-1",
    "env_type": "support_qa",
    "metadata": {
        "answer": "Open Settings → Account and choose Delete.",
        "qa_hash": "ab12",
        "rollout_id": "r-1",
        "reward": 1.0,
        "split": "train",
    },
}

GOOD_TRIPLET = {
    "prompt": "How do I delete my account?",
    "response": "Open Settings → Account and choose Delete.",
    "reward": 0.75,
    "metadata": {"rollout_id": "r-1", "config_version_id": 3, "workflow": "support_qa"},
}


def _changed(good: dict, change) -> dict:
    row = json.loads(json.dumps(good))
    change(row)
    return row


def test_good_tasks_and_triplets_pass(tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    second = {**GOOD_TASK, "task_id": "r-2", "init_messages": []}
    tasks.write_text(json.dumps(GOOD_TASK) + "\n" + json.dumps(second) + "\n")
    assert check_file(tasks, "tasks") == []
    unrated = {k: v for k, v in GOOD_TRIPLET.items() if k != "reward"}
    tokens = {"prompt": {"token_ids": [1, 2]}, "response": {"token_ids": [3]}, "reward": None}
    for row in (GOOD_TRIPLET, unrated, tokens, {**GOOD_TRIPLET, "metadata": {"turn": 1}}):
        assert _problems(row, "triplets") == [], row


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda r: r.pop("main_query"), "'main_query' must be a non-empty string"),
        (lambda r: r.update(main_query="  "), "'main_query' must be a non-empty string"),
        (lambda r: r.update(task_id=7), "'task_id' must be a non-empty string"),
        (lambda r: r.pop("env_type"), "'env_type' must be a non-empty string"),
        (lambda r: r.update(answer="x"), "top-level keys ['answer'] are not allowed"),
        (lambda r: r.update(init_messages={"role": "system"}), "'init_messages' must be a list"),
        (lambda r: r["init_messages"][0].pop("content"), "init_messages[0].content must be"),
        (lambda r: r["init_messages"][0].update(role="sys"), "init_messages[0] has role 'sys'"),
        (lambda r: r.update(metadata="answer: x"), "'metadata' must be an object"),
        (lambda r: r["metadata"].update(answer=""), "'metadata.answer' must be a non-empty"),
        (lambda r: r["metadata"].update(reward="high"), "'metadata.reward' must be a number"),
        (lambda r: r["metadata"].update(split="test"), "'metadata.split' must be train or"),
    ],
)
def test_each_broken_task_rule_is_named(change, said):
    problems = _problems(_changed(GOOD_TASK, change), "tasks")
    assert any(said in p for p in problems), problems


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda r: r.pop("prompt"), "'prompt' is missing"),
        (lambda r: r.update(response=" "), "'response' is empty"),
        (lambda r: r.update(response={}), "'response' is empty"),
        (lambda r: r.update(reward="1"), "'reward' must be a number or null, not '1'"),
        (lambda r: r.update(reward=True), "'reward' must be a number or null, not True"),
        (lambda r: r.update(metadata=[]), "'metadata' must be an object"),
        (
            lambda r: r["metadata"].update(rollout_id=""),
            "'metadata.rollout_id' must be a non-empty string",
        ),
        (lambda r: r.update(score=1), "keys ['score'] are not fields of Agent Lightning's"),
        (lambda r: r.update(rollout_id="r-1"), "keys ['rollout_id'] are not fields of Agent"),
    ],
)
def test_each_broken_triplet_rule_is_named(change, said):
    problems = _problems(_changed(GOOD_TRIPLET, change), "triplets")
    assert any(said in p for p in problems), problems


def test_a_reward_that_is_not_a_finite_number_is_named():
    """Python's json reads NaN, which no trainer can use as a reward."""
    line = json.dumps(GOOD_TRIPLET).replace("0.75", "NaN")
    [problem] = check_lines([line], "triplets")
    assert "'reward' must be a number or null, not nan" in problem.message


def test_a_task_id_used_twice_names_both_lines(tmp_path):
    path = tmp_path / "tasks.jsonl"
    other = {**GOOD_TASK, "task_id": "r-2"}
    path.write_text("\n".join(json.dumps(t) for t in (GOOD_TASK, other, GOOD_TASK)) + "\n")
    assert [str(p) for p in check_file(path, "tasks")] == [
        "line 3: task_id 'r-1' is already the id of line 1"
    ]


@pytest.mark.parametrize(
    ("kind", "good", "bad", "said"),
    [
        ("tasks", GOOD_TASK, {**GOOD_TASK, "main_query": ""}, "'main_query' must be a non-empty"),
        ("triplets", GOOD_TRIPLET, {**GOOD_TRIPLET, "reward": "ok"}, "'reward' must be a number"),
    ],
)
def test_check_tasks_and_triplets_from_the_command_line(tmp_path, kind, good, bad, said):
    from click.testing import CliRunner

    from flywheel_middleware.cli import main

    path = tmp_path / f"x.{kind}.jsonl"
    path.write_text(json.dumps(good) + "\n")
    ok = CliRunner().invoke(main, ["export", kind, "--check", str(path)])
    assert ok.exit_code == 0 and f"every row follows the {kind} rules" in ok.output, ok.output
    path.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    failed = CliRunner().invoke(main, ["export", kind, "--check", str(path)])
    assert failed.exit_code == 1
    assert f"line 2: {said}" in " ".join(failed.output.split()), failed.output


def test_a_file_not_in_utf8_names_its_line_on_the_command_line(tmp_path):
    """A file saved as Latin-1 (a spreadsheet's export): each such line is named, the rest
    are still checked, and the command exits 1 with no traceback."""
    from click.testing import CliRunner

    from flywheel_middleware.cli import main

    good = json.dumps(GOOD_SFT, ensure_ascii=False)
    latin1 = json.dumps({**GOOD_SFT, "reward": 1.0}, ensure_ascii=False).replace("→", "é")
    path = tmp_path / "latin1.sft.jsonl"
    path.write_bytes(f"{good}\n".encode() + f"{latin1}\n".encode("latin-1") + b"[1]\n")
    assert [str(p) for p in check_file(path, "sft")] == [
        f"line 2: not UTF-8 (byte 0xe9 at byte {latin1.index('é') + 1} of the line): the file "
        "must be saved as UTF-8",
        "line 3: a row must be a JSON object, not list",
    ]
    failed = CliRunner().invoke(main, ["export", "sft", "--check", str(path)])
    assert failed.exit_code == 1, failed.output
    said = " ".join(failed.output.split())
    assert "line 2: not UTF-8" in said and "2 problems" in said, said


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_tool_arguments_with_constants_strict_json_rejects_are_named(constant):
    """Python's json reads NaN and Infinity; JSON (RFC 8259) and OpenAI's parser do not."""
    arguments = f'{{"q": "delete account", "limit": {constant}}}'
    row = _broken(
        lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments=arguments)
    )
    assert _problems(row) == [
        f"messages[2].tool_calls[0].function.arguments holds {constant}, which is not JSON "
        "(RFC 8259): strict parsers such as OpenAI's reject it"
    ]
