"""What the fleet image promises: both roles answer, a non-root user, nothing left from the build,
a writable numba cache, the gRPC health probe, and a code change that keeps the dependency layer."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fleet_docker import REPO, ComposeProject, run

# What the Dockerfile copies from the repository (the rebuild check copies the same).
CONTEXT_FILES = ("pyproject.toml", "README.md", ".dockerignore")
CONTEXT_DIRS = ("common", "client", "server")
DOCKER_FILES = ("Dockerfile", "fleet_model.ini", "fleet_data.py", "fleet_lb.py")


@dataclass
class ImageChecks:
    """What the image holds and how it was layered."""

    help_exit: dict[str, int] = field(default_factory=dict)  # `docker run IMAGE <cmd> --help` -> exit code
    uid: int = -1
    compilers: list[str] = field(default_factory=list)
    pip_caches: list[str] = field(default_factory=list)
    numba_cache_writable: bool = False
    healthcheck: list[str] = field(default_factory=list)
    deps_cached_after_code_change: bool | None = None  # rebuild after a code edit reused the dependency layer
    code_rebuild_seconds: float = 0.0


def check_image(project: ComposeProject) -> ImageChecks:
    """The image's promises: both commands answer --help, non-root user, no compilers or pip caches,
    numba's cache writable, the gRPC health probe as HEALTHCHECK."""
    image = project.image
    checks = ImageChecks()
    for cmd in ("fedpers-server", "fedpers-client"):
        checks.help_exit[cmd] = run(["docker", "run", "--rm", image, cmd, "--help"], check=False).returncode
    script = ('echo "uid=$(id -u)"; '
              'for c in gcc cc g++ c++ clang; do command -v $c >/dev/null && echo "cc=$c"; done; '
              'for d in /root/.cache/pip "$HOME/.cache/pip" /tmp/pip-*; do [ -e "$d" ] && echo "cache=$d"; done; '
              '[ -w "$NUMBA_CACHE_DIR" ] && echo numba=writable; true')
    for line in run(["docker", "run", "--rm", image, "sh", "-c", script]).stdout.splitlines():
        key, _, value = line.partition("=")
        if key == "uid":
            checks.uid = int(value)
        elif key == "cc":
            checks.compilers.append(value)
        elif key == "cache":
            checks.pip_caches.append(value)
        elif key == "numba":
            checks.numba_cache_writable = True
    health = json.loads(run(["docker", "image", "inspect", "-f", "{{json .Config.Healthcheck}}", image]).stdout)
    checks.healthcheck = list((health or {}).get("Test") or [])
    return checks


def deps_step_cached(build_output: str) -> bool:
    """Did the `pip install -r` (dependencies) step of a docker build come from the cache?"""
    lines = build_output.splitlines()
    for i, line in enumerate(lines):
        if "pip install -r" in line:
            if "CACHED" in line:  # BuildKit
                return True
            for nxt in lines[i + 1:]:  # legacy builder: " ---> Using cache" before the next step
                if nxt.startswith("Step "):
                    break
                if "Using cache" in nxt:
                    return True
            return False
    return False


def rebuild_after_code_change(project: ComposeProject, checks: ImageChecks) -> None:
    """Build a copy of the context with one code file edited: the dependency layer must come from
    the cache (legacy builder: 'Using cache'; BuildKit: 'CACHED'). Fills the two fields of `checks`."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.nbi", "*.nbc")
    tag = f"{project.image}-rebuild"
    with tempfile.TemporaryDirectory(prefix="fedpers-ctx-") as tmp:
        ctx = Path(tmp)
        for name in CONTEXT_FILES:
            shutil.copy2(REPO / name, ctx / name)
        for name in CONTEXT_DIRS:
            shutil.copytree(REPO / name, ctx / name, ignore=ignore)
        (ctx / "docker").mkdir()
        for name in DOCKER_FILES:
            shutil.copy2(REPO / "docker" / name, ctx / "docker" / name)
        with open(ctx / "server" / "__init__.py", "a") as fh:
            fh.write("# a code change\n")
        t0 = time.monotonic()
        out = run(["docker", "build", "-f", str(ctx / "docker" / "Dockerfile"), "-t", tag, str(ctx)], env=project.env,
                  timeout=1800).stdout
        checks.code_rebuild_seconds = time.monotonic() - t0
    run(["docker", "rmi", tag], check=False)
    checks.deps_cached_after_code_change = deps_step_cached(out)
