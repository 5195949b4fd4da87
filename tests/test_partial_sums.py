"""Hierarchical aggregation: partial sums of several aggregators combine into what one would compute."""

from __future__ import annotations

import numpy as np
import pytest
from fedpers.server.aggregate import AggregationError, PartialSum
from fedpers.server.robust import make_aggregator
from fedpers.store import CorruptFile

BASE = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}
KINDS = {"mean": {}, "normbounded": {"clip_norm": 0.5}, "trimmed": {"trim": 0.2}, "median": {}}


def _deltas(n: int, seed: int = 0) -> list[tuple[dict[str, np.ndarray], float]]:
    rng = np.random.default_rng(seed)
    return [({k: rng.standard_normal(v.shape).astype(np.float32) for k, v in BASE.items()}, float(rng.integers(1, 50)))
            for _ in range(n)]


@pytest.mark.parametrize("name", list(KINDS))
def test_partial_sums_of_three_replicas_combine_to_the_single_result(name: str) -> None:
    updates = _deltas(7)
    one = make_aggregator(name, **KINDS[name])
    one.start(5, BASE)
    for d, w in updates:
        one.add(d, w)
    parts = []
    for shard in (updates[:3], updates[3:4], updates[4:]):  # three replicas, uneven
        agg = make_aggregator(name, **KINDS[name])
        agg.start(5, BASE)
        for d, w in shard:
            agg.add(d, w)
        part = PartialSum.decode(agg.partial(devices=(9, 1)).encode())  # through the wire format
        assert part.devices == (1, 9)
        parts.append(part)
    combined = one.fresh()
    combined.start(5, BASE)
    for part in parts:
        combined.merge(part)
    assert combined.count == one.count == 7 and combined.total_weight == pytest.approx(one.total_weight)
    got, want = combined.result(), one.result()
    for k in BASE:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)


def test_a_partial_of_another_round_or_kind_is_refused_before_anything_changes() -> None:
    a = make_aggregator("mean")
    a.start(1, BASE)
    a.add(_deltas(1)[0][0], 2.0)
    other_round = make_aggregator("mean")
    other_round.start(2, BASE)
    with pytest.raises(AggregationError, match="round 2 cannot join round 1"):
        a.merge(other_round.partial())
    rows = make_aggregator("median")
    rows.start(1, BASE)
    with pytest.raises(AggregationError, match="kind 'rows'"):
        a.merge(rows.partial())
    assert a.count == 1 and a.total_weight == 2.0
    with pytest.raises(CorruptFile):
        PartialSum.decode(b"not a partial sum at all, sorry")
