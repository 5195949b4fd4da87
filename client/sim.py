"""`fedpers-sim`: one server and N device processes on this machine, over real gRPC on 127.0.0.1.

    fedpers-sim --devices 8 --rounds 10 [--report-dir DIR] [--codec C] [--seed S] ...
    fedpers-sim --scenario feature_shift --devices 40 --personalization all --seeds 0,1,2 ...
    fedpers-sim --data-dir DIR --model MODEL.ini ...          (your own device-*.npz)
    fedpers-sim partition --devices N --out DIR [--seed S] [--alpha A]
    fedpers-sim local-only --data DATA.npz --model MODEL.ini --epochs E --out RESULT.json

The simulator writes the devices' data (the non-IID digits partition, a heterogeneity scenario of
`client.scenarios`, or your own files from --data-dir; the digits fitted to the model's input shape),
makes a throwaway CA and server certificate for the run (TLS like a real deployment; `--insecure` for
plaintext), starts `fedpers-server` and one `fedpers-client run` process per device (each process
reads only its own data file) and follows the rounds through GetStatus. Without --personalization it
then trains a local-only baseline per device (again one process per device); with it, it runs one
federation per method (FedAvg always among them) and seed over the same devices, each device training
its own local-only model for its per-device choice. Either way it writes a table, ONE `report.json`
and ONE `accuracy.png`. From Python: `simulate(SimConfig(devices=4, rounds=3))` returns the `SimReport`.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fedpers import models
from fedpers import personalization as pers
from fedpers.argtypes import fraction, nonnegative_int, positive_float, positive_int
from fedpers.client import sim_report
from fedpers.client.engines import add_engine_args, check_engine, engine_from_args, run_engine
from fedpers.client.processes import Child, ProcessError, wait_for_server
from fedpers.client.sim_report import SimReport
from fedpers.codec import codec_help
from fedpers.nn.modes import DEFAULT_MEMORY_MODE, MEMORY_MODES, memory_modes_help
from fedpers.strategies import AGGREGATORS, STRATEGIES

log = logging.getLogger("fedpers.sim")

DEFAULT_MODEL = models.path("digits_cnn_personal.ini")
SCENARIO_NAMES = ("iid", "label_skew", "feature_shift", "concept_shift", "scarce")  # fedpers.client.scenarios
STATUS_FAILURES_ALLOWED = 25  # consecutive failed GetStatus polls (~5 s) before the run is called broken


class StatusPoll:
    """The simulators' GetStatus follower: a failed poll returns None (keep the last status), until
    STATUS_FAILURES_ALLOWED in a row, which is a SimError."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.failures = 0

    def __call__(self) -> Any:
        import grpc

        try:
            status = self.client.status()
        except grpc.RpcError as exc:
            self.failures += 1
            if self.failures > STATUS_FAILURES_ALLOWED:
                raise SimError(f"the server stopped answering GetStatus: {exc.code().name}: {exc.details()}") from None
            return None
        self.failures = 0
        return status


class SimError(ProcessError):
    """The simulation could not complete (a process died, a timeout); the message says which."""


class SimInterrupted(SimError):
    """Ctrl-C or the --timeout ended the run early; the report of what finished was still written."""

    def __init__(self, message: str, report: SimReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class SimConfig:
    """Everything a simulation run needs; the CLI flags map one to one onto these fields."""

    devices: int = 8
    rounds: int = 10
    report_dir: Path | None = None  # None: runs/sim-<timestamp>
    codec: str = "fp32"
    downlink_codec: str = "none"
    seed: int = 0
    alpha: float | None = None  # Dirichlet label skew; None: 0.5 for the default split, the scenario's own default
    local_epochs: int = 5
    model: Path = DEFAULT_MODEL
    strategy: str = "fedavg"
    server_lr: float | None = None
    min_devices: int | None = None  # None: all devices but one (a lost device does not stall the run)
    fraction: float = 1.0
    round_timeout: float = 60.0
    memory: str = DEFAULT_MEMORY_MODE
    memory_budget: str | None = None
    timeout: float = 600.0
    save_uploads: bool = False
    keep_work: bool = False
    quiet: bool = False
    aggregation: str = "mean"
    bn_stats: str = "shared"
    dp_clip: float = 0.0
    dp_noise: float = 0.0
    insecure: bool = False  # plaintext instead of TLS with a throwaway CA made for the run
    batch_size: int | None = None  # None: the model file's
    learning_rate: float | None = None  # None: the model file's
    # the devices' data: the default non-IID split, a scenario (client.scenarios) with its knobs, or your files
    scenario: str | None = None
    min_examples: int | None = None  # every device gets at least this many (None: the split's / scenario's default)
    examples: int | None = None  # scenarios: at most this many per device (scarce: 20)
    clusters: int | None = None  # feature_shift / concept_shift: groups of devices sharing a transform / label map
    jitter_deg: float | None = None  # feature_shift: each device's own rotation, up to this many degrees
    jitter_px: int | None = None  # feature_shift: each device's own shift, up to this many pixels
    data_dir: Path | None = None  # your own device-*.npz (any input shape the model takes)
    # personalization: "all" or "a,b": one federation per method (FedAvg added) and seed, one report
    personalization: str | None = None
    personalization_params: tuple[str, ...] = ()  # "[METHOD:]k=v,..." each; without METHOD: for every method
    seeds: tuple[int, ...] | None = None  # None: (seed,)

    def __post_init__(self) -> None:
        from fedpers.codec import parse_codec

        if self.downlink_codec != "none":
            parse_codec(self.downlink_codec)
        for key in ("devices", "rounds", "local_epochs"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        if self.min_devices is not None and not 1 <= self.min_devices <= self.devices:
            raise ValueError(f"min_devices must be in [1, devices={self.devices}], got {self.min_devices}")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.aggregation not in AGGREGATORS:
            raise ValueError(f"unknown aggregation {self.aggregation!r}; known: {list(AGGREGATORS)}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; known: {list(STRATEGIES)}")
        if self.memory not in MEMORY_MODES:
            raise ValueError(f"unknown memory mode {self.memory!r}; known: {list(MEMORY_MODES)}")
        if not Path(self.model).is_file():
            raise ValueError(f"model file {self.model} does not exist")
        parse_codec(self.codec)
        if self.scenario is not None and self.scenario not in SCENARIO_NAMES:
            raise ValueError(f"unknown scenario {self.scenario!r}; known: {', '.join(SCENARIO_NAMES)}")
        knobs = [k for k in ("examples", "clusters", "jitter_deg", "jitter_px") if getattr(self, k) is not None]
        if knobs and self.scenario is None:
            raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in knobs)} need --scenario")
        if self.data_dir is not None:
            if self.scenario is not None or self.alpha is not None or self.min_examples is not None:
                raise ValueError("--data-dir brings its own data: no --scenario, --alpha or --min-examples")
            found = len(data_files(self.data_dir))
            if found != self.devices:
                raise ValueError(f"--data-dir {self.data_dir} holds {found} device-*.npz files, --devices says "
                                 f"{self.devices}")
        if self.seeds is not None and (not self.seeds or len(set(self.seeds)) != len(self.seeds)):
            raise ValueError(f"seeds must be distinct, got {list(self.seeds)}")
        if self.personalization is None:
            if self.personalization_params or (self.seeds is not None and len(self.seeds) > 1):
                raise ValueError("--personalization-params and several --seeds need --personalization")
        else:
            try:
                for m in self.methods:
                    pers.get(m).parse(self.params_for(m))
            except pers.MethodError as exc:
                raise ValueError(f"personalization: {exc}") from None

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods run, FedAvg first (the baseline every report shows); () without --personalization."""
        if self.personalization is None:
            return ()
        names = list(pers.METHODS) if self.personalization == "all" else [
            n.strip() for n in self.personalization.split(",") if n.strip()]
        for n in names:
            pers.get(n)
        return tuple(dict.fromkeys(["fedavg", *names]))

    def params_for(self, method: str) -> str:
        """The --personalization-params for `method`: the items without a method, then its own."""
        out: list[str] = []
        for item in self.personalization_params:
            head, sep, rest = item.partition(":")
            if sep and "=" not in head:
                if head.strip() not in self.methods:
                    raise pers.MethodError(f"--personalization-params names {head.strip()!r}, which is not run "
                                           f"({', '.join(self.methods)})")
                if head.strip() == method:
                    out.append(rest)
            else:
                out.append(item)
        return ",".join(p.strip() for p in out if p.strip())

    @property
    def seed_list(self) -> tuple[int, ...]:
        return self.seeds or (self.seed,)

    @property
    def min_devices_or_default(self) -> int:
        """--min-devices, else all devices but one (at least one): one lost device never stalls the run."""
        return self.min_devices or max(1, self.devices - 1)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["model"] = str(Path(self.model).resolve())
        out["report_dir"] = str(self.report_dir) if self.report_dir else None
        out["data_dir"] = str(self.data_dir) if self.data_dir else None
        out["methods"] = list(self.methods)
        return out


def data_files(directory: Path) -> list[Path]:
    """The device-<i>.npz files of --data-dir, by their number."""
    files = [p for p in Path(directory).glob("device-*.npz") if p.stem.removeprefix("device-").isdigit()]
    return sorted(files, key=lambda p: int(p.stem.removeprefix("device-")))


@dataclass(frozen=True)
class SimSecrets:
    """The run's enrollment and admin tokens, random per run, handed to children in their environment."""

    enroll_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))

    def __repr__(self) -> str:
        return "SimSecrets(<hidden>)"

    def server_env(self) -> dict[str, str]:
        return {"FEDPERS_ENROLL_TOKEN": self.enroll_token, "FEDPERS_ADMIN_TOKEN": self.admin_token}

    def device_env(self) -> dict[str, str]:
        return {"FEDPERS_ENROLL_TOKEN": self.enroll_token}


@dataclass(frozen=True)
class SimTls:
    """How the run's processes secure their channels: the throwaway PKI's files, or plaintext."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    @classmethod
    def make(cls, cfg: SimConfig, directory: Path) -> SimTls:
        if cfg.insecure:
            return cls()
        from fedpers.pki import make_dev_pki

        pki = make_dev_pki(directory)
        return cls(pki.ca_cert, pki.server_cert, pki.server_key)

    def client(self) -> Any:
        """The TlsConfig the simulator itself (and its devices) use."""
        from fedpers.tls import TlsConfig

        return TlsConfig(ca=self.ca) if self.ca else TlsConfig.plaintext()

    def server_args(self) -> list[str]:
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key)] if self.cert else ["--insecure"]

    def device_args(self) -> list[str]:
        return ["--tls-ca", str(self.ca)] if self.ca else ["--insecure"]


def server_argv(cfg: SimConfig, port_file: Path, store: Path, tls: SimTls = SimTls(), method: str | None = None
                ) -> list[str]:
    """The server's command line (its enrollment and admin tokens go in its environment: SimSecrets), with
    `method` (and its --personalization-params) when the run is one of a method comparison."""
    argv = [sys.executable, "-m", "fedpers.server", "serve", "--model", str(Path(cfg.model).resolve()),
            "--listen", "127.0.0.1:0", "--port-file", str(port_file), "--store", str(store), "--seed", str(cfg.seed),
            "--rounds", str(cfg.rounds), "--min-devices", str(cfg.min_devices_or_default),
            "--fraction", str(cfg.fraction), "--round-timeout", str(cfg.round_timeout),
            "--strategy", cfg.strategy, "--codec", cfg.codec, "--downlink-codec", cfg.downlink_codec,
            "--local-epochs", str(cfg.local_epochs), *tls.server_args()]
    if cfg.server_lr is not None:
        argv += ["--server-lr", str(cfg.server_lr)]
    if cfg.batch_size is not None:
        argv += ["--batch-size", str(cfg.batch_size)]
    if cfg.learning_rate is not None:
        argv += ["--learning-rate", str(cfg.learning_rate)]
    argv += ["--aggregation", cfg.aggregation, "--bn-stats", cfg.bn_stats]
    if cfg.dp_clip > 0:
        argv += ["--dp-clip", str(cfg.dp_clip), "--dp-noise", str(cfg.dp_noise)]
    if method is not None:
        argv += ["--personalization", method]
        if cfg.params_for(method):
            argv += ["--personalization-params", cfg.params_for(method)]
    return argv


def device_argv(cfg: SimConfig, address: str, data: Path, state: Path, name: str, tls: SimTls = SimTls()) -> list[str]:
    """A device's command line (its enrollment token goes in its environment)."""
    argv = [sys.executable, "-m", "fedpers.client", "run", "--server", address, "--data", str(data),
            "--state", str(state), "--name", name, "--memory", cfg.memory, "--json",
            *tls.device_args()]
    if cfg.memory_budget:
        argv += ["--memory-budget", cfg.memory_budget]
    if cfg.save_uploads:
        argv.append("--save-uploads")
    return argv


def default_report_dir() -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"sim-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = Path(f"{base}-{n}")
    return path


@dataclass
class _Run:
    """The processes of one simulation and what has been seen of them."""

    cfg: SimConfig
    work: Path
    say: Callable[..., None]
    tls: SimTls = SimTls()
    secrets: SimSecrets = field(default_factory=SimSecrets)
    t_start: float = field(default_factory=time.monotonic)
    server: Child | None = None
    devices: list[Child] = field(default_factory=list)
    status: Any = None  # the last fedpers.wire.Status seen
    shown: int = 0
    lost: set[str] = field(default_factory=set)  # devices whose process died

    def follow(self, address: str) -> None:
        """Poll GetStatus until the federation is finished and every device has exited."""
        from fedpers.stub import FederationClient

        deadline = time.monotonic() + self.cfg.timeout
        with FederationClient(address, tls=self.tls.client(), timeout=5.0,
                              admin_token=self.secrets.admin_token) as client:
            poll = StatusPoll(client)
            while True:
                assert self.server is not None
                finished = self.status is not None and self.status.finished
                if not (finished and self.server.poll() == 0):  # after the federation it may exit by itself
                    self.server.check_alive()
                for d in self.devices:
                    code = d.poll()
                    if code not in (None, 0) and d.name not in self.lost:
                        self.lost.add(d.name)  # a lost device: the federation goes on without it
                        log.warning("%s exited with code %s; continuing without it:\n%s", d.name, code, d.tail())
                        self.say(f"{d.name} was lost (exit code {code}); continuing without it", flush=True)
                alive = sum(1 for d in self.devices if d.poll() in (None, 0))
                if alive < self.cfg.min_devices_or_default:
                    raise SimError(f"only {alive} devices are left, fewer than min-devices "
                                   f"({self.cfg.min_devices_or_default}): {sorted(self.lost)} exited")
                if not (finished and self.server.poll() is not None):
                    self.status = poll() or self.status
                if self.status is not None:
                    self._show_rounds()
                    if self.status.finished and all(d.poll() is not None for d in self.devices):
                        return
                if all(d.poll() is not None for d in self.devices) and (self.status is None
                                                                        or not self.status.finished):
                    raise SimError("every device exited but the server is not finished")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the simulation did not finish within {self.cfg.timeout:.0f}s "
                                       f"(see {self.work / 'logs'})")
                time.sleep(0.2)

    def _show_rounds(self) -> None:
        rows = sim_report.round_rows(self.status)
        for row in rows[self.shown:]:
            self.say(sim_report.format_round(row, self.cfg.rounds, time.monotonic() - self.t_start), flush=True)
        self.shown = max(self.shown, len(rows))

    def stop_all(self) -> None:
        for d in self.devices:
            d.stop()
        if self.server is not None:
            self.server.stop()


@dataclass(frozen=True)
class Federation:
    """What one federation of a simulation left: how it ended, the last status, the device reports."""

    ended: str  # finished | interrupted | timeout
    status: Any  # the last fedpers.wire.Status seen (None if none was)
    reports: list[Any]  # fedpers.client.report.DeviceReport | None per device
    elapsed: float


def _federate(cfg: SimConfig, work: Path, data_paths: list[Path], say: Callable[..., None],
              method: str | None = None) -> Federation:
    """One server and a device process per data file, followed until done (or Ctrl-C / the timeout)."""
    from fedpers.client.report import read_report

    port_file = work / "server.port"
    tls = SimTls.make(cfg, work / "tls")
    run = _Run(cfg, work, say, tls)
    ended = "finished"
    try:
        run.server = Child.start("server", server_argv(cfg, port_file, work / "store", tls, method),
                                 work / "logs" / "server.log", env=run.secrets.server_env())
        address = wait_for_server(port_file, run.server, timeout=60, tls=tls.client())
        for i, data in enumerate(data_paths):
            state = work / "devices" / str(i)
            argv = device_argv(cfg, address, data, state, f"sim-device-{i}", tls)
            run.devices.append(Child.start(f"device-{i}", argv, work / "logs" / f"device-{i}.log",
                                           stdout_path=state.parent / f"{i}.json", env=run.secrets.device_env()))
        run.follow(address)
    except KeyboardInterrupt:
        ended = "interrupted"
    except TimeoutError as exc:
        ended = "timeout"
        log.warning("%s", exc)
    finally:
        run.stop_all()
        if not cfg.keep_work:
            shutil.rmtree(work / "tls", ignore_errors=True)  # the run's throwaway keys go with it
    reports = [read_report(work / "devices" / str(i) / "report.json") for i in range(len(data_paths))]
    return Federation(ended, run.status, reports, time.monotonic() - run.t_start)


def input_shape(model: Path) -> tuple[int, ...] | None:
    """The model's input shape (C, H, W), or None when its first layer does not say."""
    from fedpers.nn import load_ini

    first = load_ini(model).layers[0]
    return tuple(int(d) for d in first.input_shape) if first.input_shape is not None else None


def digits_fit(model: Path) -> tuple[int, ...] | None:
    """The shape the 1x8x8 digits must be fitted to for `model` (`partition.fit_to_input`); None: as they are."""
    shape = input_shape(model)
    return None if shape in (None, (1, 8, 8)) else shape


def write_data(cfg: SimConfig, seed: int, out: Path) -> list[Path]:
    """The devices' data files for `seed`: --data-dir's own (checked against the model), else a scenario or
    the default non-IID split of the digits, fitted to the model's input shape (`partition.fit_to_input`).
    DataError / PartitionError (FitError) name what does not fit."""
    from fedpers.client.data import check_against_model, load_data
    from fedpers.nn import load_ini

    shape = input_shape(Path(cfg.model))
    fit = digits_fit(Path(cfg.model))
    if cfg.data_dir is not None:
        paths = data_files(cfg.data_dir)
    elif cfg.scenario is not None:
        from fedpers.client import scenarios

        knobs = {k: getattr(cfg, k) for k in scenarios.KNOBS if getattr(cfg, k) is not None}
        paths = scenarios.write_scenario(out, scenarios.make(cfg.scenario, seed=seed, devices=cfg.devices, **knobs),
                                         fit)
    else:
        from fedpers.client.partition import partition_digits, write_partition

        splits = partition_digits(cfg.devices, seed=seed, alpha=0.5 if cfg.alpha is None else cfg.alpha,
                                  min_size=cfg.min_examples)
        paths = write_partition(out, splits, fit)
    last = load_ini(cfg.model).layers[-1]
    for path in paths[:1] if cfg.data_dir is None else paths:  # the generated files all share one layout
        if shape is not None:
            check_against_model(load_data(path), shape, last.unit if last.type == "fully_connected" else None,
                                str(path))
    return paths


def simulate(cfg: SimConfig) -> SimReport:
    """The whole run; returns the report (also written to report_dir/report.json). On Ctrl-C or the
    timeout, the report of what finished is written and SimInterrupted carries it."""
    report_dir = Path(cfg.report_dir) if cfg.report_dir else default_report_dir()
    cfg = replace(cfg, report_dir=report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    work = report_dir / "work"
    if work.exists():
        shutil.rmtree(work)
    say = (lambda *a, **k: None) if cfg.quiet else print
    where = (f"data {cfg.data_dir}" if cfg.data_dir else f"scenario {cfg.scenario}" if cfg.scenario
             else "the non-IID digits")
    say(f"fedpers-sim: {cfg.devices} devices ({where}), {cfg.rounds} rounds, codec {cfg.codec}, "
        f"{cfg.local_epochs} local epoch(s), model {Path(cfg.model).name}"
        + (f", methods {', '.join(cfg.methods)}, seeds {list(cfg.seed_list)}" if cfg.methods else "")
        + f" -> {report_dir}")
    try:
        report = _simulate_methods(cfg, work, say) if cfg.methods else _simulate_one(cfg, work, say)
    finally:
        if not cfg.keep_work:
            for data in work.glob("**/data"):
                shutil.rmtree(data, ignore_errors=True)  # device data is removed unless --keep-work
    from fedpers.store import atomic_write_bytes

    atomic_write_bytes(report_dir / "report.json", (json.dumps(report.to_dict(), indent=2) + "\n").encode())
    if report.runs:
        plotted = sim_report.plot_methods(report_dir / "accuracy.png", report.runs)
        say("")
        say(sim_report.format_comparison(report.comparison))
    else:
        plotted = sim_report.plot_accuracy(report_dir / "accuracy.png", report.rounds, report.devices)
        say("")
        say(sim_report.format_table(report.devices))
    say(f"\nreport: {report_dir / 'report.json'}" + (f"  plot: {report_dir / 'accuracy.png'}" if plotted else ""))
    if report.summary.dp_epsilon is not None:
        say(f"differential privacy: each device spent at most epsilon = {report.summary.dp_epsilon:.3f} at "
            f"delta = 1e-5 (dp-accounting RDP; clip {cfg.dp_clip}, noise multiplier {cfg.dp_noise})")
    say(f"{report.ended} in {report.summary.elapsed_seconds:.1f}s")
    if report.ended != "finished":
        done = len(report.runs) if report.runs else len(report.rounds)
        what = "federations" if report.runs else f"of {cfg.rounds} rounds"
        raise SimInterrupted(f"the simulation was {'interrupted' if report.ended == 'interrupted' else 'timed out'} "
                             f"after {done} {what}; report: {report_dir / 'report.json'}", report)
    return report


def _simulate_one(cfg: SimConfig, work: Path, say: Callable[..., None]) -> SimReport:
    """No personalization method: one federation, then local-only baselines in their own processes."""
    from fedpers.client.baseline import run_baselines

    t0 = time.monotonic()
    data_paths = write_data(cfg, cfg.seed, work / "data")
    fed = _federate(cfg, work, data_paths, say)
    reports = fed.reports
    if fed.ended == "finished":
        epochs = [r.total_epochs if r and r.total_epochs else cfg.rounds * cfg.local_epochs for r in reports]
        say("training local-only baselines (each device alone, same number of epochs)...", flush=True)
        baselines = run_baselines(Path(cfg.model), data_paths, epochs, cfg.seed, cfg.memory, work)
    else:
        say(f"fedpers-sim: {fed.ended}; writing the report of what finished (no local-only baselines)", flush=True)
        baselines = [None] * cfg.devices
    rows = sim_report.device_rows(reports, baselines)
    rounds = sim_report.round_rows(fed.status)
    return SimReport(config=cfg.as_json(), rounds=rounds, devices=rows,
                     summary=sim_report.summarize(rows, fed.status, time.monotonic() - t0), ended=fed.ended)


def _simulate_methods(cfg: SimConfig, work: Path, say: Callable[..., None]) -> SimReport:
    """One federation per method and seed over the same devices (each seed its own data), then the
    comparison. Each device trains its own local-only model for its per-device choice."""
    t0 = time.monotonic()
    runs: list[sim_report.MethodRun] = []
    ended, last = "finished", None
    for seed in cfg.seed_list:
        data_paths = write_data(cfg, seed, work / f"seed-{seed}" / "data")
        for method in cfg.methods:
            say(f"-- seed {seed}: {method} ({cfg.params_for(method) or 'its defaults'})", flush=True)
            fed = _federate(replace(cfg, seed=seed), work / f"seed-{seed}" / method, data_paths, say, method)
            rows = sim_report.method_device_rows(fed.reports)
            runs.append(sim_report.MethodRun(
                method=method, seed=seed, hyperparams=cfg.params_for(method), ended=fed.ended,
                elapsed_seconds=round(fed.elapsed, 2),
                fleet_default=next((d.fleet_default for d in rows if d.fleet_default), ""),
                rounds=sim_report.round_rows(fed.status), devices=rows))
            last = fed.status
            if fed.ended != "finished":
                ended = fed.ended
                say(f"fedpers-sim: {ended}; writing the report of the federations that finished", flush=True)
                break
        if ended != "finished":
            break
    comparison, per_device = sim_report.compare([r for r in runs if r.ended == "finished"])
    up = sum(d.bytes_up for r in runs for d in r.devices)
    trained = sum(d.rounds_trained for r in runs for d in r.devices)
    fedavg = next((c for c in comparison if c.label == "FedAvg"), None)
    local = next((c for c in comparison if c.model == "local_only"), None)
    summary = sim_report.Summary(
        global_accuracy=fedavg.weighted_mean / 100 if fedavg else None, personalized_accuracy=None,
        local_only_accuracy=local.weighted_mean / 100 if local else None, bytes_up=up,
        bytes_down=sum(d.bytes_down for r in runs for d in r.devices), bytes_up_per_device_round=up / max(1, trained),
        version=last.version if last is not None else None, elapsed_seconds=round(time.monotonic() - t0, 2))
    return SimReport(config=cfg.as_json(), rounds=[], devices=[], summary=summary, ended=ended,
                     notes={**sim_report.NOTES, **sim_report.METHOD_NOTES}, runs=runs, comparison=comparison,
                     per_device=per_device)


# ------------------------------------------------------------------------------------- CLI


def add_run_args(p: argparse.ArgumentParser) -> None:
    """The flags of a simulation run: one per SimConfig field, defaults (and their help) from SimConfig."""
    fields = SimConfig.__dataclass_fields__

    def arg(flag: str, help: str, **kw: Any) -> None:
        default = fields[flag.lstrip("-").replace("-", "_")].default
        shown = Path(default).name if isinstance(default, Path) else default
        p.add_argument(flag, default=argparse.SUPPRESS, help=f"{help} (default {shown})", **kw)

    arg("--devices", "number of device processes", type=positive_int)
    arg("--rounds", "federated rounds", type=positive_int)
    arg("--report-dir", "where report.json and accuracy.png go; None: runs/sim-<timestamp>", type=Path)
    arg("--codec", "delta codec: " + codec_help())
    arg("--downlink-codec", "the codec of each published version's step (devices download only the steps since "
        "the version they hold); none: whole models")
    arg("--seed", "seed of the partition, the server and the baselines", type=int)
    arg("--alpha", "Dirichlet label-skew concentration (smaller: more skew); None: 0.5, or the scenario's default "
        "(label_skew 0.1)", type=positive_float)
    arg("--local-epochs", "local epochs per round", type=positive_int)
    arg("--model", "model INI", type=Path)
    arg("--strategy", "server optimizer: " + "; ".join(f"{k}: {v}" for k, v in STRATEGIES.items()),
        choices=tuple(STRATEGIES))
    arg("--server-lr", "server learning rate; None: the strategy's", type=positive_float)
    arg("--min-devices", "devices a round needs to open and, at its deadline, to close; None: all but one",
        type=positive_int)
    arg("--fraction", "fraction of waiting devices sampled per round", type=fraction)
    arg("--round-timeout", "seconds before a round closes or is abandoned", type=positive_float)
    arg("--memory", "device trainer memory mode: " + memory_modes_help(), choices=MEMORY_MODES)
    arg("--memory-budget", "device memory budget, e.g. 64MiB; None: no budget")
    arg("--timeout", "give up after this many seconds (the report of what finished is still written)",
        type=positive_float)
    arg("--save-uploads", "devices keep a copy of each uploaded blob", action="store_true")
    arg("--keep-work", "keep the partitioned data under report-dir/work", action="store_true")
    arg("--quiet", "no progress output", action="store_true")
    arg("--aggregation", "how the server combines deltas: " + "; ".join(f"{k}: {v}" for k, v in AGGREGATORS.items()),
        choices=tuple(AGGREGATORS))
    arg("--bn-stats", "batch-norm running statistics: shared (averaged) or local (kept on each device)",
        choices=("shared", "local"))
    arg("--dp-clip", "differential privacy: devices clip their delta to this L2 norm; 0: off", type=float)
    arg("--dp-noise", "differential privacy: Gaussian noise std = DP_NOISE x DP_CLIP; epsilon per round in the "
        "report", type=float)
    arg("--insecure", "plaintext gRPC instead of TLS with a throwaway CA made for the run", action="store_true")
    arg("--batch-size", "device batch size; None: the model file's", type=positive_int)
    arg("--learning-rate", "device learning rate; None: the model file's", type=positive_float)
    d = p.add_argument_group("the devices' data")

    def data_arg(flag: str, help: str, **kw: Any) -> None:
        default = fields[flag.lstrip("-").replace("-", "_")].default
        d.add_argument(flag, default=argparse.SUPPRESS, help=f"{help} (default {default})", **kw)

    data_arg("--scenario", "a kind of heterogeneity on the digits (docs/personalization.md): iid, label_skew, "
             "feature_shift (per-cluster intensity, + --jitter-deg/--jitter-px), concept_shift (per-cluster label "
             "maps), scarce (--examples per device); each device's test split is the shared test pool through its "
             "eyes, weighted by its labels; None: the default split (Dirichlet --alpha, a rotation per device)",
             choices=SCENARIO_NAMES)
    data_arg("--min-examples", "every device gets at least this many examples; None: the split's own default",
             type=positive_int)
    data_arg("--examples", "scenario: at most this many examples per device (scarce: 20)", type=positive_int)
    data_arg("--clusters", "feature_shift / concept_shift: groups of devices sharing a transform or label map "
             "(scenario default 4)", type=positive_int)
    data_arg("--jitter-deg", "feature_shift: each device's own rotation, up to this many degrees", type=float)
    data_arg("--jitter-px", "feature_shift: each device's own shift, up to this many pixels", type=nonnegative_int)
    data_arg("--data-dir", "your own data: DIR/device-<i>.npz (x, y[, x_test, y_test[, w_test]]), one device per "
             "file, any input shape the --model takes; --devices defaults to their number", type=Path)
    m = p.add_argument_group("personalization methods")
    m.add_argument("--personalization", default=argparse.SUPPRESS, metavar="all|NAME[,NAME...]",
                   help="run one federation per method (" + ", ".join(pers.METHODS) + "; FedAvg is always added "
                        "as the baseline) and seed over the same devices, and write ONE report comparing them "
                        "(default: none: one federation, the layers the model marks personal stay on the devices)")
    m.add_argument("--personalization-params", action="append", default=argparse.SUPPRESS, metavar="[METHOD:]K=V,...",
                   help="hyperparameters (docs/personalization.md), for METHOD or, without it, for every method run; "
                        "repeatable, e.g. --personalization-params ft_epochs=3 --personalization-params ditto:lam=0.5")
    m.add_argument("--seeds", type=_seeds, default=argparse.SUPPRESS, metavar="S,S,...",
                   help="run every method on each seed's data (the spread over seeds is reported; default: --seed)")


def _seeds(text: str) -> tuple[int, ...]:
    """--seeds 0,1,2"""
    try:
        seeds = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds like 0,1,2, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("expected at least one seed")
    return seeds


def config_from_args(ns: argparse.Namespace) -> SimConfig:
    """The SimConfig of the flags given (the others keep SimConfig's defaults); with --data-dir, --devices
    defaults to the number of its device files."""
    names = SimConfig.__dataclass_fields__
    values = {k: v for k, v in vars(ns).items() if k in names}
    if "personalization_params" in values:
        values["personalization_params"] = tuple(values["personalization_params"])
    if values.get("data_dir") is not None and "devices" not in values:
        values["devices"] = len(data_files(values["data_dir"])) or 1
    return SimConfig(**values)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedpers-sim",
        description="Federated personalization on this machine: one server, N device processes, real gRPC. "
                    "Without a subcommand, runs a simulation with the flags below.")
    add_run_args(p)
    add_engine_args(p)
    p.add_argument("--log-level", default="WARNING", help="logging of the simulator itself (default WARNING)")
    sub = p.add_subparsers(dest="command", metavar="{partition,local-only}")

    part = sub.add_parser("partition", help="write the per-device data files of the non-IID digits split",
                          description="Write the non-IID digits split (or a --scenario) as device-<i>.npz (x, y, "
                                      "x_test, y_test[, w_test]), fitted to --model's input shape.")
    part.add_argument("--devices", type=positive_int, required=True, metavar="N", help="number of devices (files)")
    part.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for device-<i>.npz")
    part.add_argument("--seed", type=int, default=0, metavar="S",
                      help="seed of the split and distortions (default 0; the simulator's default too)")
    part.add_argument("--alpha", type=positive_float, default=None, metavar="A",
                      help="Dirichlet concentration of the label skew: smaller is more skewed (default 0.5; "
                           "label_skew: 0.1)")
    part.add_argument("--scenario", choices=SCENARIO_NAMES, default=None,
                      help="a kind of heterogeneity instead of the default split (see fedpers-sim --help)")
    part.add_argument("--min-examples", type=positive_int, default=None, metavar="N",
                      help="every device gets at least N examples")
    part.add_argument("--model", type=Path, default=DEFAULT_MODEL, metavar="MODEL.ini",
                      help="fit the 8x8 digits to this model's input shape (default digits_cnn_personal.ini: as is)")

    lo = sub.add_parser("local-only", help="one local-only baseline: train a fresh model on one device's data",
                        description="Train a fresh model on one device's data only; print/write its accuracy.")
    lo.add_argument("--data", type=Path, required=True, metavar="DATA.npz", help="the device's data file")
    lo.add_argument("--model", type=Path, required=True, metavar="MODEL.ini", help="model to train from scratch")
    lo.add_argument("--epochs", type=positive_int, required=True, metavar="N", help="epochs of local training")
    lo.add_argument("--seed", type=int, default=0, metavar="S", help="seed for init and shuffling (default 0)")
    lo.add_argument("--memory", default=DEFAULT_MEMORY_MODE, choices=MEMORY_MODES,
                    help=memory_modes_help(DEFAULT_MEMORY_MODE))
    lo.add_argument("--out", type=Path, default=None, metavar="FILE", help="write the result JSON here")
    return p


def _partition(ns: argparse.Namespace) -> int:
    from fedpers.client.data import DataError
    from fedpers.client.partition import PartitionError

    try:
        cfg = SimConfig(devices=ns.devices, seed=ns.seed, alpha=ns.alpha, scenario=ns.scenario,
                        min_examples=ns.min_examples, model=ns.model)
        paths = write_data(cfg, ns.seed, ns.out)
    except (PartitionError, DataError, ValueError) as exc:
        print(f"fedpers-sim partition: {exc}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


def _local_only(ns: argparse.Namespace) -> int:
    from fedpers.client.baseline import local_only
    from fedpers.store import atomic_write_bytes

    text = local_only(ns.data, ns.model, ns.epochs, ns.seed, ns.memory).to_json()
    if ns.out:
        atomic_write_bytes(ns.out, text.encode())
    else:
        print(text)
    return 0


def _run(ns: argparse.Namespace) -> int:
    from fedpers.client.data import DataError
    from fedpers.client.partition import PartitionError

    try:
        cfg = config_from_args(ns)
        engine = engine_from_args(ns)
        check_engine(cfg, engine)
    except ValueError as exc:  # SimConfig's checks: the message names the flag
        print(f"fedpers-sim: {exc}", file=sys.stderr)
        return 2
    try:
        run_engine(cfg, engine)
    except (PartitionError, DataError) as exc:  # too few examples for this many devices, data the model cannot take
        print(f"fedpers-sim: {exc}", file=sys.stderr)
        return 2
    except SimInterrupted as exc:
        print(f"fedpers-sim: {exc}", file=sys.stderr)
        return 130 if exc.report.ended == "interrupted" else 1
    except ProcessError as exc:
        print(f"fedpers-sim: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s [%(name)s] %(message)s")
    logging.getLogger().setLevel(getattr(logging, str(ns.log_level).upper(), logging.WARNING))
    handler = {"partition": _partition, "local-only": _local_only}.get(ns.command, _run)
    return handler(ns)


if __name__ == "__main__":
    # `python -m fedpers.client.sim` runs this file as __main__, a second copy of the module: the engines
    # import fedpers.client.sim, so run that copy's main, whose except clauses name the classes they raise.
    from fedpers.client import sim as _package_sim

    sys.exit(_package_sim.main())
