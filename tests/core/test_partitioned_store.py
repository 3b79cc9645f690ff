"""A new PostgreSQL store is partitioned by time from the start, and everything records and
reads through it as through plain tables."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from click.testing import CliRunner

from flywheel_middleware.cli import main
from flywheel_middleware.store import partitions
from flywheel_middleware.store.database import Store


@pytest.mark.postgres
def test_a_new_postgres_store_records_and_reads_through_its_partitions(postgres_url):
    import flywheel_middleware as fw

    fw.configure(store_url=postgres_url, writer="thread")
    try:
        with fw.rollout("qa", input="How long is the warranty?") as answer:
            with fw.span("search_docs", kind="tool", input={"q": "warranty"}):
                pass
            with fw.span("chat", kind="llm", model="gpt-test") as llm:
                llm.set_usage(11, 22)
                with fw.span("cite", kind="tool"):
                    pass
            answer.set_output("Two years.")
        fw.feedback(answer.id, rating=5)
        assert fw.flush()
    finally:
        fw.shutdown()

    store = Store(postgres_url)
    week = f"p{partitions.period_start(datetime.now(timezone.utc), 'week'):%Y%m%d}"
    where = {
        table: [
            (row.part, row.n)
            for row in store.execute(
                f"SELECT tableoid::regclass::text AS part, count(*) AS n FROM {table} GROUP BY 1"
            )
        ]
        for table in ("rollout", "span", "feedback")
    }
    assert where == {
        "rollout": [(f"rollout_{week}", 1)],
        "span": [(f"span_{week}", 3)],
        "feedback": [(f"feedback_{week}", 1)],
    }
    store.dispose()

    result = CliRunner().invoke(main, ["show", answer.id, "--store", postgres_url])
    assert result.exit_code == 0, result.output
    assert "tool search_docs" in result.output and "model=gpt-test" in result.output
    assert "feedback [explicit] rating=5" in result.output
