"""`fedpers-client run`: the device agent's command line.

Exit codes: 0 when the federation is done, --max-rounds is reached or SIGTERM/SIGINT stopped
the device (its state is consistent); 2 for bad input (data file, state directory, codec name);
1 when the server refuses the device's updates or stays unreachable.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from fedpers.argtypes import host_port, nonnegative_int, positive_float, positive_int, share
from fedpers.client.data import HOLDOUT_FRACTION
from fedpers.codec import codec_help
from fedpers.tls import add_client_args

from .train_cmd import add_memory_args

log = logging.getLogger(__name__)

ENV_ENROLL_TOKEN = "FEDPERS_ENROLL_TOKEN"


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("run", help="run a device: join, train rounds, send compressed deltas",
                              description="Run one device of a federation until the server says it is done.")
    p.add_argument("--server", required=True, type=host_port, metavar="HOST:PORT", help="address of fedpers-server")
    p.add_argument("--data", required=True, type=Path, metavar="DATA.npz",
                   help="this device's private data: x, y[, x_test, y_test]")
    p.add_argument("--state", required=True, type=Path, metavar="DIR",
                   help="where the device keeps its name, personal layers and codec residual")
    p.add_argument("--enroll-token", default=None, help=argparse.SUPPRESS)  # refused: argv is public
    p.add_argument("--enroll-token-file", type=Path, default=None, metavar="FILE",
                   help="file holding the enrollment token, needed only for the first start "
                        "(or env FEDPERS_ENROLL_TOKEN); later starts prove the device secret kept in --state")
    add_memory_args(p, swap_dir_default="DIR/swap")
    p.add_argument("--codec", default=None, metavar="C",
                   help="delta codec, overriding the server's: " + codec_help())
    p.add_argument("--local-epochs", type=positive_int, default=None, metavar="N",
                   help="override the server's local epochs")
    p.add_argument("--name", default=None,
                   help="device name, a label shown to the operator (1-64 of A-Z a-z 0-9 . _ -; default: random); "
                        "the device's identity is the secret in --state, never its name")
    p.add_argument("--max-rounds", type=nonnegative_int, default=None, metavar="N",
                   help="stop after N rounds in this run")
    p.add_argument("--save-uploads", action="store_true",
                   help="debug: keep a copy of every uploaded blob in DIR/uploads")
    p.add_argument("--holdout", type=share, default=HOLDOUT_FRACTION, metavar="F",
                   help=f"without x_test/y_test in the data file, hold out this seeded fraction as the device's "
                        f"test split (default {HOLDOUT_FRACTION})")
    p.add_argument("--retry-seconds", type=positive_float, default=120.0, metavar="S",
                   help="how long to keep retrying an unreachable server")
    p.add_argument("--json", action="store_true", help="print the device's final report as JSON on stdout")
    add_client_args(p)
    p.set_defaults(func=main)
    return p


def _install_signal_handlers(stop: threading.Event) -> None:
    def handler(signum: int, frame: object) -> None:
        log.info("%s: finishing the current step, then stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def unresolvable(address: str) -> str:
    """Why HOST of HOST:PORT has no address ("" when it resolves): a typo fails at once, not after minutes of
    retries. (A host that resolves but does not answer yet is retried, as a server that is starting.)"""
    import socket

    host, _, port = address.rpartition(":")
    try:
        socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"cannot resolve {host!r} ({exc.strerror})"
    return ""


def main(args: argparse.Namespace) -> int:
    """Run the agent with parsed arguments; returns the exit code."""
    from fedpers import wire
    from fedpers.client.agent import Agent, AgentConfig, AgentError, EnrollmentRefused
    from fedpers.client.data import DataError
    from fedpers.client.personal import StateError, TaskMismatch
    from fedpers.codec import CodecError
    from fedpers.locks import DirectoryBusy
    from fedpers.nn import BudgetError, ModelError, WeightError
    from fedpers.private import SecretError, secret_from
    from fedpers.tls import TlsError, client_from_args

    if args.enroll_token is not None:
        print("fedpers-client run: --enroll-token on the command line is readable by every local user "
              "(/proc/PID/cmdline); use --enroll-token-file FILE or the FEDPERS_ENROLL_TOKEN environment variable",
              file=sys.stderr)
        return 2
    try:
        if args.name:
            wire.check_device_name(args.name)
        tls = client_from_args(args)
        enroll_token = secret_from(args.enroll_token_file, ENV_ENROLL_TOKEN, "enrollment token")
    except (TlsError, SecretError, wire.MalformedMessage) as exc:
        print(f"fedpers-client run: {exc}", file=sys.stderr)
        return 2
    if tls.insecure:
        log.warning("--insecure: talking plaintext to %s; tokens and updates travel unencrypted", args.server)
    problem = unresolvable(args.server)
    if problem:
        print(f"fedpers-client run: --server {args.server}: {problem}", file=sys.stderr)
        return 2
    cfg = AgentConfig(
        server=args.server, data=args.data, state=args.state, tls=tls, enroll_token=enroll_token,
        memory=args.memory, memory_budget=args.memory_budget, lookahead=args.lookahead, micro_batch=args.micro_batch,
        swap_dir=args.swap_dir, codec=args.codec, local_epochs=args.local_epochs,
        name=args.name, max_rounds=args.max_rounds, save_uploads=args.save_uploads,
        retry_seconds=args.retry_seconds, holdout=args.holdout,
    )
    stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        _install_signal_handlers(stop)
    try:
        agent = Agent(cfg, stop)
    except (DataError, StateError, CodecError, TlsError, DirectoryBusy) as exc:
        print(f"fedpers-client run: {exc}", file=sys.stderr)
        return 2
    try:
        result = agent.run()
    except EnrollmentRefused as exc:  # the token or name it was started with
        print(f"fedpers-client run: {exc}", file=sys.stderr)
        return 2
    except (AgentError, TaskMismatch, ModelError, WeightError) as exc:  # refused, or sent what it cannot train
        log.error("%s", exc)
        return 1
    except (DataError, CodecError, BudgetError) as exc:  # this device's own input: data, codec, memory budget
        log.error("%s", exc)
        return 2
    if args.json:
        print(result.report.to_json())
    log.info("device %s: %s after %d rounds in this run", result.report.name, result.reason, result.rounds)
    return 0
