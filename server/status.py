"""GetStatus from the state database: for the running coordinator, and for the store of a stopped server."""

from __future__ import annotations

from pathlib import Path

from fedpers import wire
from fedpers.server import state as st

RECENT_ROUNDS = 100  # rounds a status lists, newest last
MAX_PROBLEM_CHARS = 1000
# With these, a status is at most ~RECENT_ROUNDS * MAX_METRICS * (MAX_METRIC_KEY_CHARS + 12) bytes, far
# below the message limit, whatever the devices reported (tests/test_limits.py checks the bound).


def _bounded(metrics: dict[str, float]) -> dict[str, float]:
    """A round's metrics as a status shows them: at most MAX_METRICS keys (sorted, the first kept)."""
    return dict(sorted(metrics.items())[:wire.MAX_METRICS])


def build_status(state: st.State, version: int, rounds_target: int, finished: bool,
                 problem: str = "") -> wire.Status:
    """The federation's progress as GetStatus reports it; `rounds_target` 0 means unknown (offline)."""
    recent = state.rounds(limit=RECENT_ROUNDS)
    summaries = tuple(
        wire.RoundSummary(round_id=r.round_id, version=r.version, state=r.state,
                          devices=state.count_updates(r.round_id), metrics=_bounded(r.metrics),
                          late_updates=state.count_late(r.round_id))
        for r in reversed(recent)
    )
    latest = recent[0] if recent else None
    closed = state.count_rounds(st.CLOSED)
    return wire.Status(
        version=version, current_round=latest.round_id if latest else 0,
        round_state=latest.state if latest else "", rounds_completed=closed, rounds_target=rounds_target,
        devices_joined=state.count_devices(), finished=finished,
        rounds=summaries, problem=problem[:MAX_PROBLEM_CHARS], late_updates=state.count_late(),
    )


def status_of_store(store_dir: Path) -> wire.Status:
    """The status a stopped server left in `--store`: its latest version and its rounds (read only)."""
    from fedpers.server.app import STATE_DB
    from fedpers.store import ModelStore, StoreError

    db = Path(store_dir) / STATE_DB
    if not db.is_file():
        raise StoreError(f"{store_dir} is not a fedpers-server store (no {STATE_DB})")
    latest = ModelStore.read_only(store_dir).latest_version()
    state = st.SqliteState(db, read_only=True)
    try:
        return build_status(state, version=latest if latest is not None else 0, rounds_target=0, finished=False)
    finally:
        state.close()
