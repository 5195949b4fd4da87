"""What `docker/fleet.py` prints at the end: the per-device table and the run's summary."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fleet_docker import SMALL

if TYPE_CHECKING:  # fleet.py imports this module; the records are only named in annotations here
    from fleet import FleetResult, ReplicaRun


def mib(n: int | None) -> str:
    """Bytes as whole MiB for the tables ('-' when unknown)."""
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def device_table(result: FleetResult) -> str:
    """One line per device: rounds joined, bytes up, peak container memory, its limit and exit."""
    head = (f"{'device':<14} {'rounds joined':>13} {'bytes up':>10} {'peak mem':>9} {'anon':>8} {'limit':>9} "
            f"{'memory mode':<24} {'exit':>4} {'OOM':>4}")
    lines = [head, "-" * len(head)]
    for s in result.devices:
        rep, info = result.reports.get(s), result.containers[s]
        mem = (rep.memory_report if rep else None) or {}
        mode = f"{mem['mode']} (arena {mib(mem.get('arena_bytes'))})" if mem else "-"
        lines.append(f"{s:<14} {rep.rounds_trained if rep else 0:>13} {rep.bytes_up if rep else 0:>10,} "
                     f"{mib(result.peaks.get(s)):>9} {mib(result.anon_peaks.get(s)):>8} "
                     f"{mib(info.mem_limit) if info.mem_limit else 'none':>9} {mode:<24} {info.exit_code!s:>4} "
                     f"{'yes' if info.oom_killed else 'no':>4}")
    return "\n".join(lines)


def summary(result: FleetResult) -> str:
    """The whole run in a few lines: image, server, restarts, the device table, the memory proof."""
    out = [f"project {result.project}: image {mib(result.image_size)} (built in {result.build_seconds:.0f}s), "
           f"whole run {result.seconds:.0f}s"]
    if result.image_checks:
        c = result.image_checks
        out.append(f"image: --help exits {c.help_exit}, uid {c.uid}, compilers {c.compilers or 'none'}, pip caches "
                   f"{c.pip_caches or 'none'}, numba cache writable {c.numba_cache_writable}; rebuild after a code "
                   f"change reused the dependency layer: {c.deps_cached_after_code_change} "
                   f"({c.code_rebuild_seconds:.0f}s)")
    if result.status is not None:
        out.append(f"server: version {result.status.version}, {result.status.rounds_completed}/"
                   f"{result.status.rounds_target} rounds, versions seen {result.versions_seen}, "
                   f"exit after SIGTERM {result.server_final_exit}")
    if result.restart:
        r = result.restart
        reason = r.device_stop_report.reason if r.device_stop_report else None
        out.append(f"restart: stopped at v{r.stopped_at_version} (its store; exit {r.stop_exit_code}), continued at "
                   f"v{r.version_after_start}; devices up while it was down: {len(r.devices_running_while_down)}; "
                   f"{r.device} stopped mid-round (exit {r.device_stop_exit_code}, {reason!r}) and rejoined")
    out.append(device_table(result))
    out.append(f"(peak mem: {result.peak_source or 'not sampled'}, page cache included; anon: peak anonymous memory)")
    for problem in result.sampling_problems:
        out.append(f"memory sampling problem: {problem}")
    m = result.memory
    if m is not None:
        if not m.enforced:
            out.append(f"memory proof skipped: {m.reason}")
        else:
            plan = ", ".join(f"{k} {mib(v)}" for k, v in m.plan.items())
            out.append(f"memory proof under {SMALL}'s mem_limit {mib(m.mem_limit)} (plan arenas: {plan}):")
            for r in (m.naive, m.swap):
                if r is not None:
                    out.append(f"  {r.mode:<6} exit {r.exit_code}  OOMKilled {r.oom_killed}  peak {mib(r.peak_bytes)}  "
                               f"anon {mib(r.anon_bytes)}  start-up RSS {mib(r.startup_rss_bytes)}  {r.seconds:.0f}s"
                               f"  ({r.peak_source or 'not sampled'})")
    return "\n".join(out)


def replica_summary(result: ReplicaRun) -> str:
    """The replicas profile's run: who was killed when, what the survivor finished, each device."""
    status = result.status
    out = [f"project {result.project} (replicas profile): whole run {result.seconds:.0f}s",
           f"killed {result.killed} (the coordinator) with SIGKILL at version {result.killed_at_version}, "
           f"{result.killed_with_updates} update(s) in the open round; exit {result.killed_exit}"]
    if status is not None:
        out.append(f"then: version {status.version}, {status.rounds_completed}/{status.rounds_target} rounds, "
                   f"versions seen {result.versions_seen}, updates per round "
                   f"{[r.devices for r in status.rounds]}")
    for s in sorted(result.reports):
        rep, info = result.reports[s], result.containers.get(s)
        out.append(f"  {s:<14} rounds trained {rep.rounds_trained if rep else 0:>2}  "
                   f"reason {rep.reason if rep else '-':<8} exit {info.exit_code if info else '-'}")
    return "\n".join(out)
