"""Personalization benchmark: every method on every kind of heterogeneity, in one process.

Each simulated device runs the `fedpers.client.methods` round procedure of the method; the server
step is the real `fedpers.server.aggregate` code (WeightedMean by training examples, then the FedAvg
server optimizer at lr 1). No gRPC and no processes: the federation is a loop in this process, so no
wire codec is involved (deltas are exact fp32). Every model trains on the devices' training splits;
a device's validation split is used only for the per-device choice; accuracy is measured on the
device's weighted view of the shared test pool (`fedpers.client.scenarios`).

Rows per scenario:
- FedAvg (its global model), FedAvg+FT (fine-tuned on the device), FedProx, FedPer, FedRep, Ditto,
  FedBN (what each method serves, `Method.serves`);
- choice: each device serves the best of its candidates (the method's models + its local-only model)
  on its own validation split (`client.methods.pick`: a tie, or a one-example lead on fewer than 8
  validation examples, goes to the model the fleet's validation prefers, `fleet_default`: the
  method's own or local-only); the method is the one whose own model scores best on the devices'
  validation splits on average (`--choice-over auto`): no test data picks anything;
- local-only: a model trained on the device alone for rounds x local epochs + ft_epochs (the epochs
  a FedAvg+FT device trains), also a candidate of the choice;
- pooled, pooled+prior: references, not federated: one model trained on every device's training
  data pooled; +prior reweights its probabilities by the device's own label distribution. Where
  devices differ only in their labels' proportions (iid, label_skew, scarce), pooled+prior is
  about the best any personalized model can do, so it bounds what personalization can gain.

Results, variants and how the defaults were chosen: docs/personalization.md.

Run: .venv/bin/python bench/personalization.py [--quick] [--seeds 0,1,2] [--scenarios iid,...]
     [--hp ditto:lam=0.5 --hp fedrep:head_epochs=6] [--knob concept_shift:devices=20] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core per benchmark: the machine is shared

import numpy as np  # noqa: E402
from fedpers import models  # noqa: E402
from fedpers.client import scenarios as sc  # noqa: E402
from fedpers.client.methods import (  # noqa: E402
    Setup,
    TrainSettings,
    choose,
    final_candidates,
    fleet_default,
    pick,
    run_round,
    train_local_only,
)
from fedpers.nn import ModelSpec, Trainer, load_ini  # noqa: E402
from fedpers.personalization import METHODS  # noqa: E402
from fedpers.server.aggregate import make_aggregator, make_optimizer  # noqa: E402

log = logging.getLogger("bench.personalization")

# (row label, method run, candidate it serves)
ROWS: tuple[tuple[str, str, str], ...] = (
    ("FedAvg", "fedavg", "global"),
    ("FedAvg+FT", "fedavg", "finetuned"),
    ("FedProx", "fedprox", "global"),
    ("FedPer", "fedper", METHODS["fedper"].serves),
    ("FedRep", "fedrep", METHODS["fedrep"].serves),
    ("Ditto", "ditto", METHODS["ditto"].serves),
    ("FedBN", "fedbn", METHODS["fedbn"].serves),
)
BASELINES = ("FedAvg", "FedAvg+FT")
PERSONALIZED = ("FedPer", "FedRep", "Ditto", "FedBN", "choice")
REFERENCES = ("local-only", "pooled", "pooled+prior")


@dataclass(frozen=True)
class BenchConfig:
    """How every federation of the benchmark trains (the same for every method)."""

    model: str = "digits_cnn"
    bn_momentum: float | None = 0.9  # None: the model file's (digits_cnn: Keras' 0.99)
    rounds: int = 30
    local_epochs: int = 2
    batch_size: int = 16
    learning_rate: float | None = 0.005  # Adam; None: the model file's (0.002)
    pooled_epochs: int = 20
    seeds: tuple[int, ...] = (0, 1, 2)
    scenarios: tuple[str, ...] = tuple(sc.SCENARIOS)
    methods: tuple[str, ...] = tuple(METHODS)
    choice_over: str = "auto"  # or a method name
    hp: dict[str, dict[str, str]] = field(default_factory=dict)  # method -> overrides
    knobs: dict[str, dict[str, float | int | None]] = field(default_factory=dict)  # scenario -> overrides


@dataclass
class DeviceResult:
    """One device at the end of one run: test accuracy per candidate, what it picked on validation."""

    accuracy: dict[str, float]
    picked: str
    val_accuracy: dict[str, float] = field(default_factory=dict)
    val_loss: dict[str, float] = field(default_factory=dict)
    val_examples: int = 0


@dataclass
class RunResult:
    method: str
    seconds: float
    hyperparams: dict
    devices: list[DeviceResult]
    default: str = ""  # what the fleet's validation says devices serve on a tie

    @property
    def val_score(self) -> float:
        """Mean over devices of the validation accuracy of the method's own model: how a federation would
        compare methods without test data (the choice's own score would favour runs with more candidates)."""
        serves = METHODS[self.method].serves
        return statistics.fmean(d.val_accuracy.get(serves, 0.0) for d in self.devices)


@dataclass
class ScenarioRun:
    """Everything measured on one scenario and seed."""

    scenario: str
    seed: int
    examples: list[int]  # per device (training + validation)
    clusters: list[int]
    references: dict[str, list[float]]  # local-only / pooled / pooled+prior -> per-device accuracy
    runs: dict[str, RunResult] = field(default_factory=dict)
    choice_over: str = ""

    def scores(self, label: str) -> list[float]:
        """Per-device accuracy of a table row."""
        if label in self.references:
            return self.references[label]
        if label == "choice":
            return [d.accuracy["choice"] for d in self.runs[self.choice_over].devices]
        method, cand = next((m, c) for lab, m, c in ROWS if lab == label)
        return [d.accuracy[cand] for d in self.runs[method].devices]

    def labels(self) -> list[str]:
        out = [lab for lab, m, _ in ROWS if m in self.runs]
        return out + (["choice"] if self.choice_over else []) + list(REFERENCES)


def test_accuracy(trainer: Trainer, weights: dict[str, np.ndarray], dev: sc.Device) -> float:
    """The device's weighted test accuracy (its label distribution over the test pool)."""
    trainer.set_weights(weights)
    return sc.weighted_accuracy(trainer.predict(dev.x_test, batch_size=256), dev.y_test, dev.w_test)


class Trainers:
    """One Trainer per batch size a device trains with (batch = min(batch_size, its examples))."""

    def __init__(self, setup: Setup, batch: int) -> None:
        self.setup, self.batch, self._by_batch = setup, batch, {}

    def __call__(self, dev: sc.Device) -> Trainer:
        b = min(self.batch, dev.y.size)
        if b not in self._by_batch:
            self._by_batch[b] = self.setup.trainer()
        return self._by_batch[b]


def references(scenario: sc.Scenario, spec: ModelSpec, cfg: BenchConfig, seed: int
               ) -> tuple[list[dict[str, np.ndarray]], dict[str, list[float]]]:
    """Local-only models (per device) and the accuracies of the three references."""
    setup = Setup.create(spec, "fedavg", cfg.hp.get("fedavg"))
    trainers = Trainers(setup, cfg.batch_size)
    epochs = cfg.rounds * cfg.local_epochs + setup.hp.ft_epochs
    local_w, local_acc = [], []
    for i, dev in enumerate(scenario.devices):
        t = trainers(dev)
        w = train_local_only(setup, t, dev.x, dev.y, TrainSettings(epochs, cfg.batch_size, cfg.learning_rate,
                                                                   seed=seed * 100_003 + i))
        local_w.append(w)
        local_acc.append(test_accuracy(t, w, dev))
    x = np.concatenate([d.x for d in scenario.devices])
    y = np.concatenate([d.y for d in scenario.devices])
    t = Trainer(spec, seed=seed)
    t.set_weights(setup.init)
    t.fit(x, y, epochs=cfg.pooled_epochs, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate, seed=seed)
    prior = np.bincount(y, minlength=t.outputs) / y.size
    pooled, pooled_prior = [], []
    for dev in scenario.devices:
        probs = t.predict(dev.x_test, batch_size=256)
        own = np.bincount(np.concatenate([dev.y, dev.y_val]), minlength=t.outputs) / dev.examples
        pooled.append(sc.weighted_accuracy(probs, dev.y_test, dev.w_test))
        pooled_prior.append(sc.weighted_accuracy(probs * own / np.maximum(prior, 1e-12), dev.y_test, dev.w_test))
    return local_w, {"local-only": local_acc, "pooled": pooled, "pooled+prior": pooled_prior}


def federate(scenario: sc.Scenario, spec: ModelSpec, method: str, cfg: BenchConfig, seed: int,
             local_models: list[dict[str, np.ndarray]], local_acc: list[float]) -> RunResult:
    """One federation of `method` over the scenario's devices, then every device's candidates and choice."""
    t0 = time.perf_counter()
    setup = Setup.create(spec, method, cfg.hp.get(method))
    trainers = Trainers(setup, cfg.batch_size)
    devices = scenario.devices
    base = {k: setup.init[k].copy() for k in setup.split.served}  # version 0: the server's init
    local: list[dict] = [{} for _ in devices]
    aggregator, optimizer = make_aggregator(), make_optimizer("fedavg")
    for r in range(cfg.rounds):
        shared_base = {k: base[k] for k in setup.split.shared}
        aggregator.start(r, shared_base)
        for i, dev in enumerate(devices):
            s = TrainSettings(cfg.local_epochs, cfg.batch_size, cfg.learning_rate, seed=(seed * 1_000 + r) * 1_000 + i)
            res = run_round(setup, trainers(dev), base, local[i], dev.x, dev.y, s)
            aggregator.add({k: res.shared[k] - shared_base[k] for k in setup.split.shared}, float(dev.y.size))
            local[i] = res.local
        base.update(optimizer.step(shared_base, aggregator.result()))
    results = []
    for i, dev in enumerate(devices):
        t = trainers(dev)
        s = TrainSettings(cfg.local_epochs, cfg.batch_size, cfg.learning_rate, seed=(seed * 1_000 + 999) * 1_000 + i)
        cands = final_candidates(setup, t, base, local[i], dev.x, dev.y, s)
        acc = {name: test_accuracy(t, w, dev) for name, w in cands.items()}
        cands["local_only"], acc["local_only"] = local_models[i], local_acc[i]
        ch = choose(t, cands, dev.x_val, dev.y_val) if dev.y_val.size else None  # scores only: picked below
        results.append(DeviceResult(acc, "", ch.val_accuracy if ch else {}, ch.val_loss if ch else {},
                                    int(dev.y_val.size)))
    # the server gathers every device's validation accuracies and tells them what to serve on a tie
    default = fleet_default(setup.method.serves, [d.val_accuracy for d in results])
    for d in results:
        d.picked = pick(d.val_accuracy, d.val_loss, d.val_examples, own=default) if d.val_examples else default
        d.accuracy["choice"] = d.accuracy[d.picked]
    return RunResult(method, time.perf_counter() - t0, setup.hp.to_dict(), results, default)


def run_scenario(name: str, seed: int, spec: ModelSpec, cfg: BenchConfig, say: Callable[..., None]) -> ScenarioRun:
    scenario = sc.make(name, seed=seed, **cfg.knobs.get(name, {}))
    t0 = time.perf_counter()
    local_w, refs = references(scenario, spec, cfg, seed)
    out = ScenarioRun(name, seed, [d.examples for d in scenario.devices], [d.cluster for d in scenario.devices], refs)
    say(f"  {name} seed {seed}: {len(scenario.devices)} devices, "
        + ", ".join(f"{k} {100 * statistics.fmean(v):.1f}%" for k, v in refs.items())
        + f" ({time.perf_counter() - t0:.1f}s)", flush=True)
    methods = list(cfg.methods)
    if cfg.choice_over != "auto" and cfg.choice_over not in methods:
        methods.append(cfg.choice_over)
    for method in methods:
        r = federate(scenario, spec, method, cfg, seed, local_w, refs["local-only"])
        out.runs[method] = r
        served = 100 * statistics.fmean(d.accuracy[METHODS[method].serves] for d in r.devices)
        choice = 100 * statistics.fmean(d.accuracy["choice"] for d in r.devices)
        say(f"    {method:<8} serves {served:5.1f}%  choice {choice:5.1f}% (validation {100 * r.val_score:.1f}%)"
            f"  {r.seconds:.1f}s", flush=True)
    out.choice_over = (max(out.runs, key=lambda m: out.runs[m].val_score) if cfg.choice_over == "auto"
                       else cfg.choice_over)
    return out


# ----------------------------------------------------------------------------------- tables


@dataclass
class Row:
    scenario: str
    label: str
    mean: float  # points: unweighted mean over devices, then mean over seeds
    sd: float  # over seeds
    wmean: float  # devices weighted by their examples
    wsd: float
    local_only: float
    below_local: float  # % of devices (all seeds) more than 1 point below their local-only model


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results: Sequence[ScenarioRun]) -> list[Row]:
    rows = []
    for scen in dict.fromkeys(r.scenario for r in results):
        per_seed = [r for r in results if r.scenario == scen]
        local = statistics.fmean(100 * statistics.fmean(r.references["local-only"]) for r in per_seed)
        for label in per_seed[0].labels():
            un = [100 * statistics.fmean(r.scores(label)) for r in per_seed]
            wt = [100 * float(np.average(r.scores(label), weights=r.examples)) for r in per_seed]
            below = [a < b - 0.01 for r in per_seed
                     for a, b in zip(r.scores(label), r.references["local-only"], strict=True)]
            (m, sd), (wm, wsd) = _mean_sd(un), _mean_sd(wt)
            rows.append(Row(scen, label, m, sd, wm, wsd, local, 100 * statistics.fmean(below)))
    return rows


def format_table(rows: Sequence[Row]) -> str:
    head = (f"{'scenario':<14}{'method':<14}{'acc % mean ± sd':>17}{'weighted % ± sd':>17}{'local-only %':>14}"
            f"{'Δ local':>9}{'<local-1pt':>12}")
    lines = [head, "-" * len(head)]
    last = None
    for r in rows:
        if last is not None and r.scenario != last:
            lines.append("")
        last = r.scenario
        lines.append(f"{r.scenario:<14}{r.label:<14}{r.mean:>10.1f} ± {r.sd:<4.1f}{r.wmean:>10.1f} ± {r.wsd:<4.1f}"
                     f"{r.local_only:>14.1f}{r.mean - r.local_only:>+9.1f}{r.below_local:>11.0f}%")
    return "\n".join(lines)


def format_choice_table(results: Sequence[ScenarioRun]) -> str:
    """The per-device choice on top of every method: mean accuracy, share below local-only, picks."""
    head = f"{'scenario':<14}{'choice over':<12}{'acc %':>7}{'val %':>7}{'<local-1pt':>12}  picks (all seeds)"
    lines = [head, "-" * len(head)]
    for scen in dict.fromkeys(r.scenario for r in results):
        per_seed = [r for r in results if r.scenario == scen]
        for method in per_seed[0].runs:
            devs = [(d, lo) for r in per_seed for d, lo in zip(r.runs[method].devices, r.references["local-only"],
                                                               strict=True)]
            acc = 100 * statistics.fmean(d.accuracy["choice"] for d, _ in devs)
            val = 100 * statistics.fmean(r.runs[method].val_score for r in per_seed)
            below = 100 * statistics.fmean(d.accuracy["choice"] < lo - 0.01 for d, lo in devs)
            picks: dict[str, int] = {}
            for d, _ in devs:
                picks[d.picked] = picks.get(d.picked, 0) + 1
            chosen = sum(r.choice_over == method for r in per_seed)
            mark = f"  <- choice row in {chosen}/{len(per_seed)} seeds" if chosen else ""
            fallback = sum(r.runs[method].default == "local_only" for r in per_seed)
            mark += f"  (ties to local-only in {fallback}/{len(per_seed)} seeds)" if fallback else ""
            lines.append(f"{scen:<14}{method:<12}{acc:>7.1f}{val:>7.1f}{below:>11.0f}%  "
                         + " ".join(f"{k}:{v}" for k, v in sorted(picks.items())) + mark)
        lines.append("")
    return "\n".join(lines).rstrip()


def acceptance(rows: Sequence[Row]) -> list[str]:
    """Issue 12's acceptance, checked per scenario on the unweighted means."""
    out = []
    for scen in dict.fromkeys(r.scenario for r in rows):
        by = {r.label: r for r in rows if r.scenario == scen}
        pers = [by[p] for p in PERSONALIZED if p in by]
        if not pers or not any(b in by for b in BASELINES):
            continue
        base_label = max((b for b in BASELINES if b in by), key=lambda b: by[b].mean)
        base, local = by[base_label].mean, by["local-only"].mean
        best = max(pers, key=lambda r: r.mean)
        gap = best.mean - max(base, local)
        line = (f"{scen}: best personalized {best.label} {best.mean:.1f} vs {base_label} {base:.1f} and local-only "
                f"{local:.1f}: {gap:+.1f} points -> {'MET' if gap >= 5.0 else 'not met'}")
        if gap < 5.0 and "pooled+prior" in by:
            room = by["pooled+prior"].mean - max(base, local)
            line += f" (pooled+prior reference {by['pooled+prior'].mean:.1f}: {room:+.1f} above the better baseline)"
        if "choice" in by:
            ch = by["choice"]
            line += (f"; choice {ch.mean:.1f} ({ch.mean - by['FedAvg'].mean:+.1f} vs FedAvg) with "
                     f"{ch.below_local:.0f}% of devices > 1 point below local-only "
                     f"({'ok' if ch.below_local <= 10 else 'NOT ok'}: at most 10%)")
        out.append(line)
    return out


def machine_load() -> str:
    """The load average (the machine is shared: per-run seconds are only indicative)."""
    try:
        one, five, _ = os.getloadavg()
        return f"load average {one:.2f} (1 min) / {five:.2f} (5 min) on {os.cpu_count()} cores"
    except OSError:
        return "load average unknown"


# ----------------------------------------------------------------------------------- main


def parse_overrides(items: Sequence[str], what: str) -> dict[str, dict[str, str]]:
    """['ditto:lam=0.5,personal_epochs=3', ...] -> {'ditto': {'lam': '0.5', 'personal_epochs': '3'}}."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        name, sep, rest = item.partition(":")
        pairs = [kv.partition("=") for kv in filter(None, rest.split(","))]
        if not sep or not pairs or any(not eq for _, eq, _ in pairs):
            raise SystemExit(f"--{what} wants NAME:key=value[,key=value], got {item!r}")
        out.setdefault(name.strip(), {}).update({k.strip(): v.strip() for k, _, v in pairs})
    return out


def _knob(v: str) -> float | int | None:
    if v.lower() == "none":
        return None
    return int(v) if v.lstrip("-").isdigit() else float(v)


def model_spec(cfg: BenchConfig) -> ModelSpec:
    """The shipped model, with batch-norm momentum `bn_momentum` if set: devices take a few steps per
    round, so with 0.99 the running statistics trail the weights by ~100 steps (several rounds) and
    every model that keeps batch norm is evaluated with stale statistics."""
    spec = load_ini(models.path(cfg.model))
    if cfg.bn_momentum is None:
        return spec
    return spec.with_changes(layers=tuple(replace(ls, momentum=cfg.bn_momentum) if ls.type == "batch_normalization"
                                          else ls for ls in spec.layers))


def run(cfg: BenchConfig, say: Callable[..., None] = print) -> tuple[list[ScenarioRun], list[Row]]:
    spec = model_spec(cfg)
    results = [run_scenario(name, seed, spec, cfg, say) for name in cfg.scenarios for seed in cfg.seeds]
    return results, summarize(results)


def config_from_args(argv: list[str] | None) -> tuple[BenchConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny federations (6 devices, 2 rounds, 1 seed): for tests")
    p.add_argument("--scenarios", default=",".join(sc.SCENARIOS), help="comma-separated (default: all)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--model", default=BenchConfig.model, help="shipped model name (default digits_cnn)")
    p.add_argument("--bn-momentum", type=float, default=BenchConfig.bn_momentum,
                   help="batch-norm momentum (default 0.9; negative: the model file's)")
    p.add_argument("--rounds", type=int, default=BenchConfig.rounds)
    p.add_argument("--local-epochs", type=int, default=BenchConfig.local_epochs)
    p.add_argument("--batch", type=int, default=BenchConfig.batch_size)
    p.add_argument("--lr", type=float, default=BenchConfig.learning_rate,
                   help=f"learning rate (default {BenchConfig.learning_rate}; negative: the model file's)")
    p.add_argument("--pooled-epochs", type=int, default=BenchConfig.pooled_epochs)
    p.add_argument("--choice-over", default=BenchConfig.choice_over,
                   help="the run whose per-device choice is the choice row: auto (best on validation) or a method")
    p.add_argument("--hp", action="append", default=[], metavar="METHOD:k=v,...", help="method hyperparameters")
    p.add_argument("--knob", action="append", default=[], metavar="SCENARIO:k=v,...", help="scenario knobs")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write every run's per-device results")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    knobs = {s: {k: _knob(v) for k, v in kv.items()} for s, kv in parse_overrides(args.knob, "knob").items()}
    cfg = BenchConfig(
        model=args.model, bn_momentum=None if args.bn_momentum < 0 else args.bn_momentum, rounds=args.rounds,
        local_epochs=args.local_epochs, batch_size=args.batch, learning_rate=None if args.lr < 0 else args.lr,
        pooled_epochs=args.pooled_epochs, seeds=tuple(int(s) for s in args.seeds.split(",") if s.strip()),
        scenarios=tuple(s.strip() for s in args.scenarios.split(",") if s.strip()),
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        choice_over=args.choice_over, hp=parse_overrides(args.hp, "hp"), knobs=knobs)
    unknown = (sorted(set(cfg.scenarios) - set(sc.SCENARIOS)) + sorted(set(cfg.methods) - set(METHODS))
               + ([cfg.choice_over] if cfg.choice_over not in (*METHODS, "auto") else []))
    if unknown:
        p.error(f"unknown scenarios/methods {unknown}")
    if args.quick:
        quick = {s: {"devices": 6, **({"examples": 20} if s == "scarce" else {})} for s in cfg.scenarios}
        for s, kv in cfg.knobs.items():
            quick.setdefault(s, {}).update(kv)
        cfg = replace(cfg, rounds=2, local_epochs=1, pooled_epochs=2, seeds=cfg.seeds[:1], knobs=quick,
                      hp={m: {"ft_epochs": "1", **cfg.hp.get(m, {})} for m in {*METHODS, *cfg.hp}})
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    cfg, args = config_from_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    t0 = time.perf_counter()
    print(f"personalization benchmark, in-process (no gRPC; server step: fedpers.server.aggregate WeightedMean + "
          f"FedAvg): model {cfg.model} (batch-norm momentum {cfg.bn_momentum or 'from the file'}), {cfg.rounds} "
          f"rounds x {cfg.local_epochs} local epochs, batch {cfg.batch_size}, lr {cfg.learning_rate or 'from the file'}"
          f", seeds {list(cfg.seeds)}; {machine_load()}", flush=True)
    results, rows = run(cfg)
    print()
    print(format_table(rows))
    print()
    print("acc: mean over devices (unweighted), then mean ± sd over seeds; weighted: devices weighted by examples;")
    print("Δ local: acc - local-only; <local-1pt: devices (all seeds) more than 1 point below their local-only model.")
    print("choice: per-device choice (candidates + local-only, on the device's validation split) of the run picked by "
          f"{'validation' if cfg.choice_over == 'auto' else cfg.choice_over}; per run (val %: its own model):")
    print()
    print(format_choice_table(results))
    print()
    for line in acceptance(rows):
        print(line)
    print(f"done in {time.perf_counter() - t0:.0f}s; {machine_load()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": asdict(cfg), "results": [asdict(r) for r in results],
                       "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
