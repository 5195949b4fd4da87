"""Private files and secrets: directories 0700, files 0600, secrets read from a file or the environment.

The server's store (state.sqlite, model versions, admin token) and a device's --state directory
(its long-term secret, personal layers) are readable by their owner only. Secrets never come
from argv (any local user reads /proc/PID/cmdline); they come from a file or an environment
variable, and are never logged.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import tempfile
from pathlib import Path

from fedpers.store import _fsync_dir

log = logging.getLogger(__name__)

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


class SecretError(ValueError):
    """A secret file is missing, empty or unreadable; the message names the file or variable."""


def ensure_private_dir(path: str | os.PathLike) -> Path:
    """Create `path` (and parents) if needed and make it 0700; an existing looser directory is
    tightened (and said so), one owned by someone else is left alone with a warning."""
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    st = p.stat()
    if stat.S_IMODE(st.st_mode) & 0o077:
        if st.st_uid == os.geteuid():
            os.chmod(p, PRIVATE_DIR)
            log.info("%s: permissions tightened to 0700 (owner only)", p)
        else:
            log.warning("%s is readable by others and not owned by this user; its files stay 0600", p)
    return p


def tighten_file(path: str | os.PathLike) -> None:
    """Make an existing file 0600 (no-op when missing)."""
    try:
        if stat.S_IMODE(os.stat(path).st_mode) != PRIVATE_FILE:
            os.chmod(path, PRIVATE_FILE)
    except FileNotFoundError:
        pass


def write_private(path: str | os.PathLike, data: bytes, mode: int = PRIVATE_FILE) -> None:
    """Atomically write `data` with `mode` from the first byte (temp file, fsync, rename)."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)  # mkstemp: 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def read_secret_file(path: str | os.PathLike, what: str) -> str:
    """The secret in a file (surrounding whitespace stripped); warns when others may read the file."""
    p = Path(path)
    try:
        text = p.read_text().strip()
        mode = stat.S_IMODE(p.stat().st_mode)
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretError(f"{what} file {p}: {getattr(exc, 'strerror', None) or exc}") from None
    if not text:
        raise SecretError(f"{what} file {p} is empty")
    if mode & 0o077:
        log.warning("%s file %s is readable by group/others (mode %04o); chmod 600 it", what, p, mode)
    return text


def secret_from(file: str | os.PathLike | None, env: str, what: str) -> str:
    """A secret from `file` if given, else from the environment variable `env`, else ""."""
    if file:
        return read_secret_file(file, what)
    return os.environ.get(env, "").strip()


def new_secret() -> str:
    """A fresh random secret: 256 bits, URL-safe text."""
    return secrets.token_urlsafe(32)
