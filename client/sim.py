"""`fedpers-sim`: one server and N device processes on this machine, over real gRPC on 127.0.0.1.

    fedpers-sim --devices 8 --rounds 10 [--report-dir DIR] [--codec C] [--seed S] ...
    fedpers-sim partition --devices N --out DIR [--seed S] [--alpha A]
    fedpers-sim local-only --data DATA.npz --model MODEL.ini --epochs E --out RESULT.json

The simulator writes the non-IID digits partition, starts `fedpers-server` and one
`fedpers-client run` process per device (each process reads only its own data file), follows
the rounds through GetStatus, then trains a local-only baseline per device (again one process
per device) and writes a table, `report.json` and `accuracy.png`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fedpers import models

log = logging.getLogger("fedpers.sim")

DEFAULT_MODEL = models.path("digits_cnn_personal.ini")
CHILD_ENV = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class SimError(RuntimeError):
    """The simulation could not complete (a process died, a timeout); the message says which."""


# ------------------------------------------------------------------------------------- processes


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(CHILD_ENV)
    return env


@dataclass
class Child:
    """A subprocess with its log file."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    @classmethod
    def start(cls, name: str, argv: Sequence[str], log_path: Path, stdout_path: Path | None = None) -> Child:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        if stdout_path is not None:
            stdout_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(stdout_path, "wb") if stdout_path else fh  # noqa: SIM115
        proc = subprocess.Popen(list(argv), stdout=out, stderr=fh, env=child_env(), start_new_session=True)
        if out is not fh:
            out.close()
        log.debug("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        return cls(name, proc, log_path, fh)

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop on SIGTERM; killing it", self.name)
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def server_argv(args: argparse.Namespace, model: Path, port_file: Path, store: Path, token: str) -> list[str]:
    argv = [sys.executable, "-m", "fedpers.server", "serve", "--model", str(model), "--listen", "127.0.0.1:0",
            "--port-file", str(port_file), "--store", str(store), "--seed", str(args.seed),
            "--rounds", str(args.rounds), "--min-devices", str(args.min_devices or args.devices),
            "--fraction", str(args.fraction), "--round-timeout", str(args.round_timeout),
            "--strategy", args.strategy, "--enroll-token", token, "--codec", args.codec,
            "--local-epochs", str(args.local_epochs)]
    if args.server_lr is not None:
        argv += ["--server-lr", str(args.server_lr)]
    return argv


def device_argv(args: argparse.Namespace, address: str, data: Path, state: Path, name: str, token: str) -> list[str]:
    argv = [sys.executable, "-m", "fedpers.client", "run", "--server", address, "--data", str(data),
            "--state", str(state), "--name", name, "--enroll-token", token, "--memory", args.memory, "--json"]
    if args.memory_budget:
        argv += ["--memory-budget", args.memory_budget]
    if args.save_uploads:
        argv.append("--save-uploads")
    return argv


# ------------------------------------------------------------------------------------- status


def get_status(address: str, timeout: float = 5.0) -> Any:
    """GetStatus over gRPC -> common.wire.Status (no device credentials needed)."""
    import grpc
    from fedpers import wire
    from fedpers.rpc import federation_pb2 as pb
    from fedpers.rpc import federation_pb2_grpc as pb_grpc

    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.FederationStub(channel).GetStatus(pb.StatusRequest(), timeout=timeout)
    return wire.status_from_proto(reply)


def wait_for_server(port_file: Path, server: Child, timeout: float) -> str:
    """Wait until the server has written its port and answers GetStatus; returns HOST:PORT."""
    import grpc

    deadline = time.monotonic() + timeout
    address = ""
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SimError(f"the server exited with code {server.poll()}:\n{server.tail()}")
        if not address:
            with contextlib.suppress(OSError, ValueError):
                address = f"127.0.0.1:{int(port_file.read_text().strip())}"
        if address:
            try:
                get_status(address, timeout=1.0)
                return address
            except grpc.RpcError:
                pass
        time.sleep(0.1)
    raise SimError(f"the server did not come up within {timeout:.0f}s:\n{server.tail()}")


def round_rows(status: Any) -> list[dict[str, Any]]:
    """Closed rounds as report rows (global_accuracy: the base the round started from, on the
    devices' held-out splits, example-weighted)."""
    rows = []
    for r in status.rounds:
        if r.state != "closed":
            continue
        m = r.metrics
        rows.append({"round": r.round_id, "version": r.version, "devices": r.devices,
                     "global_accuracy": m.get("global_accuracy"),
                     "personalized_accuracy": m.get("personalized_accuracy"),
                     "train_loss": m.get("loss")})
    return rows


# ------------------------------------------------------------------------------------- local-only


def local_only(data_path: Path, model_path: Path, epochs: int, seed: int, memory: str = "planned") -> dict[str, Any]:
    """Train a fresh model on one device's data only (all layers) and evaluate on its held-out split."""
    from fedpers.client.data import load_data
    from fedpers.nn import Trainer, load_ini

    data = load_data(data_path)
    spec = load_ini(model_path)
    t0 = time.perf_counter()
    with Trainer(spec, memory=memory, seed=seed) as trainer:
        fit = trainer.fit(data.x, data.y, epochs=epochs, seed=seed)
        ev = trainer.evaluate(data.x_test, data.y_test)
    return {"accuracy": float(ev.accuracy), "loss": float(ev.loss), "epochs": epochs,
            "train_loss": float(fit.loss), "seconds": time.perf_counter() - t0}


def run_local_only(args: argparse.Namespace) -> int:
    res = local_only(args.data, args.model, args.epochs, args.seed, args.memory)
    text = json.dumps(res, sort_keys=True)
    if args.out:
        from fedpers.store import atomic_write_bytes

        atomic_write_bytes(args.out, text.encode())
    else:
        print(text)
    return 0


def run_baselines(args: argparse.Namespace, model: Path, data_paths: list[Path], epochs: list[int],
                  work: Path) -> list[dict[str, Any] | None]:
    """One local-only process per device (at most cpu_count at once, so they do not thrash)."""
    out_paths = [work / "devices" / str(i) / "local_only.json" for i in range(len(data_paths))]
    pending = list(range(len(data_paths)))
    running: list[tuple[int, Child]] = []
    limit = max(1, os.cpu_count() or 1)
    while pending or running:
        while pending and len(running) < limit:
            i = pending.pop(0)
            argv = [sys.executable, "-m", "fedpers.client.sim", "local-only", "--data", str(data_paths[i]),
                    "--model", str(model), "--epochs", str(max(1, epochs[i])), "--seed", str(args.seed + i),
                    "--out", str(out_paths[i]), "--memory", args.memory]
            running.append((i, Child.start(f"local-only-{i}", argv, work / "logs" / f"local-only-{i}.log")))
        time.sleep(0.05)
        for item in list(running):
            i, child = item
            code = child.poll()
            if code is not None:
                child.stop()
                running.remove(item)
                if code != 0:
                    log.warning("local-only baseline of device %d failed (code %d):\n%s", i, code, child.tail())
    results: list[dict[str, Any] | None] = []
    for p in out_paths:
        try:
            results.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            results.append(None)
    return results


# ------------------------------------------------------------------------------------- report


def _fmt(v: float | None, pct: bool = True) -> str:
    if v is None:
        return "  -  "
    return f"{100 * v:5.1f}" if pct else f"{v:,.0f}"


def device_rows(reports: list[dict[str, Any] | None], baselines: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    rows = []
    for i, (rep, base) in enumerate(zip(reports, baselines, strict=True)):
        rep = rep or {}
        glob = rep.get("final_global_accuracy", rep.get("global_accuracy"))
        rows.append({
            "index": i,
            "id": rep.get("id"),
            "name": rep.get("name"),
            "train_examples": rep.get("train_examples"),
            "test_examples": rep.get("test_examples"),
            "rounds_trained": rep.get("rounds_trained", 0),
            "global_accuracy": glob,
            "personalized_accuracy": rep.get("final_personalized_accuracy", rep.get("personalized_accuracy")),
            "local_only_accuracy": base.get("accuracy") if base else None,
            "local_only_epochs": base.get("epochs") if base else None,
            "bytes_up": rep.get("bytes_up", 0),
            "bytes_down": rep.get("bytes_down", 0),
            "peak_rss_bytes": rep.get("peak_rss_bytes"),
            "memory_report": rep.get("memory_report"),
        })
    return rows


def weighted_mean(rows: list[dict[str, Any]], key: str) -> float | None:
    pairs = [(r[key], r.get("test_examples") or 1) for r in rows if r.get(key) is not None]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'device':>6} {'id':>4} {'train':>5} {'test':>4} {'global%':>7} {'personal%':>9} {'local-only%':>11} "
            f"{'up KiB/rnd':>10} {'down KiB':>9} {'peak RSS MiB':>12}")
    lines = [head, "-" * len(head)]
    for r in rows:
        per_round = r["bytes_up"] / r["rounds_trained"] / 1024 if r["rounds_trained"] else 0.0
        rss = r["peak_rss_bytes"] / 2**20 if r["peak_rss_bytes"] else 0.0
        lines.append(f"{r['index']:>6} {r['id'] if r['id'] is not None else '-':>4} {r['train_examples'] or 0:>5} "
                     f"{r['test_examples'] or 0:>4} {_fmt(r['global_accuracy']):>7} "
                     f"{_fmt(r['personalized_accuracy']):>9} {_fmt(r['local_only_accuracy']):>11} "
                     f"{per_round:>10.1f} {r['bytes_down'] / 1024:>9.1f} {rss:>12.1f}")
    lines.append("-" * len(head))
    lines.append(f"{'mean':>6} {'':>4} {'':>5} {'':>4} {_fmt(weighted_mean(rows, 'global_accuracy')):>7} "
                 f"{_fmt(weighted_mean(rows, 'personalized_accuracy')):>9} "
                 f"{_fmt(weighted_mean(rows, 'local_only_accuracy')):>11}   (means weighted by test examples)")
    return "\n".join(lines)


def plot_accuracy(path: Path, rounds: list[dict[str, Any]], devices: list[dict[str, Any]]) -> bool:
    """accuracy.png: global and personalized accuracy per round, local-only as a reference line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed; no accuracy.png (pip install 'fedpers[sim]')")
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    xs = [r["round"] for r in rounds]
    for key, label, style in (("global_accuracy", "global model (start of round)", "o-"),
                              ("personalized_accuracy", "personalized (after local training)", "s-")):
        ys = [r.get(key) for r in rounds]
        pts = [(x, 100 * y) for x, y in zip(xs, ys, strict=True) if y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=label)
    final = weighted_mean(devices, "global_accuracy")
    if final is not None and xs:
        ax.plot([xs[-1] + 1], [100 * final], "o", color="C0", mfc="none", label="final global model")
    local = weighted_mean(devices, "local_only_accuracy")
    if local is not None:
        ax.axhline(100 * local, color="grey", ls="--", label="local-only (same epochs)")
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title("fedpers-sim: accuracy on the devices' held-out splits")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------- the run


def default_report_dir() -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"sim-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = Path(f"{base}-{n}")
    return path


def simulate(args: argparse.Namespace) -> dict[str, Any]:
    """The whole run; returns the report (also written to report_dir/report.json)."""
    from fedpers.client.partition import partition_digits, write_partition
    from fedpers.codec import parse_codec

    parse_codec(args.codec)
    t_start = time.monotonic()
    report_dir = Path(args.report_dir) if args.report_dir else default_report_dir()
    report_dir.mkdir(parents=True, exist_ok=True)
    work = report_dir / "work"
    if work.exists():
        shutil.rmtree(work)
    model = Path(args.model).resolve()
    if not model.is_file():
        raise SimError(f"model file {model} does not exist")
    say = print if not args.quiet else (lambda *a, **k: None)
    say(f"fedpers-sim: {args.devices} devices, {args.rounds} rounds, codec {args.codec}, "
        f"{args.local_epochs} local epoch(s), model {model.name} -> {report_dir}")

    data_paths = write_partition(work / "data", partition_digits(args.devices, seed=args.seed, alpha=args.alpha))
    token = secrets.token_hex(8)
    port_file = work / "server.port"
    server = Child.start("server", server_argv(args, model, port_file, work / "store", token),
                         work / "logs" / "server.log")
    devices: list[Child] = []
    status = None
    try:
        address = wait_for_server(port_file, server, timeout=60)
        for i, data in enumerate(data_paths):
            state = work / "devices" / str(i)
            devices.append(Child.start(f"device-{i}", device_argv(args, address, data, state, f"sim-device-{i}", token),
                                       work / "logs" / f"device-{i}.log", stdout_path=state.parent / f"{i}.json"))
        shown = 0
        deadline = time.monotonic() + args.timeout
        while True:
            if server.poll() is not None:
                raise SimError(f"the server exited with code {server.poll()}:\n{server.tail()}")
            for d in devices:
                code = d.poll()
                if code not in (None, 0):
                    raise SimError(f"{d.name} exited with code {code}:\n{d.tail()}")
            with contextlib.suppress(Exception):
                status = get_status(address)
            if status is not None:
                rows = round_rows(status)
                for row in rows[shown:]:
                    say(f"round {row['round']:>3}/{args.rounds}  v{row['version']:<3} {row['devices']} devices  "
                        f"global {_fmt(row['global_accuracy'])}%  personalized {_fmt(row['personalized_accuracy'])}%  "
                        f"({time.monotonic() - t_start:5.1f}s)", flush=True)
                shown = max(shown, len(rows))
                if status.finished and all(d.poll() is not None for d in devices):
                    break
            if all(d.poll() == 0 for d in devices) and (status is None or not status.finished):
                raise SimError("every device exited but the server is not finished")
            if time.monotonic() > deadline:
                raise SimError(f"the simulation did not finish within {args.timeout:.0f}s (see {work / 'logs'})")
            time.sleep(0.2)
    finally:
        for d in devices:
            d.stop()
        server.stop()

    from fedpers.client.personal import PersonalStore

    reports = [PersonalStore(work / "devices" / str(i)).read_report() for i in range(args.devices)]
    epochs = [((r or {}).get("epochs_trained") or args.rounds * args.local_epochs) + (r or {}).get("final_epochs", 0)
              for r in reports]
    say("training local-only baselines (each device alone, same number of epochs)...", flush=True)
    baselines = run_baselines(args, model, data_paths, epochs, work)
    rows = device_rows(reports, baselines)
    rounds = round_rows(status) if status is not None else []
    report = {
        "config": {"devices": args.devices, "rounds": args.rounds, "codec": args.codec,
                   "local_epochs": args.local_epochs, "seed": args.seed, "alpha": args.alpha,
                   "strategy": args.strategy, "model": str(model), "memory": args.memory,
                   "memory_budget": args.memory_budget},
        "rounds": rounds,
        "devices": rows,
        "summary": {
            "global_accuracy": weighted_mean(rows, "global_accuracy"),
            "personalized_accuracy": weighted_mean(rows, "personalized_accuracy"),
            "local_only_accuracy": weighted_mean(rows, "local_only_accuracy"),
            "bytes_up": sum(r["bytes_up"] for r in rows),
            "bytes_down": sum(r["bytes_down"] for r in rows),
            "bytes_up_per_device_round": (sum(r["bytes_up"] for r in rows)
                                          / max(1, sum(r["rounds_trained"] for r in rows))),
            "version": status.version if status is not None else None,
            "elapsed_seconds": round(time.monotonic() - t_start, 2),
        },
        "notes": {
            "global_accuracy": "devices: the final base model (with the device's own personal layers, if any) on "
                               "its held-out split; rounds: the base each round started from",
            "personalized_accuracy": "devices: the final base after one more local training of the same length "
                                     "as a round (nothing uploaded); rounds: after each round's local training",
            "local_only_accuracy": "a fresh model trained only on the device's data for the same number of epochs "
                                   "in total (all rounds plus the final personalization)",
            "bytes_up": "serialized update blobs sent by the device (all rounds)",
        },
    }
    from fedpers.store import atomic_write_bytes

    atomic_write_bytes(report_dir / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    plotted = plot_accuracy(report_dir / "accuracy.png", rounds, rows)
    say("")
    say(format_table(rows))
    say(f"\nreport: {report_dir / 'report.json'}" + (f"  plot: {report_dir / 'accuracy.png'}" if plotted else ""))
    say(f"done in {report['summary']['elapsed_seconds']:.1f}s")
    if not args.keep_work:
        shutil.rmtree(work / "data", ignore_errors=True)
    return report


# ------------------------------------------------------------------------------------- CLI


def _sim_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedpers-sim",
        description="Federated personalization on this machine: one server, N device processes, real gRPC. "
                    "Subcommands: 'partition' (write the per-device data files), 'local-only' (one baseline).",
    )
    p.add_argument("--devices", type=int, default=8, help="number of device processes (default 8)")
    p.add_argument("--rounds", type=int, default=10, help="federated rounds (default 10)")
    p.add_argument("--report-dir", default=None, help="where report.json and accuracy.png go (default runs/sim-*)")
    p.add_argument("--codec", default="fp32",
                   help="delta codec: fp32|fp16|int8|int4|int2|topk:F, optional +zstd (default fp32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the partition, the server and the baselines")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew concentration (smaller: more skew)")
    p.add_argument("--local-epochs", type=int, default=5, help="local epochs per round (default 5)")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="model INI (default: digits_cnn_personal.ini)")
    p.add_argument("--strategy", default="fedavg", choices=("fedavg", "fedavgm", "fedadam"),
                   help="server optimizer (default fedavg)")
    p.add_argument("--server-lr", type=float, default=None, help="server learning rate (fedavgm/fedadam)")
    p.add_argument("--min-devices", type=int, default=None, help="devices a round needs (default: all)")
    p.add_argument("--fraction", type=float, default=1.0, help="fraction of waiting devices sampled per round")
    p.add_argument("--round-timeout", type=float, default=60.0, help="seconds before a round closes or is abandoned")
    p.add_argument("--memory", default="planned", choices=("naive", "planned", "swap"), help="device trainer memory")
    p.add_argument("--memory-budget", default=None, help="device memory budget, e.g. 64MiB")
    p.add_argument("--timeout", type=float, default=600.0, help="give up after this many seconds")
    p.add_argument("--save-uploads", action="store_true", help="devices keep a copy of each uploaded blob")
    p.add_argument("--keep-work", action="store_true", help="keep the partitioned data under report-dir/work")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--log-level", default="WARNING", help="logging of the simulator itself (default WARNING)")
    return p


def _partition_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedpers-sim partition",
                                description="Write the non-IID digits split as device-<i>.npz (x, y, x_test, y_test).")
    p.add_argument("--devices", type=int, required=True, metavar="N", help="number of devices (files) to write")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for device-<i>.npz")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="seed of the split and distortions (default 0; the simulator's default too)")
    p.add_argument("--alpha", type=float, default=0.5, metavar="A",
                   help="Dirichlet concentration of the label skew: smaller is more skewed (default 0.5)")
    return p


def _local_only_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedpers-sim local-only",
                                description="Train a fresh model on one device's data only; print/write its accuracy.")
    p.add_argument("--data", type=Path, required=True, metavar="DATA.npz", help="the device's data file")
    p.add_argument("--model", type=Path, required=True, metavar="MODEL.ini", help="model to train from scratch")
    p.add_argument("--epochs", type=int, required=True, metavar="N", help="epochs of local training")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed for init and shuffling (default 0)")
    p.add_argument("--memory", default="planned", choices=("naive", "planned", "swap"),
                   help="trainer memory mode (default planned)")
    p.add_argument("--out", type=Path, default=None, metavar="FILE", help="write the result JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s [%(name)s] %(message)s")
    if argv and argv[0] == "partition":
        from fedpers.client.partition import PartitionError, partition_digits, write_partition

        a = _partition_parser().parse_args(argv[1:])
        try:
            paths = write_partition(a.out, partition_digits(a.devices, seed=a.seed, alpha=a.alpha))
        except PartitionError as exc:
            print(f"fedpers-sim partition: {exc}", file=sys.stderr)
            return 2
        for p in paths:
            print(p)
        return 0
    if argv and argv[0] == "local-only":
        return run_local_only(_local_only_parser().parse_args(argv[1:]))
    args = _sim_parser().parse_args(argv)
    logging.getLogger().setLevel(getattr(logging, str(args.log_level).upper(), logging.WARNING))
    if args.devices < 1 or args.rounds < 1 or args.local_epochs < 1:
        print("fedpers-sim: --devices, --rounds and --local-epochs must be positive", file=sys.stderr)
        return 2
    if not Path(args.model).is_file():
        print(f"fedpers-sim: model file {args.model} does not exist", file=sys.stderr)
        return 2
    try:
        simulate(args)
    except SimError as exc:
        print(f"fedpers-sim: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # bad codec name, bad partition, ...
        print(f"fedpers-sim: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedpers-sim: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
