"""`fedpers-server devices list|show|revoke --store DIR`: the enrolled devices, and revoking one.

These work on the store's state database directly, not over the network: whoever may read and
write the store (0700, the server's own user) is the administrator, and no admin RPC exists that
an attacker on the network could reach. SQLite's WAL lets this run beside a live server; the
server re-reads revocations every tick (about once a second) and refuses the device from then
on, and the revocation survives restarts because it is in the database. No secret or hash is
ever printed.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from dataclasses import asdict
from pathlib import Path

from fedpers.server import state as st


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("devices", help="list, show or revoke enrolled devices (on --store, also while serving)",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    verbs = p.add_subparsers(dest="verb", metavar="{list,show,revoke}", required=True)
    for verb, text in (("list", "every enrolled device, revoked ones included"),
                       ("show", "one device"), ("revoke", "revoke a device: it can never join again")):
        v = verbs.add_parser(verb, help=text, description=text)
        v.add_argument("--store", required=True, help="the server's --store directory")
        if verb != "list":
            v.add_argument("device", help="device id, or its name")
        v.add_argument("--json", action="store_true", help="print JSON")


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) if t else "-"


def _public(dev: st.Device) -> dict:
    """What may be shown about a device: never its credential hashes."""
    out = {k: v for k, v in asdict(dev).items() if not k.endswith("_hash")}
    out["state"] = "revoked" if dev.revoked else ("enrolled, never joined" if dev.enroll_hash else "active")
    return out


def _find(state: st.State, key: str) -> st.Device | None:
    if key.isdigit():
        return state.device(int(key))
    return state.device_by_name(key)


def main(ns: argparse.Namespace) -> int:
    """Run one devices verb; 0 on success, 1 for an unknown device, 2 for an unusable store."""
    from fedpers.server.app import STATE_DB

    db = Path(ns.store) / STATE_DB
    if not db.is_file():
        print(f"fedpers-server devices: {ns.store} is not a fedpers-server store (no {STATE_DB})", file=sys.stderr)
        return 2
    try:
        state = st.SqliteState(db, read_only=ns.verb != "revoke")
    except sqlite3.Error as exc:
        print(f"fedpers-server devices: {db}: {exc}", file=sys.stderr)
        return 2
    try:
        if ns.verb == "list":
            devices = [_public(d) for d in state.devices()]
            if ns.json:
                print(json.dumps(devices, indent=2))
                return 0
            print(f"{'id':>6}  {'name':<32} {'enrolled (UTC)':<20} {'state':<24} revoked (UTC)")
            for d in devices:
                print(f"{d['device_id']:>6}  {d['name'] or '-':<32} {_when(d['joined_at']):<20} {d['state']:<24} "
                      f"{_when(d['revoked_at'])}")
            return 0
        dev = _find(state, ns.device)
        if dev is None:
            print(f"fedpers-server devices: no device {ns.device!r} in {ns.store}", file=sys.stderr)
            return 1
        if ns.verb == "revoke":
            already = dev.revoked
            dev = state.revoke_device(dev.device_id, time.time())
            print(f"device {dev.device_id} ({dev.name or 'no name'}) "
                  f"{'was already revoked' if already else 'revoked'} at {_when(dev.revoked_at)} UTC; "
                  "a running server refuses it within a second")
            return 0
        info = _public(dev)
        if ns.json:
            print(json.dumps(info, indent=2))
        else:
            for key, value in info.items():
                print(f"{key:>12}: {_when(value) if key.endswith('_at') else value}")
        return 0
    finally:
        state.close()
