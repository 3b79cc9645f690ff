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
