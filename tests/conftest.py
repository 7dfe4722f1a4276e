"""Shared fixtures: the local stand-in of the Anthropic API (tests/fake_api.py), and a real
PostgreSQL server for the pool's tests (never a mock database)."""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import batching_harness as bh  # first: it loads the sandbox module beside it
from tests import pg_cluster
from tests.fake_api import FakeAPI

TEST_PG_ENV = "BATCHING_HARNESS_TEST_PG"
"""A server URL (.ci/run starts a throwaway cluster and exports it); tests make schemas in it."""


@pytest.fixture
def fake_api() -> Iterator[FakeAPI]:
    """A started FakeAPI with zero batch latency; stopped after the test."""
    with FakeAPI() as api:
        yield api


@pytest.fixture(autouse=True)
def _close_toolboxes() -> Iterator[None]:
    """Toolboxes made by tests.support.make_rig own private temp dirs: remove them."""
    yield
    from tests.support import OPEN_TOOLBOXES

    while OPEN_TOOLBOXES:
        OPEN_TOOLBOXES.pop().close()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A real PostgreSQL server: CI's (BATCHING_HARNESS_TEST_PG), else a throwaway cluster
    started here from Debian's binaries, else the test is skipped and says why."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed: pip install -e '.[test]'")
    if os.environ.get(TEST_PG_ENV):
        yield os.environ[TEST_PG_ENV]
        return
    if pg_cluster.find_bindir() is None:
        pytest.skip(f"no PostgreSQL: set {TEST_PG_ENV} to a server URL, or install the "
                    "server (apt-get install postgresql) so initdb/pg_ctl can start one")
    root = Path(tempfile.gettempdir()) / f"bh-pg-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        url = pg_cluster.start(root)
    except RuntimeError as exc:
        pg_cluster.stop(root)
        pytest.skip(f"a throwaway PostgreSQL cluster would not start: {exc}")
    yield url
    pg_cluster.stop(root)


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """An empty pool of its own (a fresh schema) in the test server; dropped afterwards."""
    import psycopg

    schema = "t_" + secrets.token_hex(6)
    yield f"{pg_server}{'&' if '?' in pg_server else '?'}schema={schema}"
    with psycopg.connect(pg_server, autocommit=True) as db:
        db.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[bh.Store]:
    """Each back-end in turn, behind the same Store protocol."""
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    store = bh.open_store(url, tmp_path)
    yield store
    store.close()
