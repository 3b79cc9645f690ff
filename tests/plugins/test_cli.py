"""The curation commands end to end: rewards, export, analyze (CliRunner, real store)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from flywheel_middleware.cli import main
from flywheel_middleware.loop.datasets import ExportError, export

from .helpers import record


def run(*args: str):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result


def test_rewards_export_analyze(fw, sqlite_url, tmp_path) -> None:
    ids = [record(fw, f"q{i % 4}", f"answer {i}", rating=1 + i % 5) for i in range(12)]
    record(fw, "broken", None, fail=True)
    fw.flush()
    cfg = tmp_path / "flywheel.yaml"
    cfg.write_text(
        f"store: {{url: '{sqlite_url}'}}\n"
        "rewards: [{type: explicit_rating}]\n"
        "analysis: {min_calls: 5, error_rate_max: 0.01}\n"
    )
    base = ["--config", str(cfg)]

    result = run("rewards", *base, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["rollouts"] == 13 and summary["rewarded"] == 12
    assert summary["sources"]["explicit_rating"]["n"] == 12

    out = tmp_path / "t.jsonl"
    result = run("export", "triplets", *base, "-w", "qa", "--out", str(out), "--min-reward", "0.5")
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6  # ratings 3, 4, 5 (twice each) -> reward >= 0.5
    assert all(r["reward"] >= 0.5 and r["metadata"]["rollout_id"] in ids for r in rows)
    assert f"wrote 6 rows to {out}" in " ".join(result.output.split())

    result = run(
        "export",
        "tasks",
        *base,
        "-w",
        "qa",
        "--out",
        str(tmp_path / "tasks.jsonl"),
        "--val-fraction",
        "0.5",
        "--seed",
        "3",
        "--json",
    )
    info = json.loads(result.output)
    # one task per question (q0..q3, each has an answer rated 3+); the six rated 1 or 2 are out
    assert info["count"] == 4 and set(info["paths"]) == {"train", "validation"}
    assert info["counts"]["train"] + info["counts"]["validation"] == 4 and info["bad"] == 6
    tasks = tmp_path / "all.jsonl"
    result = run(
        "export", "tasks", *base, "-w", "qa", "--out", str(tasks), "--all-answers", "--keep-bad"
    )
    assert result.exit_code == 0, result.output
    assert (
        len(tasks.read_text().splitlines())
        + len((tmp_path / "all.val.jsonl").read_text().splitlines())
        == 12
    )

    result = run(
        "export",
        "preference",
        *base,
        "-w",
        "qa",
        "--out",
        str(tmp_path / "p.jsonl"),
        "--since",
        "tomorrow",
    )
    assert result.exit_code != 0 and "--since 'tomorrow'" in result.output

    result = run("analyze", *base, "--json")
    hot = json.loads(result.output)
    [row] = [h for h in hot if h["node"] is None]
    assert row["workflow"] == "qa" and row["calls"] == 13
    assert any(b.startswith("error rate") for b in row["breaches"])
    result = run("analyze", *base, "--all")
    assert result.exit_code == 0 and "qa" in result.output and "(workflow)" in result.output


def test_export_under_a_file_names_the_file_not_a_traceback(fw, sqlite_url, tmp_path) -> None:
    record(fw, "Where is my invoice?", "Under Billing.", rating=5)
    assert fw.flush(10)
    (tmp_path / "datasets").write_text("not a folder")
    for out in (tmp_path / "datasets" / "qa.jsonl", tmp_path / "datasets" / "sub" / "qa.jsonl"):
        result = run("export", "sft", "--store", sqlite_url, "-w", "qa", "-o", str(out))
        assert result.exit_code == 1, result.output
        said = " ".join(result.output.split())
        assert f"{tmp_path / 'datasets'} is a file, not a folder" in said, said
    good = tmp_path / "new" / "qa.jsonl"  # a missing folder is made
    result = run("export", "sft", "--store", sqlite_url, "-w", "qa", "-o", str(good))
    assert result.exit_code == 0 and len(good.read_text().splitlines()) == 1, result.output


@pytest.mark.parametrize("option", ["--bad-below", "--min-reward", "--min-margin"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_thresholds_that_are_not_finite_numbers_are_refused(
    fw, sqlite_url, tmp_path, option, value
) -> None:
    """NaN compares false with every reward: as --bad-below it would keep bad-rated rows."""
    record(fw, "Where is my invoice?", "Made up.", rating=1)
    assert fw.flush(10)
    out = tmp_path / "s.jsonl"
    kind = "preference" if option == "--min-margin" else "sft"
    result = run("export", kind, "--store", sqlite_url, "-w", "qa", "-o", str(out), option, value)
    assert result.exit_code == 2 and not out.exists(), result.output
    assert f"'{value}' is not a finite number" in result.output, result.output


@pytest.mark.parametrize("threshold", ["bad_below", "min_reward", "min_margin"])
def test_export_in_python_refuses_a_nan_threshold(fw, tmp_path, threshold) -> None:
    record(fw, "Where is my invoice?", "Made up.", rating=1)
    assert fw.flush(10)
    out = tmp_path / "s.jsonl"
    with pytest.raises(ExportError, match=f"{threshold} must be a finite number, got nan"):
        export(fw.get_store(), "sft", "qa", out, **{threshold: float("nan")})
    assert not out.exists()
