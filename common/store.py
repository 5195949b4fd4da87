"""Atomic, checksummed files: model versions on the server, personal state on a device.

Every file is written to a temp file in the same directory, fsynced, renamed over the final
name and the directory fsynced, so a crash leaves either the old or the new file, never half
of one. Array files carry the SHA-256 of their contents; a corrupted file is refused on load.

Array file layout (little-endian):
    MAGIC (8 bytes) | header length (u64) | SHA-256 of everything after the digest (32 bytes)
    | header (JSON: meta + per-array name, dtype, shape, offset) | array bytes (64-byte aligned)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAGIC = b"FPSTORE1"
_PREFIX = struct.Struct("<8sQ32s")
_ALIGN = 64
_TMP_MARK = ".tmp-"


class StoreError(RuntimeError):
    """A stored file cannot be used; the message names the file and the reason."""


class CorruptFile(StoreError):
    """A stored file fails its magic, size, checksum or header checks."""


class MissingVersion(StoreError, KeyError):
    """The requested model version is not in the store."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> None:
    """Write `data` to `path` atomically: temp file + fsync + rename + directory fsync."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}{_TMP_MARK}", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(target.parent)


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def encode_arrays(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None) -> bytearray:
    """dict of arrays + JSON-able meta -> bytes of one checksummed array file (built in one buffer)."""
    entries = []
    offset = 0
    prepared: list[np.ndarray] = []
    for name in sorted(arrays):
        arr = np.asarray(arrays[name])
        if arr.dtype.hasobject:
            raise TypeError(f"array {name!r} has object dtype; only plain numeric arrays can be stored")
        wire = arr.astype(arr.dtype.newbyteorder("<"), copy=False) if arr.dtype.byteorder == ">" else arr
        entries.append({"name": name, "dtype": wire.dtype.str, "shape": list(wire.shape), "offset": offset})
        prepared.append(wire)
        offset = _align(offset + wire.nbytes)
    header = json.dumps({"meta": dict(meta or {}), "arrays": entries}, sort_keys=True).encode()
    body_start = _PREFIX.size + _align(len(header))
    out = bytearray(body_start + offset)
    out[_PREFIX.size:_PREFIX.size + len(header)] = header
    for entry, arr in zip(entries, prepared, strict=True):
        start = body_start + entry["offset"]
        # copy straight into the file buffer (also makes non-contiguous inputs C-ordered)
        np.frombuffer(out, dtype=arr.dtype, count=arr.size, offset=start).reshape(arr.shape)[...] = arr
    digest = hashlib.sha256(memoryview(out)[_PREFIX.size:]).digest()
    _PREFIX.pack_into(out, 0, MAGIC, len(header), digest)
    return out


def decode_arrays(data: bytes, source: str = "<bytes>") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Bytes of an array file -> (arrays, meta); CorruptFile if any check fails."""
    if len(data) < _PREFIX.size:
        raise CorruptFile(f"{source}: {len(data)} bytes is too short for a fedpers array file")
    magic, header_len, digest = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise CorruptFile(f"{source}: not a fedpers array file (bad magic {magic!r})")
    body = memoryview(data)[_PREFIX.size:]
    if hashlib.sha256(body).digest() != digest:
        raise CorruptFile(f"{source}: SHA-256 mismatch; the file is corrupted or truncated")
    if header_len > len(body):
        raise CorruptFile(f"{source}: header length {header_len} exceeds the file")
    try:
        header = json.loads(bytes(body[:header_len]))
        meta = header["meta"]
        entries = header["arrays"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CorruptFile(f"{source}: unreadable header: {exc}") from None
    body_start = _align(header_len)
    arrays: dict[str, np.ndarray] = {}
    for e in entries:
        dtype = np.dtype(e["dtype"])
        shape = tuple(int(d) for d in e["shape"])
        start = body_start + int(e["offset"])
        nbytes = math.prod(shape) * dtype.itemsize
        if start + nbytes > len(body):
            raise CorruptFile(f"{source}: array {e['name']!r} runs past the end of the file")
        arr = np.frombuffer(body, dtype=dtype, count=math.prod(shape), offset=start).reshape(shape)
        arrays[e["name"]] = arr.astype(dtype.newbyteorder("="), copy=True)
    return arrays, meta


def save_arrays(
    path: str | os.PathLike, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None
) -> None:
    """Atomically write a checksummed file of named arrays plus JSON-able meta."""
    atomic_write_bytes(path, encode_arrays(arrays, meta))


def load_arrays_and_meta(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read a file written by save_arrays; CorruptFile if it fails its checks."""
    p = Path(path)
    return decode_arrays(p.read_bytes(), str(p))


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a file written by save_arrays (writable copies)."""
    return load_arrays_and_meta(path)[0]


@dataclass
class ModelVersion:
    """One stored base model: weights, the server optimizer's state after making it, and meta."""

    version: int
    weights: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)
    optimizer_state: dict[str, np.ndarray] = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # e.g. the compressed step that made it


_VERSION_RE = re.compile(r"^v(\d{12})\.fpst$")
_W, _O, _X = "weights/", "optimizer/", "extra/"


class ModelStore:
    """Model versions in `directory/models/v<000000000007>.fpst`, one atomic file per version.

    Weights and optimizer state share the file, so a version and the state needed to make the
    next one are committed together."""

    def __init__(self, directory: str | os.PathLike, *, shared: bool = False) -> None:
        """`shared`: other processes (server replicas) write this store too, so a temp file may be their
        write in progress; it is left alone here (the replica that coordinates calls remove_unfinished)."""
        self.directory = Path(directory) / "models"
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)  # files inside are 0600 (mkstemp)
        if not shared:
            self.remove_unfinished()

    def remove_unfinished(self) -> None:
        """Delete temp files of writes a crash interrupted (never a version: those are renamed whole)."""
        for stale in self.directory.glob(f"*{_TMP_MARK}*"):
            log.warning("removing unfinished write %s", stale)
            stale.unlink(missing_ok=True)

    @classmethod
    def read_only(cls, directory: str | os.PathLike) -> ModelStore:
        """The versions in `directory`, for reading only: no folder is made and no unfinished write is
        removed (a running server may be in the middle of one)."""
        store = cls.__new__(cls)
        store.directory = Path(directory) / "models"
        return store

    def path(self, version: int) -> Path:
        return self.directory / f"v{version:012d}.fpst"

    def versions(self) -> list[int]:
        out = []
        for p in self.directory.iterdir():
            m = _VERSION_RE.match(p.name)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def latest_version(self) -> int | None:
        vs = self.versions()
        return vs[-1] if vs else None

    def save_version(
        self,
        version: int,
        weights: Mapping[str, np.ndarray],
        meta: Mapping[str, Any] | None = None,
        optimizer_state: Mapping[str, np.ndarray] | None = None,
        extra: Mapping[str, np.ndarray] | None = None,
    ) -> Path:
        """Atomically write `version` (with whatever else belongs to it in `extra`); refuses to overwrite."""
        if not 0 <= version < 10**12:
            raise ValueError(f"version must be in [0, 1e12), got {version}")
        path = self.path(version)
        if path.exists():
            raise StoreError(f"{path}: version {version} already exists; versions are immutable")
        arrays = {_W + k: v for k, v in weights.items()}
        arrays.update({_O + k: v for k, v in (optimizer_state or {}).items()})
        arrays.update({_X + k: v for k, v in (extra or {}).items()})
        save_arrays(path, arrays, {"version": version, "meta": dict(meta or {})})
        return path

    def load_version(self, version: int) -> ModelVersion:
        path = self.path(version)
        if not path.exists():
            raise MissingVersion(f"model version {version} is not in {self.directory}")
        arrays, meta = load_arrays_and_meta(path)
        if meta.get("version") != version:
            raise CorruptFile(f"{path}: holds version {meta.get('version')!r}, expected {version}")
        weights = {k[len(_W):]: v for k, v in arrays.items() if k.startswith(_W)}
        opt = {k[len(_O):]: v for k, v in arrays.items() if k.startswith(_O)}
        extra = {k[len(_X):]: v for k, v in arrays.items() if k.startswith(_X)}
        return ModelVersion(version=version, weights=weights, meta=meta.get("meta", {}), optimizer_state=opt,
                            extra=extra)
