"""The cycle's Markdown report shows what curation did as tables, never as a raw dict."""

from __future__ import annotations

from datetime import datetime, timezone

from flywheel_middleware.loop.controller import CycleReport


def test_routing_weights_and_datasets_are_markdown_tables():
    report = CycleReport(
        mode="suggest",
        started_at=datetime(2026, 1, 2, tzinfo=timezone.utc),
        workflows=["qa"],
        curation={
            "rewards": "3 rollouts scored",
            "routing": {
                "routed_rollouts": 12,
                "rewarded": 10,
                "weights": {"billing_desk/billing": 0.8147, "generalist/*": 0.5},
            },
            "datasets": {"out/qa.sft.jsonl": {"rows": 40, "skipped": 2}},
        },
    )
    text = report.to_markdown()
    assert "{" not in text.split("## 2.")[1].split("## 3.")[0]  # no dict anywhere in curation
    assert "routing weights updated from 12 routed rollouts (10 with a reward)" in text
    assert "| agent/skill | weight |" in text and "| billing_desk/billing | 0.815 |" in text
    assert "| `out/qa.sft.jsonl` | 40 | skipped: 2 |" in text
