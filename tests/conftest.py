"""Shared fixtures: stores on real SQLite and real PostgreSQL, and a configured runtime."""

from __future__ import annotations

import os
import pickle
import uuid
from collections.abc import Iterator

import pytest

# The CLI's piped output is 160 columns unless COLUMNS says otherwise; pytest-xdist's workers
# set COLUMNS=80, so the suite says it once for every worker and every process it starts.
os.environ["COLUMNS"] = "160"

POSTGRES_ENV = "FLYWHEEL_TEST_POSTGRES_URL"
POSTGRES_SKIP = (
    f"PostgreSQL tests need a server: set {POSTGRES_ENV}="
    "postgresql+psycopg://postgres@127.0.0.1:5432/test (.ci/run does this)"
)


@pytest.fixture(autouse=True)
def _isolated_journal(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Journals of one test never leak into another (nor into the user's state folder)."""
    monkeypatch.setenv("FLYWHEEL_SPILL_DIR", str(tmp_path_factory.mktemp("spill")))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))
    monkeypatch.delenv("FLYWHEEL_STORE_URL", raising=False)
    monkeypatch.delenv("FLYWHEEL_CONFIG", raising=False)


def postgres_base_url() -> str | None:
    return os.environ.get(POSTGRES_ENV)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema, dropped afterwards."""
    base = postgres_base_url()
    if not base:
        pytest.skip(POSTGRES_SKIP)
    import sqlalchemy as sa

    schema = f"fwtest_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base)
    with admin.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in base else "?"
    try:
        yield f"{base}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            # a connection the test left behind a dead proxy may still hold locks in the
            # schema until its keepalives give up: end it rather than wait for it
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(l.pid) FROM pg_locks l"
                    " JOIN pg_class c ON c.oid = l.relation"
                    " JOIN pg_namespace n ON n.oid = c.relnamespace"
                    " WHERE n.nspname = :schema AND l.pid <> pg_backend_pid()"
                ),
                {"schema": schema},
            )
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


DEMO_CYCLES = 5
DEMO_REQUESTS = 300


@pytest.fixture(scope="session")
def _demo_week(tmp_path_factory: pytest.TempPathFactory):
    """One run of the demo (``DEMO_CYCLES`` cycles of ``DEMO_REQUESTS`` requests) for every test
    that only reads what it left: the first pytest-xdist worker to ask runs it, the others wait
    for it and read its result (the demo is the suite's most expensive computation)."""
    import fcntl

    import flywheel_middleware as fw
    from flywheel_middleware.demo import DemoSettings, run_demo

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder, saved = shared / "demo-week", shared / "demo-week.pickle"
    with open(shared / "demo-week.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if saved.exists():
            return pickle.loads(saved.read_bytes())
        try:
            with pytest.MonkeyPatch.context() as env:  # its journal stays beside its store
                env.delenv("FLYWHEEL_SPILL_DIR", raising=False)
                env.delenv("FLYWHEEL_STORE_URL", raising=False)
                env.delenv("FLYWHEEL_CONFIG", raising=False)
                result = run_demo(
                    DemoSettings(
                        folder=str(folder),
                        cycles=DEMO_CYCLES,
                        requests_per_cycle=DEMO_REQUESTS,
                        min_samples=40,
                    )
                )
        finally:
            fw.shutdown()
        saved.write_bytes(pickle.dumps(result))
        return result


@pytest.fixture
def demo_week(_demo_week):
    """What the shared demo run returned, with the public API configured on its store (as
    ``flywheel serve`` after ``flywheel demo``); shut down afterwards. Read, never write."""
    import flywheel_middleware as fw

    fw.configure(_demo_week.folder / "flywheel.yaml", store_url=_demo_week.store_url)
    yield _demo_week
    fw.shutdown()


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'flywheel.db'}"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """Each test using this runs once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'flywheel.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(store_url: str):
    from flywheel_middleware.store.database import Store

    s = Store(store_url)
    yield s
    s.dispose()


@pytest.fixture
def fw(sqlite_url: str):
    """The public API configured on a fresh SQLite store; shut down afterwards."""
    import flywheel_middleware as fw

    fw.configure(store_url=sqlite_url)
    yield fw
    fw.shutdown()


@pytest.fixture
def fw_any(store_url: str):
    """The public API configured on each backend in turn."""
    import flywheel_middleware as fw

    fw.configure(store_url=store_url)
    yield fw
    fw.shutdown()


class OtelSdk:
    """The process's global OpenTelemetry SDK, installed once (OTel allows one provider per
    process) as an APM would; each test adds its own span processors for its duration."""

    def __init__(self) -> None:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

        processors: list = []

        class Forward(SpanProcessor):
            def on_start(self, span, parent_context=None):
                for p in list(processors):
                    p.on_start(span, parent_context=parent_context)

            def on_end(self, span):
                for p in list(processors):
                    p.on_end(span)

            def force_flush(self, timeout_millis=30_000):
                return all(p.force_flush(timeout_millis) for p in list(processors))

        self.processors = processors
        self.provider = TracerProvider()
        self.provider.add_span_processor(Forward())
        self.exporter = InMemorySpanExporter()
        self.export = SimpleSpanProcessor(self.exporter)
        trace.set_tracer_provider(self.provider)

    def add(self, processor) -> None:
        self.processors.append(processor)

    def finished(self) -> list:
        return list(self.exporter.get_finished_spans())


@pytest.fixture(scope="session")
def _otel_sdk() -> OtelSdk:
    return OtelSdk()


@pytest.fixture
def otel_sdk(_otel_sdk: OtelSdk) -> Iterator[OtelSdk]:
    """A global OTel SDK with an in-memory exporter for this test. Flywheel's mirroring stays
    as configured: off unless the test turns it on (``fw.configure(otel=True)``)."""
    from flywheel_middleware.capture import otel_mirror

    _otel_sdk.exporter.clear()
    _otel_sdk.add(_otel_sdk.export)
    yield _otel_sdk
    _otel_sdk.processors.clear()
    _otel_sdk.exporter.clear()
    otel_mirror.set_enabled(None)  # back to what the configuration says
