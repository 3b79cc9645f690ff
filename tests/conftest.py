"""Shared fixtures: stores on real SQLite and real PostgreSQL, and a configured runtime."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

POSTGRES_ENV = "FLYWHEEL_TEST_POSTGRES_URL"
POSTGRES_SKIP = (
    f"PostgreSQL tests need a server: set {POSTGRES_ENV}="
    "postgresql+psycopg://postgres@127.0.0.1:5432/test (.ci/run does this)"
)


@pytest.fixture(autouse=True)
def _isolated_spill_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spill files of one test never leak into another."""
    monkeypatch.setenv("FLYWHEEL_SPILL_DIR", str(tmp_path_factory.mktemp("spill")))
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
            conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


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
