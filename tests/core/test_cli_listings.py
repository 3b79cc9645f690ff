"""What the CLI's listings show: ids a user can tell apart and pass on (whole or as an
unambiguous prefix), --json on every listing, text cut at a word with an ellipsis, and
`analyze` on a healthy workflow."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from flywheel_middleware.cli import main

# Two rollouts whose ids share a long prefix, as time-ordered ids recorded together do.
TWIN_A = "01a23c85239900000000000000000aaa"
TWIN_B = "01a23c85239900000000000000000bbb"
LONELY = "0fffffffffffffffffffffffffffffff"
LONG_COMMENT = " ".join(f"word{i:03d}" for i in range(80))  # 639 characters


def run(*args: str):
    return CliRunner().invoke(main, list(args), terminal_width=200)


@pytest.fixture
def recorded(fw, sqlite_url):
    for rid, question in (
        (TWIN_A, "[email] Where is order 42? Send the tracking link please"),
        (TWIN_B, "Cancel my plan"),
        (LONELY, "Hello"),
    ):
        with fw.rollout("support", rollout_id=rid, user_id="u1", input=question) as r:
            for node, kind in (("retriever", "retriever"), ("answerer", "llm")):
                with fw.span(node, kind=kind, node=node):
                    pass
            r.set_output({"role": "assistant", "content": f"answer to {question}"})
    fw.feedback(TWIN_B, rating=1, comment=LONG_COMMENT)
    fw.flush()
    return sqlite_url


def test_rollouts_show_whole_ids_and_normalized_text(recorded):
    out = run("rollouts", "--store", recorded).output
    assert TWIN_A in out and TWIN_B in out and LONELY in out
    assert "[email]" in out  # recorded text is shown, never read as markup
    rows = json.loads(run("rollouts", "--store", recorded, "--json").output)
    by_id = {r["id"]: r for r in rows}
    assert set(by_id) == {TWIN_A, TWIN_B, LONELY}
    assert by_id[TWIN_B]["question"] == "Cancel my plan"
    assert by_id[TWIN_B]["answer"] == "answer to Cancel my plan"  # the message's text, not JSON


def test_show_takes_a_unique_prefix_and_names_an_ambiguous_one(recorded):
    shared = "01a23c852399"
    result = run("show", shared, "--store", recorded)
    assert result.exit_code == 1
    assert f"ambiguous prefix '{shared}': 2 rollouts" in result.output
    assert TWIN_A in result.output and TWIN_B in result.output
    assert "Cancel my plan" in result.output  # each match with its question
    for rid in (TWIN_A, TWIN_B):
        unique = rid[:-2]
        result = run("show", unique, "--store", recorded)
        assert result.exit_code == 0, result.output
        assert f"support rollout {rid}" in result.output
    result = run("show", "0f", "--store", recorded)  # a short prefix is fine when only one has it
    assert result.exit_code == 0 and LONELY in result.output
    result = run("show", "abc", "--store", recorded)
    assert result.exit_code == 1
    assert "no rollout with id 'abc'" in result.output and "ambiguous" not in result.output


def test_a_narrow_console_shows_the_part_of_each_id_no_other_shares(recorded, monkeypatch):
    from flywheel_middleware.cli import common

    monkeypatch.setattr(common.console, "width", 100)
    out = run("rollouts", "--store", recorded).output
    assert TWIN_A not in out and TWIN_A[:30] in out and TWIN_B[:30] in out
    assert f"│ {LONELY[:8]} " in out  # 8 characters at least, more only where needed
    assert run("show", LONELY[:8], "--store", recorded).exit_code == 0


def test_implicit_features_take_prefixes_and_label_columns_apart(recorded):
    result = run("implicit", "features", TWIN_A[:-1], TWIN_B[:-1], "--store", recorded)
    assert result.exit_code == 0, result.output
    header = next(line for line in result.output.splitlines() if "┃ feature" in line)
    # the columns are the shortest parts that tell the two ids apart, not a common prefix
    assert TWIN_A[:30] in header and TWIN_B[:30] in header
    data = json.loads(
        run("implicit", "features", TWIN_A, LONELY[:4], "--store", recorded, "--json").output
    )
    assert set(data["rollouts"]) == {TWIN_A, LONELY}


@pytest.mark.parametrize(
    "args",
    [
        ["stats"],
        ["rollouts"],
        ["bad-cases"],
        ["analyze", "--all"],
        ["experiment", "list"],
        ["routing", "show"],
        ["plugins"],
        ["config", "show", "support"],
    ],
    ids=lambda a: " ".join(a),
)
def test_every_listing_prints_json(recorded, args, tmp_path):
    config = tmp_path / "flywheel.yaml"
    config.write_text("workflows:\n  support:\n    config: {llm: {temperature: 0.2}}\n")
    result = run(*args, "--config", str(config), "--store", recorded, "--json")
    assert result.exit_code == 0, result.output
    json.loads(result.output)


def test_cut_text_ends_at_a_word_with_an_ellipsis(recorded):
    out = " ".join(run("bad-cases", "--store", recorded).output.split())
    comment = out.split("comment: ", 1)[1].split("…", 1)[0]
    assert LONG_COMMENT.startswith(comment) and len(comment) <= 300
    assert LONG_COMMENT[len(comment)] == " "  # cut between two words


def test_analyze_shows_every_node_of_a_healthy_workflow(recorded):
    result = run("analyze", "--store", recorded)
    assert result.exit_code == 0, result.output
    assert "no hot problems" in result.output
    for node in ("(workflow)", "retriever", "answerer"):
        assert node in result.output
    assert "avg ms" in result.output and "p95 ms" in result.output and "errors" in result.output
    rows = json.loads(run("analyze", "--all", "--store", recorded, "--json").output)
    nodes = {r["node"]: r for r in rows}
    assert set(nodes) == {None, "retriever", "answerer"}
    assert nodes[None]["calls"] == 3 and nodes[None]["rated"] == 1
    assert nodes[None]["low_rating_rate"] == 1.0 and nodes[None]["breaches"] == []
    assert nodes["retriever"]["avg_latency_ms"] is not None
    assert json.loads(run("analyze", "--store", recorded, "--json").output) == []  # none hot
