"""Which engine runs a `fedpers-sim` simulation: one OS process per device, or virtual devices on Ray actors.

`process` (the default, `sim.simulate`) starts one `fedpers-client run` per device: right for a few
dozen devices. `ray` (`ray_engine.simulate_ray`) runs thousands of virtual devices on a small pool of
Ray actors against the same real server, over the same gRPC with TLS; it needs `fedpers[ray]`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedpers.argtypes import positive_int

if TYPE_CHECKING:
    from fedpers.client.sim import SimConfig
    from fedpers.client.sim_report import SimReport

ENGINES = {
    "process": "one OS process per device (small runs; the default)",
    "ray": "virtual devices on a pool of Ray actors, each training many devices one after another "
           "(thousands of devices; pip install 'fedpers[ray]')",
}


@dataclass(frozen=True)
class EngineChoice:
    """The engine flags of `fedpers-sim`."""

    name: str = "process"
    ray_address: str | None = None  # None: a private local Ray for the run
    ray_actors: int = 2

    def __post_init__(self) -> None:
        if self.name not in ENGINES:
            raise ValueError(f"unknown engine {self.name!r}; known: {list(ENGINES)}")
        if self.ray_actors < 1:
            raise ValueError(f"--ray-actors must be >= 1, got {self.ray_actors}")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """--engine, --ray-address, --ray-actors."""
    p.add_argument("--engine", choices=tuple(ENGINES), default="process",
                   help="; ".join(f"{k}: {v}" for k, v in ENGINES.items()) + " (default process)")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --engine ray: an existing Ray cluster (e.g. HEAD:6379); default: a private local Ray "
                        "for the run, reachable only on 127.0.0.1")
    p.add_argument("--ray-actors", type=positive_int, default=None, metavar="N",
                   help="with --engine ray: actors in the pool, one CPU each (default 2)")


def engine_from_args(ns: argparse.Namespace) -> EngineChoice:
    """The EngineChoice of the flags; ValueError when a Ray flag comes without --engine ray."""
    if ns.engine != "ray" and (ns.ray_address is not None or ns.ray_actors is not None):
        raise ValueError("--ray-address and --ray-actors need --engine ray")
    return EngineChoice(ns.engine, ns.ray_address, ns.ray_actors or 2)


# SimConfig fields the Ray engine does not act on yet: it deals its devices the digits its own way
# (client.data_plan), one federation at a time. Refused, not ignored.
RAY_UNSUPPORTED = {
    "scenario": "--scenario", "data_dir": "--data-dir", "min_examples": "--min-examples",
    "personalization": "--personalization", "seeds": "--seeds",
}


def check_engine(cfg: SimConfig, engine: EngineChoice) -> None:
    """ValueError naming the flags `engine` cannot honour for `cfg`."""
    if engine.name == "ray":
        given = [flag for key, flag in RAY_UNSUPPORTED.items() if getattr(cfg, key) is not None]
        if given:
            raise ValueError(f"--engine ray does not support {', '.join(given)} yet; use the process engine for them")


def run_engine(cfg: SimConfig, engine: EngineChoice) -> SimReport:
    """Run `cfg` on the chosen engine (see `check_engine`)."""
    check_engine(cfg, engine)
    if engine.name == "ray":
        from fedpers.client.ray_engine import RayConfig, simulate_ray

        return simulate_ray(cfg, RayConfig(address=engine.ray_address, actors=engine.ray_actors))
    from fedpers.client.sim import simulate

    return simulate(cfg)
