"""`fedpers-sim`: one server and N device processes on this machine, over real gRPC on 127.0.0.1.

    fedpers-sim --devices 8 --rounds 10 [--report-dir DIR] [--codec C] [--seed S] ...
    fedpers-sim partition --devices N --out DIR [--seed S] [--alpha A]
    fedpers-sim local-only --data DATA.npz --model MODEL.ini --epochs E --out RESULT.json

The simulator writes the non-IID digits partition, makes a throwaway CA and server certificate
for the run (TLS like a real deployment; `--insecure` for plaintext), starts `fedpers-server` and one
`fedpers-client run` process per device (each process reads only its own data file), follows
the rounds through GetStatus, then trains a local-only baseline per device (again one process
per device) and writes a table, `report.json` and `accuracy.png`. From Python:
`simulate(SimConfig(devices=4, rounds=3))` returns the `SimReport`.
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
from fedpers.argtypes import fraction, positive_float, positive_int
from fedpers.client import sim_report
from fedpers.client.engines import add_engine_args, engine_from_args, run_engine
from fedpers.client.processes import Child, ProcessError, wait_for_server
from fedpers.client.sim_report import SimReport
from fedpers.codec import codec_help
from fedpers.nn.modes import DEFAULT_MEMORY_MODE, MEMORY_MODES, memory_modes_help
from fedpers.strategies import AGGREGATORS, STRATEGIES

log = logging.getLogger("fedpers.sim")

DEFAULT_MODEL = models.path("digits_cnn_personal.ini")
STATUS_FAILURES_ALLOWED = 25  # consecutive failed GetStatus polls (~5 s) before the run is called broken


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
    alpha: float = 0.5
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

    @property
    def min_devices_or_default(self) -> int:
        """--min-devices, else all devices but one (at least one): one lost device never stalls the run."""
        return self.min_devices or max(1, self.devices - 1)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["model"] = str(Path(self.model).resolve())
        out["report_dir"] = str(self.report_dir) if self.report_dir else None
        return out


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


def server_argv(cfg: SimConfig, port_file: Path, store: Path, tls: SimTls = SimTls()) -> list[str]:
    """The server's command line (its enrollment and admin tokens go in its environment: SimSecrets)."""
    argv = [sys.executable, "-m", "fedpers.server", "serve", "--model", str(Path(cfg.model).resolve()),
            "--listen", "127.0.0.1:0", "--port-file", str(port_file), "--store", str(store), "--seed", str(cfg.seed),
            "--rounds", str(cfg.rounds), "--min-devices", str(cfg.min_devices_or_default),
            "--fraction", str(cfg.fraction), "--round-timeout", str(cfg.round_timeout),
            "--strategy", cfg.strategy, "--codec", cfg.codec, "--downlink-codec", cfg.downlink_codec,
            "--local-epochs", str(cfg.local_epochs), *tls.server_args()]
    if cfg.server_lr is not None:
        argv += ["--server-lr", str(cfg.server_lr)]
    argv += ["--aggregation", cfg.aggregation, "--bn-stats", cfg.bn_stats]
    if cfg.dp_clip > 0:
        argv += ["--dp-clip", str(cfg.dp_clip), "--dp-noise", str(cfg.dp_noise)]
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
        import grpc
        from fedpers.stub import FederationClient

        deadline = time.monotonic() + self.cfg.timeout
        failures = 0
        with FederationClient(address, tls=self.tls.client(), timeout=5.0,
                              admin_token=self.secrets.admin_token) as client:
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
                try:
                    if not (finished and self.server.poll() is not None):
                        self.status = client.status()
                        failures = 0
                except grpc.RpcError as exc:
                    failures += 1
                    if failures > STATUS_FAILURES_ALLOWED:
                        raise SimError(f"the server stopped answering GetStatus: {exc.code().name}: "
                                       f"{exc.details()}") from None
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
            self.say(f"round {row.round:>3}/{self.cfg.rounds}  v{row.version:<3} {row.devices} devices  "
                     f"global {sim_report.fmt_pct(row.global_accuracy)}%  "
                     f"personalized {sim_report.fmt_pct(row.personalized_accuracy)}%  "
                     + (f"eps {row.dp_epsilon:.2f}  " if row.dp_epsilon is not None else "")
                     + f"({time.monotonic() - self.t_start:5.1f}s)", flush=True)
        self.shown = max(self.shown, len(rows))

    def stop_all(self) -> None:
        for d in self.devices:
            d.stop()
        if self.server is not None:
            self.server.stop()


def simulate(cfg: SimConfig) -> SimReport:
    """The whole run; returns the report (also written to report_dir/report.json). On Ctrl-C or the
    timeout, the report of what finished is written and SimInterrupted carries it."""
    from fedpers.client.baseline import run_baselines
    from fedpers.client.partition import partition_digits, write_partition
    from fedpers.client.report import read_report
    from fedpers.store import atomic_write_bytes

    report_dir = Path(cfg.report_dir) if cfg.report_dir else default_report_dir()
    cfg = replace(cfg, report_dir=report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    work = report_dir / "work"
    if work.exists():
        shutil.rmtree(work)
    say = (lambda *a, **k: None) if cfg.quiet else print
    say(f"fedpers-sim: {cfg.devices} devices, {cfg.rounds} rounds, codec {cfg.codec}, "
        f"{cfg.local_epochs} local epoch(s), model {Path(cfg.model).name} -> {report_dir}")

    data_paths = write_partition(work / "data", partition_digits(cfg.devices, seed=cfg.seed, alpha=cfg.alpha))
    port_file = work / "server.port"
    tls = SimTls.make(cfg, work / "tls")
    run = _Run(cfg, work, say, tls)
    ended = "finished"
    try:
        run.server = Child.start("server", server_argv(cfg, port_file, work / "store", tls),
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

    reports = [read_report(work / "devices" / str(i) / "report.json") for i in range(cfg.devices)]
    if ended == "finished":
        epochs = [r.total_epochs if r and r.total_epochs else cfg.rounds * cfg.local_epochs for r in reports]
        say("training local-only baselines (each device alone, same number of epochs)...", flush=True)
        baselines = run_baselines(Path(cfg.model), data_paths, epochs, cfg.seed, cfg.memory, work)
    else:
        say(f"fedpers-sim: {ended}; writing the report of what finished (no local-only baselines)", flush=True)
        baselines = [None] * cfg.devices
    rows = sim_report.device_rows(reports, baselines)
    rounds = sim_report.round_rows(run.status)
    report = SimReport(config=cfg.as_json(), rounds=rounds, devices=rows,
                       summary=sim_report.summarize(rows, run.status, time.monotonic() - run.t_start), ended=ended)
    atomic_write_bytes(report_dir / "report.json", (json.dumps(report.to_dict(), indent=2) + "\n").encode())
    plotted = sim_report.plot_accuracy(report_dir / "accuracy.png", rounds, rows)
    say("")
    say(sim_report.format_table(rows))
    say(f"\nreport: {report_dir / 'report.json'}" + (f"  plot: {report_dir / 'accuracy.png'}" if plotted else ""))
    if report.summary.dp_epsilon is not None:
        say(f"differential privacy: each device spent at most epsilon = {report.summary.dp_epsilon:.3f} at "
            f"delta = 1e-5 (dp-accounting RDP; clip {cfg.dp_clip}, noise multiplier {cfg.dp_noise})")
    say(f"{ended} in {report.summary.elapsed_seconds:.1f}s")
    if not cfg.keep_work:
        shutil.rmtree(work / "data", ignore_errors=True)
        shutil.rmtree(work / "tls", ignore_errors=True)  # the run's throwaway keys go with it
    if ended != "finished":
        raise SimInterrupted(f"the simulation was {'interrupted' if ended == 'interrupted' else 'timed out'} "
                             f"after {len(rounds)} of {cfg.rounds} rounds; report: {report_dir / 'report.json'}",
                             report)
    return report


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
    arg("--alpha", "Dirichlet label-skew concentration (smaller: more skew)", type=float)
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


def config_from_args(ns: argparse.Namespace) -> SimConfig:
    """The SimConfig of the flags given (the others keep SimConfig's defaults)."""
    names = SimConfig.__dataclass_fields__
    return SimConfig(**{k: v for k, v in vars(ns).items() if k in names})


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
                          description="Write the non-IID digits split as device-<i>.npz (x, y, x_test, y_test).")
    part.add_argument("--devices", type=positive_int, required=True, metavar="N", help="number of devices (files)")
    part.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for device-<i>.npz")
    part.add_argument("--seed", type=int, default=0, metavar="S",
                      help="seed of the split and distortions (default 0; the simulator's default too)")
    part.add_argument("--alpha", type=float, default=0.5, metavar="A",
                      help="Dirichlet concentration of the label skew: smaller is more skewed (default 0.5)")

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
    from fedpers.client.partition import PartitionError, partition_digits, write_partition

    try:
        paths = write_partition(ns.out, partition_digits(ns.devices, seed=ns.seed, alpha=ns.alpha))
    except PartitionError as exc:
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
    from fedpers.client.partition import PartitionError

    try:
        cfg = config_from_args(ns)
        engine = engine_from_args(ns)
    except ValueError as exc:  # SimConfig's checks: the message names the flag
        print(f"fedpers-sim: {exc}", file=sys.stderr)
        return 2
    try:
        run_engine(cfg, engine)
    except PartitionError as exc:  # e.g. too few examples for this many devices at this alpha
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
