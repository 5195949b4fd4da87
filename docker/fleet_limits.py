"""Container memory limits: does this host enforce them, and which limits does device-small's training fit.

`limits_enforced` is the fleet check's precondition for its naive/swap proof. `probe_limits` is
`docker/fleet.py --limits`: one epoch of device-small's training per memory mode and limit, which
is how the numbers in docker/README.md were found.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from fleet_docker import (
    DATA_IN_CONTAINER,
    MODEL_IN_IMAGE,
    SMALL,
    SWAP_ARGS,
    ComposeProject,
    run,
    signals_as_interrupt,
)

MODES = (("naive", ("--memory", "naive")), ("swap", SWAP_ARGS))


@dataclass
class LimitRow:
    """One training run of the probe: memory mode, container limit, and how it ended."""

    mode: str
    limit: str  # as docker's -m takes it, e.g. 288m
    exit_code: int
    oom_killed: bool


def limits_enforced(project: ComposeProject, limit: int) -> bool:
    """A container that touches twice its memory limit must be OOM-killed where limits work."""
    name = project.track(f"{project.project}_probe")
    code = ("import sys; n = int(sys.argv[1]); b = bytearray(n); "
            "b[::4096] = b'x' * len(range(0, n, 4096)); print('survived')")
    proc = run(["docker", "run", "--name", name, "-m", str(limit), "--memory-swap", str(limit), project.image,
                "python", "-c", code, str(2 * limit)], check=False, timeout=120)
    state = project.inspect(name)["State"]
    project.remove(name)
    return proc.returncode != 0 and bool(state["OOMKilled"])


def probe_limits(limits: Sequence[str], keep_image: bool = False,
                 on_row: Callable[[LimitRow], None] | None = None) -> list[LimitRow]:
    """One epoch of device-small's training (its data from the compose data step) per mode and
    container limit; `on_row` hears each row as it finishes (a run takes a while)."""
    project = ComposeProject(keep_image=keep_image)
    rows: list[LimitRow] = []
    with signals_as_interrupt():
        try:
            project.build()
            project.compose("up", "--no-build", "data", timeout=300)
            volume = f"{project.project}_{SMALL}-data"
            for mode, extra in MODES:
                for limit in limits:
                    name = project.track(f"{project.project}_{mode}_{limit}")
                    run(["docker", "run", "--name", name, "-m", limit, "--memory-swap", limit,
                         "-v", f"{volume}:/var/lib/fedpers/data:ro", project.image, "fedpers-client", "train",
                         MODEL_IN_IMAGE, "--data", DATA_IN_CONTAINER, "--epochs", "1", "--swap-dir", "/tmp", *extra],
                        check=False, timeout=600)
                    state = project.inspect(name)["State"]
                    rows.append(LimitRow(mode, limit, int(state["ExitCode"]), bool(state["OOMKilled"])))
                    project.remove(name)
                    if on_row is not None:
                        on_row(rows[-1])
        finally:
            project.teardown()
    return rows
