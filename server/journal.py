"""Durable before acknowledged: the journal of each open round's accepted updates.

An accepted update is written here, fsynced, before the server acknowledges it; a restarted
server rebuilds the open round's aggregate from these records (same round id, same selected
devices, every acknowledged update counted) instead of abandoning it.

Layout: one file per upload attempt that passed validation, `<store>/journal/r<round>/d<device>-<nonce>.fpj`,
written with `store.atomic_write_bytes` (temp file + fsync + rename + directory fsync) outside the
coordinator's lock, so uploads fsync in parallel and a record is whole or absent after any crash.
The commit point is the update's row in the state database (SQLite, synchronous=FULL): a record
without a row (refused, or the server died before the commit) is ignored and removed; a row
always has its record, since the record was durable first. A record is a checksummed array file
(`store.encode_arrays`) holding the update blob exactly as received (still codec-compressed) and
its bookkeeping: device, the weight it was folded in with, the blob's SHA-256. Cost per update:
the blob's size plus ~400 bytes and two fsyncs. A round's records are deleted once it is closed
or abandoned.

The interface (`append`, `records`, `remove`, `discard`, `rounds`) is all the coordinator uses;
another backend (rows in PostgreSQL, objects in a bucket) keeps the same records. Server replicas
(server/cluster.py) share this directory through the shared --store: any replica appends, the
coordinator reads the records of a dead or silent replica's updates when it closes the round.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fedpers.store import CorruptFile, _fsync_dir, atomic_write_bytes, decode_arrays, encode_arrays

log = logging.getLogger(__name__)

_ROUND_RE = re.compile(r"^r(\d{12})$")
_RECORD_RE = re.compile(r"^d(\d{12})-([0-9a-f]{16})\.fpj$")


class JournalError(RuntimeError):
    """A journal record cannot be written or read; the message names the file."""


@dataclass(frozen=True)
class JournalRecord:
    """One accepted update as the journal keeps it: enough to fold it into the aggregate again."""

    round_id: int
    device_id: int
    num_examples: int  # as recorded (already capped)
    weight: float  # the weight the aggregator was given
    sha256: str
    accepted_at: float
    blob: bytes  # the update exactly as received (a serialized TensorSet)


class Journal:
    """Accepted-update records under `directory`, one durable file each."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _round_dir(self, round_id: int) -> Path:
        return self.directory / f"r{round_id:012d}"

    def append(self, rec: JournalRecord) -> Path:
        """Write `rec` durably and return its path; once this returns, a crash cannot lose it.
        JournalError when the disk refuses (full, I/O error): the update is then not acknowledged."""
        meta = {"round_id": rec.round_id, "device_id": rec.device_id, "num_examples": rec.num_examples,
                "weight": rec.weight, "sha256": rec.sha256, "accepted_at": rec.accepted_at}
        data = encode_arrays({"blob": np.frombuffer(rec.blob, np.uint8)}, meta)
        d = self._round_dir(rec.round_id)
        path = d / f"d{rec.device_id:012d}-{secrets.token_hex(8)}.fpj"
        try:
            if not d.exists():
                d.mkdir(parents=True, exist_ok=True)
                _fsync_dir(self.directory)  # the new round directory itself must survive a crash
            atomic_write_bytes(path, data)
        except OSError as exc:
            raise JournalError(f"cannot journal the update in {d}: {exc}") from None
        return path

    def records(self, round_id: int) -> Iterator[tuple[Path, JournalRecord]]:
        """The round's records with their paths, one at a time (a restart never holds every blob of
        a round at once), in file-name order; JournalError if one fails its checksum."""
        d = self._round_dir(round_id)
        if not d.is_dir():
            return
        for p in sorted(d.iterdir()):
            if not _RECORD_RE.match(p.name):
                continue  # a temp file of an unfinished write: never acknowledged
            try:
                arrays, meta = decode_arrays(p.read_bytes(), str(p))
            except CorruptFile as exc:
                raise JournalError(str(exc)) from None
            yield p, JournalRecord(
                round_id=int(meta["round_id"]), device_id=int(meta["device_id"]),
                num_examples=int(meta["num_examples"]), weight=float(meta["weight"]), sha256=str(meta["sha256"]),
                accepted_at=float(meta["accepted_at"]), blob=arrays["blob"].tobytes())

    @staticmethod
    def remove(path: Path) -> None:
        """Drop one record (its update was not committed after all)."""
        path.unlink(missing_ok=True)

    def discard(self, round_id: int) -> None:
        """Drop a finished round's records."""
        shutil.rmtree(self._round_dir(round_id), ignore_errors=True)

    def rounds(self) -> list[int]:
        """Rounds that have a journal directory."""
        return sorted(int(m.group(1)) for p in self.directory.iterdir() if (m := _ROUND_RE.match(p.name)))
