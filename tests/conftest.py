"""Session fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pg_cluster import PgCluster, PgUnavailable, unavailable


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """One throwaway PostgreSQL cluster for the session (tests make a database each); skipped, with the
    reason, where it cannot run here. Stopped and deleted at the end of the session."""
    reason = unavailable()
    if reason:
        pytest.skip(f"PostgreSQL tests: {reason}")
    cluster = PgCluster()
    try:
        cluster.start()
    except PgUnavailable as exc:
        pytest.skip(f"PostgreSQL tests: could not start a throwaway cluster: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()
