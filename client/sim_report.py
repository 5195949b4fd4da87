"""What a simulation reports: typed rows per round and per device, the summary, the table and accuracy.png."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedpers import wire
from fedpers.client.baseline import LocalOnlyResult
from fedpers.client.report import DeviceReport

log = logging.getLogger(__name__)

NOTES = {
    "global_accuracy": "devices: the final base model (with the device's own personal layers, if any) on "
                       "its held-out split; rounds: the base each round started from",
    "personalized_accuracy": "devices: the final base after one more local training of the same length "
                             "as a round (nothing uploaded); rounds: after each round's local training",
    "local_only_accuracy": "a fresh model trained only on the device's data for the same number of epochs "
                           "in total (all rounds plus the final personalization)",
    "bytes_up": "serialized update blobs sent by the device (all rounds)",
}


@dataclass(frozen=True)
class RoundRow:
    """A closed round as the server reports it (global_accuracy: the base the round started from, on the
    devices' held-out splits, example-weighted)."""

    round: int
    version: int
    devices: int
    global_accuracy: float | None
    personalized_accuracy: float | None
    train_loss: float | None
    dp_epsilon: float | None = None  # privacy spent by a device in every round so far (None: no DP)
    late_updates: int = 0


@dataclass(frozen=True)
class DeviceRow:
    """One device's end of the run, beside its local-only baseline."""

    index: int
    id: int | None
    name: str | None
    train_examples: int
    test_examples: int
    rounds_trained: int
    global_accuracy: float | None
    personalized_accuracy: float | None
    local_only_accuracy: float | None
    local_only_epochs: int | None
    bytes_up: int
    bytes_down: int
    peak_rss_bytes: int | None
    memory_report: dict[str, Any] | None


@dataclass(frozen=True)
class Summary:
    global_accuracy: float | None
    personalized_accuracy: float | None
    local_only_accuracy: float | None
    bytes_up: int
    bytes_down: int
    bytes_up_per_device_round: float
    version: int | None
    elapsed_seconds: float
    dp_epsilon: float | None = None  # after the last round (None: no DP)
    late_updates: int = 0


@dataclass(frozen=True)
class SimReport:
    """report.json: the configuration, per-round and per-device rows, the summary, and how the run ended."""

    config: dict[str, Any]
    rounds: list[RoundRow]
    devices: list[DeviceRow]
    summary: Summary
    ended: str = "finished"  # finished | interrupted | timeout
    notes: dict[str, str] = field(default_factory=lambda: dict(NOTES))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def round_rows(status: wire.Status | None) -> list[RoundRow]:
    """The closed rounds of a GetStatus reply, oldest first."""
    if status is None:
        return []
    rows = []
    for r in status.rounds:
        if r.state != "closed":
            continue
        m = r.metrics
        rows.append(RoundRow(round=r.round_id, version=r.version, devices=r.devices,
                             global_accuracy=m.get("global_accuracy"),
                             personalized_accuracy=m.get("personalized_accuracy"), train_loss=m.get("loss"),
                             dp_epsilon=m.get("dp_epsilon"), late_updates=r.late_updates))
    return rows


def device_rows(reports: Sequence[DeviceReport | None],
                baselines: Sequence[LocalOnlyResult | None]) -> list[DeviceRow]:
    rows = []
    for i, (rep, base) in enumerate(zip(reports, baselines, strict=True)):
        rep = rep or DeviceReport(name="")
        rows.append(DeviceRow(
            index=i, id=rep.id, name=rep.name or None, train_examples=rep.train_examples,
            test_examples=rep.test_examples, rounds_trained=rep.rounds_trained,
            global_accuracy=rep.end_global_accuracy, personalized_accuracy=rep.end_personalized_accuracy,
            local_only_accuracy=base.accuracy if base else None, local_only_epochs=base.epochs if base else None,
            bytes_up=rep.bytes_up, bytes_down=rep.bytes_down, peak_rss_bytes=rep.peak_rss_bytes,
            memory_report=rep.memory_report,
        ))
    return rows


def weighted_mean(rows: Sequence[DeviceRow], key: str) -> float | None:
    """Mean of a device column weighted by test examples, over the devices that have a value."""
    pairs = [(getattr(r, key), r.test_examples or 1) for r in rows if getattr(r, key) is not None]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def summarize(rows: Sequence[DeviceRow], status: wire.Status | None, elapsed: float) -> Summary:
    up = sum(r.bytes_up for r in rows)
    return Summary(
        global_accuracy=weighted_mean(rows, "global_accuracy"),
        personalized_accuracy=weighted_mean(rows, "personalized_accuracy"),
        local_only_accuracy=weighted_mean(rows, "local_only_accuracy"),
        bytes_up=up, bytes_down=sum(r.bytes_down for r in rows),
        bytes_up_per_device_round=up / max(1, sum(r.rounds_trained for r in rows)),
        version=status.version if status is not None else None, elapsed_seconds=round(elapsed, 2),
        dp_epsilon=next((r.metrics["dp_epsilon"] for r in reversed(status.rounds) if "dp_epsilon" in r.metrics),
                        None) if status is not None else None,
        late_updates=status.late_updates if status is not None else 0,
    )


def fmt_pct(v: float | None) -> str:
    return "  -  " if v is None else f"{100 * v:5.1f}"


def format_table(rows: Sequence[DeviceRow]) -> str:
    head = (f"{'device':>6} {'id':>4} {'train':>5} {'test':>4} {'global%':>7} {'personal%':>9} {'local-only%':>11} "
            f"{'up KiB/rnd':>10} {'down KiB':>9} {'peak RSS MiB':>12}")
    lines = [head, "-" * len(head)]
    for r in rows:
        per_round = r.bytes_up / r.rounds_trained / 1024 if r.rounds_trained else 0.0
        rss = r.peak_rss_bytes / 2**20 if r.peak_rss_bytes else 0.0
        lines.append(f"{r.index:>6} {r.id if r.id is not None else '-':>4} {r.train_examples:>5} "
                     f"{r.test_examples:>4} {fmt_pct(r.global_accuracy):>7} "
                     f"{fmt_pct(r.personalized_accuracy):>9} {fmt_pct(r.local_only_accuracy):>11} "
                     f"{per_round:>10.1f} {r.bytes_down / 1024:>9.1f} {rss:>12.1f}")
    lines.append("-" * len(head))
    lines.append(f"{'mean':>6} {'':>4} {'':>5} {'':>4} {fmt_pct(weighted_mean(rows, 'global_accuracy')):>7} "
                 f"{fmt_pct(weighted_mean(rows, 'personalized_accuracy')):>9} "
                 f"{fmt_pct(weighted_mean(rows, 'local_only_accuracy')):>11}   (means weighted by test examples)")
    return "\n".join(lines)


def plot_accuracy(path: Path, rounds: Sequence[RoundRow], devices: Sequence[DeviceRow]) -> bool:
    """accuracy.png: the global model and the personalized one per base version, local-only as a line."""
    from fedpers.plots import Curve
    from fedpers.plots import plot_accuracy as plot

    glob = [(r.version - 1, r.global_accuracy) for r in rounds if r.global_accuracy is not None]
    final = weighted_mean(devices, "global_accuracy")
    if final is not None and rounds:
        glob.append((rounds[-1].version, final))  # the final model, evaluated by every device after the last round
    pers = [(r.version - 1, r.personalized_accuracy) for r in rounds if r.personalized_accuracy is not None]
    local = weighted_mean(devices, "local_only_accuracy")
    return plot(path, [Curve("global model", glob, "o-"), Curve("personalized (local training from that base)",
                                                                  pers, "s-")],
                {"local-only (same epochs)": local} if local is not None else None,
                title="fedpers-sim: accuracy on the devices' held-out splits")
