"""What a simulation reports: typed rows per round and per device, the summary, the table and accuracy.png.

With personalization methods (`fedpers-sim --personalization ...`) one report holds every run (one
federation per method and seed over the same devices) and their comparison: FedAvg's global model
(no personal layers, same rounds), each method's own model and its per-device choice, and the
devices' local-only models, per device and in the mean (unweighted and weighted by the devices'
examples), with the spread over seeds.
"""

from __future__ import annotations

import logging
import math
import statistics
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
class MethodDeviceRow:
    """One device at the end of one method's federation: test accuracy of every candidate and its choice."""

    index: int
    name: str | None
    examples: int  # the device's data (training + its validation split)
    val_examples: int
    test_examples: int
    rounds_trained: int
    global_accuracy: float | None  # the final base with the device's own local tensors
    personalized_accuracy: float | None  # the method's own model (Method.serves)
    candidate_accuracy: dict[str, float]  # every candidate, local_only included
    served: str  # what the per-device choice serves
    served_accuracy: float | None
    fleet_default: str
    local_only_accuracy: float | None
    bytes_up: int
    bytes_down: int
    peak_rss_bytes: int | None


@dataclass(frozen=True)
class MethodRun:
    """One federation of one personalization method on one seed's devices."""

    method: str
    seed: int
    hyperparams: str  # what --personalization-params gave the server ("" : the method's defaults)
    ended: str
    elapsed_seconds: float
    fleet_default: str  # what the devices were told to serve on a tie ("" when none was decided)
    rounds: list[RoundRow]
    devices: list[MethodDeviceRow]


@dataclass(frozen=True)
class ComparisonRow:
    """One model across every run: accuracy in points, the mean over devices then mean ± sd over seeds."""

    label: str  # FedAvg, FedAvg+FT, FedBN, FedBN choice, local-only, ...
    method: str
    model: str  # the candidate (global, finetuned, personal, local_only) or "choice"
    mean: float
    sd: float
    weighted_mean: float  # devices weighted by their examples
    weighted_sd: float
    below_local_pct: float  # devices (all seeds) more than 1 point below their local-only model
    seeds: int
    picks: dict[str, int] = field(default_factory=dict)  # choice rows: what the devices served


@dataclass(frozen=True)
class DeviceComparison:
    """One device of one seed: the accuracy of every compared model (label -> accuracy in [0, 1])."""

    seed: int
    index: int
    examples: int
    accuracy: dict[str, float]


@dataclass(frozen=True)
class SimReport:
    """report.json: the configuration, per-round and per-device rows, the summary, and how the run ended;
    with personalization methods also every run, the comparison and the per-device comparison."""

    config: dict[str, Any]
    rounds: list[RoundRow]
    devices: list[DeviceRow]
    summary: Summary
    ended: str = "finished"  # finished | interrupted | timeout
    notes: dict[str, str] = field(default_factory=lambda: dict(NOTES))
    runs: list[MethodRun] = field(default_factory=list)
    comparison: list[ComparisonRow] = field(default_factory=list)
    per_device: list[DeviceComparison] = field(default_factory=list)

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


def format_round(row: RoundRow, rounds: int, elapsed: float) -> str:
    """One closed round as the simulators' progress line."""
    return (f"round {row.round:>3}/{rounds}  v{row.version:<3} {row.devices} devices  "
            f"global {fmt_pct(row.global_accuracy)}%  personalized {fmt_pct(row.personalized_accuracy)}%  "
            + (f"eps {row.dp_epsilon:.2f}  " if row.dp_epsilon is not None else "")
            + f"({elapsed:5.1f}s)")


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


# ------------------------------------------------------------------------------ personalization methods

METHOD_NOTES = {
    "runs": "one federation per method and seed over the same devices; devices hold out a validation split "
            "(val_fraction) and train on the rest",
    "comparison": "accuracy in points on the devices' test splits: mean over devices (unweighted; weighted: by the "
                  "device's examples), then mean ± sd over seeds; below_local_pct: devices of all seeds more than "
                  "1 point below their local-only model",
    "FedAvg": "the fedavg run's final global model (every layer shared, same rounds)",
    "<Method>": "what the method serves without a choice (Method.serves)",
    "<Method> choice": "each device's per-device choice among the method's candidates and its local-only model, on "
                       "its validation split, ties to the fleet default the server decided",
    "local-only": "a model trained on the device's training split alone for rounds x local epochs + ft_epochs",
}


def method_device_rows(reports: Sequence[DeviceReport | None]) -> list[MethodDeviceRow]:
    """The device rows of one method run from the devices' reports (a lost device: empty numbers)."""
    rows = []
    for i, rep in enumerate(reports):
        rep = rep or DeviceReport(name="")
        cand = dict(rep.candidate_accuracy)
        rows.append(MethodDeviceRow(
            index=i, name=rep.name or None, examples=rep.train_examples, val_examples=rep.val_examples,
            test_examples=rep.test_examples, rounds_trained=rep.rounds_trained,
            global_accuracy=rep.end_global_accuracy, personalized_accuracy=rep.final_personalized_accuracy,
            candidate_accuracy=cand, served=rep.served, served_accuracy=rep.served_accuracy,
            fleet_default=rep.fleet_default, local_only_accuracy=cand.get("local_only"), bytes_up=rep.bytes_up,
            bytes_down=rep.bytes_down, peak_rss_bytes=rep.peak_rss_bytes))
    return rows


def _title(method: str) -> str:
    from fedpers.personalization import METHODS

    return METHODS[method].title if method in METHODS else method


def _models(runs: Sequence[MethodRun]) -> list[tuple[str, str, str]]:
    """(label, method, model) of every compared row, in table order."""
    from fedpers.personalization import METHODS

    methods = list(dict.fromkeys(r.method for r in runs))
    out = []
    if "fedavg" in methods:
        out.append(("FedAvg", "fedavg", "global"))
        if any("finetuned" in d.candidate_accuracy for r in runs if r.method == "fedavg" for d in r.devices):
            out.append(("FedAvg+FT", "fedavg", "finetuned"))
    for m in methods:
        if m != "fedavg":
            out.append((_title(m), m, METHODS[m].serves if m in METHODS else "personal"))
    out += [(f"{_title(m)} choice", m, "choice") for m in methods]
    out.append(("local-only", "fedavg" if "fedavg" in methods else methods[0], "local_only"))
    return out


def _value(d: MethodDeviceRow, model: str) -> float | None:
    return d.served_accuracy if model == "choice" else d.candidate_accuracy.get(model)


def compare(runs: Sequence[MethodRun]) -> tuple[list[ComparisonRow], list[DeviceComparison]]:
    """The comparison table over every run, and every device's accuracy per compared model."""
    if not runs:
        return [], []
    seeds = sorted({r.seed for r in runs})
    by = {(r.method, r.seed): r for r in runs}
    models = _models(runs)
    local_method = models[-1][1]
    rows = []
    for label, method, model in models:
        per_seed, weighted, below, picks = [], [], [], {}
        for seed in seeds:
            run, local = by.get((method, seed)), by.get((local_method, seed))
            if run is None:
                continue
            pairs = [(v, d.examples or 1) for d in run.devices if (v := _value(d, model)) is not None]
            if not pairs:
                continue
            per_seed.append(100 * statistics.fmean(v for v, _ in pairs))
            weighted.append(100 * sum(v * w for v, w in pairs) / sum(w for _, w in pairs))
            locals_ = {d.index: d.local_only_accuracy for d in local.devices} if local else {}
            below += [v < lo - 0.01 for d in run.devices if (v := _value(d, model)) is not None
                      and (lo := locals_.get(d.index)) is not None]
            if model == "choice":
                for d in run.devices:
                    if d.served:
                        picks[d.served] = picks.get(d.served, 0) + 1
        if not per_seed:
            continue
        sd = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
        wsd = statistics.stdev(weighted) if len(weighted) > 1 else 0.0
        rows.append(ComparisonRow(label, method, model, statistics.fmean(per_seed), sd, statistics.fmean(weighted),
                                  wsd, 100 * statistics.fmean(below) if below else math.nan, len(per_seed), picks))
    devices = []
    for seed in seeds:
        first = next(r for r in runs if r.seed == seed)
        for d0 in first.devices:
            acc = {}
            for label, method, model in models:
                run = by.get((method, seed))
                d = run.devices[d0.index] if run and d0.index < len(run.devices) else None
                v = _value(d, model) if d else None
                if v is not None:
                    acc[label] = v
            devices.append(DeviceComparison(seed, d0.index, d0.examples, acc))
    return rows, devices


def format_comparison(rows: Sequence[ComparisonRow]) -> str:
    """The comparison as a table (points)."""
    local = next((r.mean for r in rows if r.model == "local_only"), math.nan)
    head = (f"{'model':<18}{'acc % mean ± sd':>17}{'weighted % ± sd':>17}{'Δ local':>9}{'<local-1pt':>12}"
            f"  {'picks (choice rows)'}")
    lines = [head, "-" * len(head)]
    for r in rows:
        picks = " ".join(f"{k}:{v}" for k, v in sorted(r.picks.items()))
        lines.append(f"{r.label:<18}{r.mean:>10.1f} ± {r.sd:<4.1f}{r.weighted_mean:>10.1f} ± {r.weighted_sd:<4.1f}"
                     f"{r.mean - local:>+9.1f}{r.below_local_pct:>11.0f}%  {picks}")
    seeds = max((r.seeds for r in rows), default=0)
    lines.append(f"(mean over devices, then mean ± sd over {seeds} seed(s); weighted by the devices' examples; "
                 "<local-1pt: devices more than 1 point below their local-only model)")
    return "\n".join(lines)


def plot_methods(path: Path, runs: Sequence[MethodRun]) -> bool:
    """accuracy.png of a method comparison: per base version, FedAvg's global model and each method's own
    model after local training (the devices' round metrics, mean over seeds), the final models at the last
    version, and the local-only level as a line."""
    from fedpers.plots import Curve
    from fedpers.plots import plot_accuracy as plot

    curves, local = [], []
    for method in dict.fromkeys(r.method for r in runs):
        mine = [r for r in runs if r.method == method]
        key = "global_accuracy" if method == "fedavg" else "personalized_accuracy"
        points: dict[int, list[float]] = {}
        for r in mine:
            for row in r.rounds:
                v = getattr(row, key)
                if v is not None:
                    points.setdefault(row.version - 1, []).append(v)
            final = [d.global_accuracy if method == "fedavg" else d.personalized_accuracy for d in r.devices]
            final = [v for v in final if v is not None]
            if final and r.rounds:
                points.setdefault(r.rounds[-1].version, []).append(statistics.fmean(final))
            local += [d.local_only_accuracy for d in r.devices if d.local_only_accuracy is not None]
        label = "FedAvg (global model)" if method == "fedavg" else f"{_title(method)} (its own model)"
        curves.append(Curve(label, [(v, statistics.fmean(a)) for v, a in sorted(points.items())], "o-"))
    levels = {"local-only (same epochs)": statistics.fmean(local)} if local else None
    return plot(path, curves, levels, title="fedpers-sim: every method per round (devices' test splits)")
