"""fedpers-server: run the aggregation server, or ask a running one for its health or status.

    fedpers-server --model MODEL.ini --store DIR [options]      (same as `fedpers-server serve ...`)
    fedpers-server health --address HOST:PORT [--tls-ca CA]     exit 0 iff SERVING (docker HEALTHCHECK)
    fedpers-server status --address HOST:PORT [--json]          a running server's progress
    fedpers-server status --store DIR [--json]                  what a stopped server left in its store
    fedpers-server report --store DIR|--address A [--json F] [--png F]   per-round report and accuracy plot
    fedpers-server export --store DIR [--version V] --out PATH     a model version as .npz or NNTrainer .bin+.ini
    fedpers-server dev-certs --out DIR [--name HOST ...]        a throwaway CA and server certificate
    fedpers-server devices list|show|revoke --store DIR         enrolled devices; revoke one

The gRPC port speaks TLS (--tls-cert/--tls-key); plaintext only with --insecure (SECURITY.md).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import signal
import sqlite3
import sys
import threading
from pathlib import Path
from typing import Any

import grpc
from fedpers.codec import codec_help
from fedpers.logs import LOG_FORMATS, setup_logging
from fedpers.server import export_cmd
from fedpers.strategies import AGGREGATORS, STRATEGIES
from fedpers.tls import add_client_args, client_from_args

_M_ARENA_MAX = -8  # glibc mallopt parameter


def _methods() -> list[Any]:
    from fedpers.personalization import METHODS

    return list(METHODS.values())


def _serve_flags(p: argparse.ArgumentParser) -> None:
    """The flags of `serve`, which are also the top-level flags (serve is the default command)."""
    a = p.add_argument
    a("--config", help="TOML file with the same keys as the long flags ('-' or '_'); flags override it")
    a("--model", help="model INI file (the server makes version 0 from it)")
    a("--listen", help="HOST:PORT to bind (port 0: a free port; default 127.0.0.1:50051)")
    a("--store", help="directory for model versions and the state database")
    a("--rounds", type=int, help="rounds to complete before tasks say DONE (default 10)")
    a("--min-devices", type=int,
      help="the minimum of live waiting devices to open a round, and of updates to close it at its deadline "
           "(default 2); a round closes earlier at its quorum: every selected device, or --target-devices")
    a("--fraction", type=float, help="fraction of waiting devices sampled per round (default 1.0)")
    a("--round-timeout", type=float, help="seconds until a round's deadline (default 60)")
    a("--strategy", choices=tuple(STRATEGIES),
      help="server optimizer (default fedavg): " + "; ".join(f"{k}: {v}" for k, v in STRATEGIES.items()))
    a("--server-lr", type=float, help="server learning rate (default: 1.0 fedavg/fedavgm, 0.01 fedadam)")
    a("--enroll-token", help=argparse.SUPPRESS)  # refused: argv is readable by every local user
    a("--enroll-token-file", metavar="FILE",
      help="file holding the token a device must present to enroll (or env FEDPERS_ENROLL_TOKEN); without "
           "one, enrollment is closed unless --open-enrollment")
    a("--open-enrollment", action="store_true", default=None,
      help="anyone who reaches the port may enroll a device (still capped by --max-devices)")
    a("--max-devices", type=int, help="most enrolled (not revoked) devices (default 1000)")
    a("--admin-token-file", metavar="FILE",
      help="file holding the admin token for GetStatus (or env FEDPERS_ADMIN_TOKEN; default: "
           "STORE/admin.token, made on first start)")
    a("--personal-layers", help="comma-separated layers marked personal besides those the INI marks personal = true: "
                                "without --personalization they stay on the devices; with it they are where "
                                "FedPer and FedRep find the head")
    a("--personalization", metavar="NAME",
      help="the personalization method: " + ", ".join(f"{m.name} ({m.title})" for m in _methods())
           + "; its split decides what stays on the devices, and after the last round each device serves the best "
             "of its candidates on its validation split (default: none: the layers the INI marks personal stay, "
             "one fine-tune at the end; docs/personalization.md)")
    a("--personalization-params", metavar="K=V,...",
      help="the method's hyperparameters, e.g. lam=0.5,personal_epochs=3 (docs/personalization.md lists them)")
    a("--choice-timeout", type=float, metavar="S",
      help="after the last round, the fleet default waits at most S seconds for the devices' validation scores "
           "(default 120)")
    a("--local-epochs", type=int, help="local epochs per round (default: the INI's Epochs)")
    a("--batch-size", type=int, help="device batch size (default: the INI's batch_size)")
    a("--learning-rate", type=float, help="device learning rate (default: the INI's Learning_rate)")
    a("--codec", help="delta codec devices use: " + codec_help("fp32"))
    a("--downlink-codec", metavar="C",
      help="publish each version as the previous one plus a step in this codec, so devices download only the "
           "compressed steps since the version they hold (checked bit for bit) instead of the weights; 'none' "
           "publishes the optimizer's exact output and devices download whole models (default none)")
    a("--downlink-steps", type=int, metavar="N",
      help="a device at most N versions behind gets the steps, else the whole model (default 8)")
    a("--seed", type=int, help="seed for version 0 and device sampling (default 0)")
    a("--log-level", help="DEBUG, INFO, WARNING or ERROR (default INFO)")
    a("--log-file", metavar="FILE", help="append log lines to FILE instead of stderr")
    a("--log-format", choices=LOG_FORMATS, help="text (default) or json: one JSON object per line, for log shippers")
    a("--clip-norm", type=float, help="clip each delta to this L2 norm before averaging")
    a("--aggregation", choices=tuple(AGGREGATORS),
      help="how a round's deltas are combined (default mean): "
           + "; ".join(f"{k}: {v}" for k, v in AGGREGATORS.items()))
    a("--trim", type=float, help="trimmed: fraction of values dropped at each end, per coordinate (default 0.2)")
    a("--robust-memory-mb", type=float,
      help="trimmed / median keep every delta of a round (O(devices x model)): at most this many MiB; a round "
           "closes once it holds as many updates as fit (default 1024)")
    a("--bn-stats", choices=("shared", "local"),
      help="batch-norm running statistics: shared (averaged; an update may not make a variance negative) or "
           "local (kept on each device, never sent; needed for DP) (default shared)")
    a("--dp-clip", type=float,
      help="differential privacy: devices clip their whole delta to this L2 norm (default 0: off)")
    a("--dp-noise", type=float,
      help="differential privacy: devices add Gaussian noise of std DP_NOISE x DP_CLIP to every value")
    a("--dp-delta", type=float,
      help="the delta at which the epsilon spent is reported per round (dp-accounting RDP; default 1e-5)")
    a("--norm-bound", type=float,
      help="refuse updates whose L2 norm exceeds this (default: 4x the L2 norm of the shared weights at start, "
           "at least 1)")
    a("--max-examples", type=int,
      help="ceiling on the num_examples one update counts for, i.e. its weight in the mean (default 10000)")
    a("--target-devices", type=int,
      help="over-selection: close a round as soon as this many updates are in, and select "
           "ceil(K x (1 + --over-select)) live waiting devices for it (instead of --fraction)")
    a("--over-select", type=float, help="extra fraction selected with --target-devices (default 0.3)")
    a("--waiting-ttl", type=float,
      help="liveness: a device counts as waiting (selectable) this many seconds after its last call "
           "(default max(2, 6 x --retry-after))")
    a("--max-update-mb", type=float, help="largest accepted update (default: 2x fp32 shared size + 1 MiB)")
    a("--workers", type=int, help="gRPC handler threads; bounds concurrent uploads and memory (default 4)")
    a("--retry-after", type=float, help="seconds a waiting device is told to wait (default 0.5)")
    a("--port-file", help="write the bound port to this file once serving")
    a("--stream-idle-timeout", type=float, metavar="S",
      help="cut an upload/download that sends nothing for S seconds (default 20)")
    a("--stream-min-rate", type=float, metavar="BYTES",
      help="cut an upload/download averaging fewer bytes/s once --stream-idle-timeout has passed (default 4096)")
    a("--streams-per-device", type=int, metavar="N", help="concurrent uploads/downloads per device (default 2)")
    a("--rate-scale", type=float, metavar="X",
      help="multiply every per-device call rate and burst (GetTask, GetStatus, DownloadModel, UploadUpdate, Join; "
           "default 1; 0 turns the call-rate limits off)")
    a("--state-url", metavar="postgresql://USER@HOST:PORT/DB",
      help="keep the federation's state on PostgreSQL (psycopg 3; pip install 'fedpers[postgres]'), so several "
           "fedpers-server replicas on the same --store directory share one federation (default: SQLite in "
           "--store, one server). No password here: argv is readable by every local user (--state-password-file, "
           "FEDPERS_STATE_PASSWORD, PGPASSWORD/PGPASSFILE, or the whole URL in FEDPERS_STATE_URL)")
    a("--state-password-file", metavar="FILE",
      help="file holding the PostgreSQL password for --state-url (or env FEDPERS_STATE_PASSWORD)")
    a("--replica-name", metavar="NAME",
      help="this replica's name in the cluster's tables and logs (default: host-pid-random)")
    a("--metrics-listen", metavar="HOST:PORT",
      help="serve Prometheus metrics at http://HOST:PORT/metrics (port 0: a free port; default: off)")
    a("--grace", type=float, default=5.0, help="seconds in-flight calls get on SIGTERM/SIGINT (default 5)")
    a("--linger", type=float, metavar="S",
      help="after the federation finished, exit 0 once no device has called for S seconds, so every device "
           "hears DONE and fetches the final model first (default 10)")
    a("--keep-serving", action="store_true", default=None,
      help="do not exit when the federation has finished (status, downloads and exports stay available)")
    t = p.add_argument_group("transport security (TLS)")
    t.add_argument("--tls-cert", metavar="CERT.pem", help="the server's certificate chain (PEM)")
    t.add_argument("--tls-key", metavar="KEY.pem", help="the key of --tls-cert (PEM, keep it 0600)")
    t.add_argument("--tls-client-ca", metavar="CA.pem",
                   help="mutual TLS: every caller must present a certificate signed by this CA")
    t.add_argument("--insecure", action="store_true", default=None,
                   help="serve plaintext without TLS (a warning is logged): trusted loopback or tests only")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedpers-server", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    _serve_flags(parser)
    sub = parser.add_subparsers(dest="command", metavar="{serve,health,status,report,export,dev-certs,devices}")
    _serve_flags(sub.add_parser("serve", help="run the aggregation server (the default; same flags as above)",
                                description="Run the aggregation server. Flags override --config."))
    health = sub.add_parser("health", help="exit 0 iff the server reports SERVING (grpc.health.v1)")
    health.add_argument("--address", required=True, help="HOST:PORT of the server")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)")
    add_client_args(health)
    status = sub.add_parser("status", help="print the federation's progress: rounds, versions, devices",
                            description="Ask a running server (--address), or read a stopped server's --store.")
    where = status.add_mutually_exclusive_group(required=True)
    where.add_argument("--address", help="HOST:PORT of a running server")
    where.add_argument("--store", help="the --store directory of a stopped server (read only)")
    status.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument("--admin-token-file", metavar="FILE",
                        help="the server's admin token (or env FEDPERS_ADMIN_TOKEN; a running server keeps it in "
                             "STORE/admin.token unless given one)")
    add_client_args(status)
    certs = sub.add_parser("dev-certs", help="write a throwaway CA and a server certificate (tests, demos, the fleet)",
                           description="Make a fresh CA (its key is discarded), sign a server certificate for the "
                                       "given names and write ca.pem, server.pem and server.key (0600) into --out. "
                                       "For a real deployment use certificates from your own CA (SECURITY.md).")
    certs.add_argument("--out", required=True, help="directory for the PEM files (created 0700)")
    certs.add_argument("--name", action="append", default=None, metavar="HOST",
                       help="a DNS name or IP address the server is dialled by (repeatable; "
                            "default: localhost, 127.0.0.1, ::1)")
    certs.add_argument("--client", action="append", default=None, metavar="NAME",
                       help="also sign a client certificate client-NAME.pem/.key (mutual TLS; repeatable)")
    certs.add_argument("--days", type=int, default=30, help="validity in days (default 30)")
    from fedpers.server import devices_cmd

    devices_cmd.add_parser(sub)
    report = sub.add_parser("report", help="per-round report (JSON) and accuracy plot of a federation",
                            description="The per-round numbers the devices reported (example-weighted), from a "
                                        "running server (--address) or a stopped server's --store.")
    where = report.add_mutually_exclusive_group(required=True)
    where.add_argument("--address", help="HOST:PORT of a running server")
    where.add_argument("--store", help="the --store directory of a stopped server (read only)")
    report.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default 3)")
    report.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON to FILE")
    report.add_argument("--png", type=Path, metavar="FILE", help="write the accuracy plot to FILE")
    report.add_argument("--admin-token-file", metavar="FILE",
                        help="with --address: the server's admin token (or env FEDPERS_ADMIN_TOKEN)")
    add_client_args(report)
    export_cmd.add_parser(sub)
    return parser


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's per-thread malloc arenas (like MALLOC_ARENA_MAX=2) before any thread starts.

    Each gRPC handler thread otherwise gets its own arena, and the multi-MB update buffers fragment
    them, so peak RSS creeps up with the number of uploads served. No-op off glibc or when the
    environment already sets MALLOC_ARENA_MAX."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


def _serve(ns: argparse.Namespace) -> int:
    from fedpers.server import app
    from fedpers.server.config import ConfigError, load_config

    if ns.enroll_token is not None:
        print("fedpers-server: --enroll-token on the command line is readable by every local user "
              "(/proc/PID/cmdline); use --enroll-token-file FILE or the FEDPERS_ENROLL_TOKEN environment variable",
              file=sys.stderr)
        return 2
    if ns.state_url:
        from fedpers.server.state_pg import url_has_password

        if url_has_password(ns.state_url):
            print("fedpers-server: --state-url carries a password, and the command line is readable by every local "
                  "user (/proc/PID/cmdline); use --state-password-file FILE, FEDPERS_STATE_PASSWORD, PGPASSWORD or "
                  "PGPASSFILE, or give the whole URL in the FEDPERS_STATE_URL environment variable", file=sys.stderr)
            return 2
    skip = ("command", "config", "grace", "enroll_token")
    flags: dict[str, Any] = {k: v for k, v in vars(ns).items() if k not in skip}
    try:
        cfg = load_config(flags, ns.config)
    except ConfigError as exc:
        print(f"fedpers-server: {exc}", file=sys.stderr)
        return 2
    try:
        setup_logging(cfg.log_level, cfg.log_file, cfg.log_format)
    except (ValueError, OSError) as exc:
        print(f"fedpers-server: log: {exc}", file=sys.stderr)
        return 2
    limit_malloc_arenas()
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        logging.getLogger("server").info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    from fedpers.locks import DirectoryBusy

    try:
        running = app.start(cfg)
    except (app.ListenError, DirectoryBusy) as exc:  # the flags name a port or store another server holds
        logging.getLogger("server").error("cannot start: %s", exc)
        return 2
    except (ConfigError, OSError, ValueError, RuntimeError) as exc:
        logging.getLogger("server").error("cannot start: %s", exc)
        return 1
    try:
        while not stop.wait(0.5):
            if not cfg.keep_serving and running.finished_and_idle(cfg.linger):
                logging.getLogger("server").info(
                    "federation finished and no device called for %.0fs: exiting (--keep-serving to stay up)",
                    cfg.linger)
                break
    finally:
        running.stop(ns.grace)
    return 0


def _rpc_failure(address: str, exc: grpc.RpcError) -> str:
    from fedpers.tls import explain

    return f"{address}: {explain(exc) or f'{exc.code().name}: {exc.details()}'}"


def _health(ns: argparse.Namespace) -> int:
    from fedpers.stub import FederationClient
    from fedpers.tls import TlsError

    try:
        tls = client_from_args(ns)
        client = FederationClient(ns.address, tls=tls, timeout=ns.timeout)
    except TlsError as exc:
        print(f"fedpers-server health: {exc}", file=sys.stderr)
        return 2
    with client:
        try:
            name = client.health()
        except grpc.RpcError as exc:
            print(_rpc_failure(ns.address, exc), file=sys.stderr)
            return 1
    print(f"{ns.address}: {name}")
    return 0 if name == "SERVING" else 1


def _read_status(ns: argparse.Namespace) -> tuple[object, int]:
    """(Status, 0) from --store or --address, or (None, exit code) after printing why not."""
    from fedpers.store import StoreError
    from fedpers.stub import get_status

    if ns.store:
        from fedpers.server.status import status_of_store

        try:
            return status_of_store(ns.store), 0
        except (StoreError, sqlite3.Error) as exc:
            print(f"fedpers-server {ns.command}: {exc}", file=sys.stderr)
            return None, 2
    from fedpers.private import SecretError, secret_from
    from fedpers.server.identity import ENV_ADMIN_TOKEN
    from fedpers.tls import TlsError

    try:
        admin = secret_from(ns.admin_token_file, ENV_ADMIN_TOKEN, "admin token")
        if not admin:
            raise SecretError("GetStatus needs the server's admin token: --admin-token-file FILE "
                              "(a server keeps it in STORE/admin.token) or FEDPERS_ADMIN_TOKEN")
        return get_status(ns.address, tls=client_from_args(ns), admin_token=admin, timeout=ns.timeout), 0
    except (TlsError, SecretError) as exc:
        print(f"fedpers-server {ns.command}: {exc}", file=sys.stderr)
        return None, 2
    except grpc.RpcError as exc:
        print(_rpc_failure(ns.address, exc), file=sys.stderr)
        return None, 1


def _status(ns: argparse.Namespace) -> int:
    from fedpers import wire

    status, code = _read_status(ns)
    if status is None:
        return code
    if ns.json:
        print(wire.status_to_json(status))
        return 0
    target = f"{status.rounds_target}" if status.rounds_target else "? (stopped server)"
    print(f"version {status.version}   rounds {status.rounds_completed}/{target}   "
          f"devices {status.devices_joined}   round {status.current_round} ({status.round_state or '-'})"
          f"   late updates {status.late_updates}{'   finished' if status.finished else ''}")
    if status.problem:
        print(f"problem: {status.problem}")
    _print_rounds(status.rounds)
    return 0


TRAIN_METRICS = (("loss", "loss"), ("accuracy", "acc"))  # on the devices' training data, after local training
HELD_OUT_METRICS = (("global_accuracy", "global"), ("personalized_accuracy", "personal"))  # their test splits


def _print_rounds(rounds: Any) -> None:
    """One line per round: train metrics and held-out accuracies apart, then whatever else devices sent."""
    if not rounds:
        return
    print("round R made version V from version V-1 (an abandoned round makes none). Metrics are example-weighted "
          "means over the round's devices: train = on their own training data after local training; held-out = "
          "on their test splits, of the base model (global) and after local training (personal).")
    shown = {k for k, _ in TRAIN_METRICS + HELD_OUT_METRICS}
    print(f"{'round':>6} {'state':>10} {'version':>8} {'devices':>8} {'late':>5} | {'train loss':>10} {'acc':>6} "
          f"| {'held-out global':>15} {'personal':>8} | other")

    def fmt(m: dict[str, float], key: str, width: int, pct: bool) -> str:
        if key not in m:
            return f"{'-':>{width}}"
        return f"{100 * m[key]:>{width}.1f}" if pct else f"{m[key]:>{width}.4g}"

    for r in rounds:
        m = r.metrics
        other = "  ".join(f"{k}={v:.4g}" for k, v in sorted(m.items()) if k not in shown)
        print(f"{r.round_id:>6} {r.state:>10} {r.version:>8} {r.devices:>8} {r.late_updates:>5} | "
              f"{fmt(m, 'loss', 10, False)} {fmt(m, 'accuracy', 6, True)} | {fmt(m, 'global_accuracy', 15, True)} "
              f"{fmt(m, 'personalized_accuracy', 8, True)} | {other}")


def _report(ns: argparse.Namespace) -> int:
    from fedpers.plots import Curve, plot_accuracy
    from fedpers.store import atomic_write_bytes

    status, code = _read_status(ns)
    if status is None:
        return code
    closed = [r for r in status.rounds if r.state == "closed"]
    rows = [{"round": r.round_id, "version": r.version, "devices": r.devices, **r.metrics} for r in closed]
    _print_rounds(closed)
    if ns.json:
        doc = {"version": status.version, "rounds_completed": status.rounds_completed, "rounds": rows,
               "notes": {"version": "the base model version the round produced; its metrics were measured by "
                                    "the devices on the base it started from (version - 1) and after training"}}
        atomic_write_bytes(ns.json, (json.dumps(doc, indent=2) + "\n").encode())
        print(f"report: {ns.json}")
    if ns.png:
        curves = [Curve(label, [(r.version - 1, r.metrics[key]) for r in closed if key in r.metrics], style)
                  for key, label, style in (("global_accuracy", "global model (start of round)", "o-"),
                                            ("personalized_accuracy", "after local training", "s-"))]
        if plot_accuracy(ns.png, curves, title="fedpers-server: devices' held-out accuracy per base version"):
            print(f"plot: {ns.png}")
    return 0


def _dev_certs(ns: argparse.Namespace) -> int:
    from fedpers.pki import DEFAULT_SERVER_NAMES, PkiUnavailable, make_dev_pki

    try:
        pki = make_dev_pki(ns.out, tuple(ns.name or DEFAULT_SERVER_NAMES), tuple(ns.client or ()),
                            days=ns.days)
    except (PkiUnavailable, OSError, ValueError) as exc:
        print(f"fedpers-server dev-certs: {exc}", file=sys.stderr)
        return 1
    for path in (pki.ca_cert, pki.server_cert, pki.server_key, *(p for pair in pki.clients.values() for p in pair)):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    from fedpers.server import devices_cmd

    handler = {"health": _health, "status": _status, "report": _report, "export": export_cmd.main,
               "dev-certs": _dev_certs, "devices": devices_cmd.main}.get(ns.command, _serve)
    try:
        return handler(ns)
    except BrokenPipeError:  # e.g. `fedpers-server status | head -1`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
