"""What a device keeps for itself between rounds, and the split between shared and local weights.

Local weights are every tensor the server did not ask for: the personal layers (which never leave
the device) plus anything else outside the shared set. They, the codec residuals and the round
bookkeeping live in one checksummed file written atomically (`common.store`), so a device killed
at any moment restarts from the last completed round, never from half of one.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fedpers.private import ensure_private_dir, new_secret, write_private
from fedpers.store import CorruptFile, atomic_write_bytes, load_arrays_and_meta, save_arrays

log = logging.getLogger(__name__)

STATE_FILE = "device.fpst"
CREDENTIALS_FILE = "device.secret"  # the device's id and long-term secret (0600), never sent to anyone else
REPORT_FILE = "report.json"
UPLOADS_DIR = "uploads"
_LOCAL, _RESID, _BASE, _SERVED = "local/", "residual/", "base/", "served/"
STATE_FORMAT = 1


class StateError(RuntimeError):
    """The device state directory cannot be used; the message says how to recover."""


class TaskMismatch(ValueError):
    """The server's task does not fit this device's model (unknown tensors, other shapes)."""


class PersonalLeak(TaskMismatch):
    """The server asked for a tensor of a personal layer; it must never leave the device."""


@dataclass
class RoundRecord:
    """One completed round as the device saw it."""

    round_id: int
    base_version: int
    num_examples: int
    global_accuracy: float
    global_loss: float
    personalized_accuracy: float
    personalized_loss: float
    train_loss: float
    train_accuracy: float
    bytes_up: int
    bytes_down: int
    train_seconds: float
    codec: str
    epochs: int
    test_examples: int = 0
    dp_noise_multiplier: float = 0.0  # > 0: the update was clipped and noised (differential privacy)
    dp_delta: float = 0.0
    method_metrics: dict[str, float] = field(default_factory=dict)  # a method's phases (head_loss, personal_...)

    def metrics(self) -> dict[str, float]:
        """The numbers the update header carries to the server (example-weighted there)."""
        return {
            **self.method_metrics,
            "loss": self.train_loss,
            "accuracy": self.train_accuracy,
            "global_accuracy": self.global_accuracy,
            "global_loss": self.global_loss,
            "personalized_accuracy": self.personalized_accuracy,
            "personalized_loss": self.personalized_loss,
            "test_examples": float(self.test_examples),
        }


@dataclass(frozen=True)
class Credentials:
    """This device's identity at its server: the id and secret from Enroll, or, while an enrollment is
    under way, only the random request id that makes a repeated Enroll safe."""

    request_id: str
    device_id: int | None = None
    secret: str = ""

    @property
    def enrolled(self) -> bool:
        return self.device_id is not None and bool(self.secret)

    def __repr__(self) -> str:  # never print the secret
        return f"Credentials(device_id={self.device_id}, enrolled={self.enrolled})"


@dataclass
class DeviceState:
    """Everything a device carries from one round to the next."""

    name: str
    device_id: int | None = None
    last_round: int = 0  # last round whose update the server accepted
    base_version: int = -1  # the base the local weights were last trained from
    codec: str = ""  # the codec the residuals belong to
    local: dict[str, np.ndarray] = field(default_factory=dict)
    residuals: dict[str, np.ndarray] = field(default_factory=dict)
    history: list[RoundRecord] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    # The server's tensors `local` was last trained against (version `base_kept`): with `local` they
    # are the device's personalized model, which `fedpers-client export` writes out.
    base: dict[str, np.ndarray] = field(default_factory=dict)
    base_kept: int = -1
    # After a federation with a personalization method: the whole model the device chose to serve (every
    # weight) and which candidate it is; `local` keeps the method's own tensors beside it.
    served: dict[str, np.ndarray] = field(default_factory=dict)
    served_name: str = ""

    @property
    def epochs_trained(self) -> int:
        return sum(r.epochs for r in self.history)


class PersonalStore:
    """The --state directory: one atomic state file, a report, optional copies of uploads."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = ensure_private_dir(directory)  # 0700: it holds the device secret and personal layers

    @property
    def state_path(self) -> Path:
        return self.directory / STATE_FILE

    @property
    def credentials_path(self) -> Path:
        return self.directory / CREDENTIALS_FILE

    def load_credentials(self) -> Credentials | None:
        """The saved credentials, or None before the first enrollment; StateError if unreadable."""
        path = self.credentials_path
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            creds = Credentials(request_id=str(data["request_id"]), device_id=data.get("device_id"),
                                secret=str(data.get("secret", "")))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise StateError(f"{path}: unreadable device credentials ({type(exc).__name__}); move it away to "
                             "enroll this device again") from None
        if creds.device_id is not None and not isinstance(creds.device_id, int):
            raise StateError(f"{path}: device_id must be an integer")
        return creds

    def begin_enrollment(self) -> Credentials:
        """Credentials for a first enrollment: a fresh random request id, saved before it is sent."""
        creds = Credentials(request_id=new_secret())
        self.save_credentials(creds)
        return creds

    def save_credentials(self, creds: Credentials) -> None:
        """Write the credentials atomically, 0600 from the first byte."""
        data = {"format": 1, "request_id": creds.request_id, "device_id": creds.device_id, "secret": creds.secret}
        write_private(self.credentials_path, (json.dumps(data) + "\n").encode())

    @property
    def report_path(self) -> Path:
        return self.directory / REPORT_FILE

    def load(self) -> DeviceState | None:
        """The saved state, or None on a fresh directory; StateError if it is corrupted."""
        if not self.state_path.exists():
            return None
        try:
            arrays, meta = load_arrays_and_meta(self.state_path)
        except CorruptFile as exc:
            raise StateError(f"{exc}; move {self.state_path} away to start this device afresh") from None
        if meta.get("format") != STATE_FORMAT:
            raise StateError(f"{self.state_path}: unknown state format {meta.get('format')!r}")
        try:
            history = [RoundRecord(**r) for r in meta["history"]]
            return DeviceState(
                name=meta["name"],
                device_id=meta["device_id"],
                last_round=int(meta["last_round"]),
                base_version=int(meta["base_version"]),
                codec=meta["codec"],
                local={k[len(_LOCAL):]: v for k, v in arrays.items() if k.startswith(_LOCAL)},
                residuals={k[len(_RESID):]: v for k, v in arrays.items() if k.startswith(_RESID)},
                history=history,
                bytes_up=int(meta["bytes_up"]),
                bytes_down=int(meta["bytes_down"]),
                base={k[len(_BASE):]: v for k, v in arrays.items() if k.startswith(_BASE)},
                base_kept=int(meta.get("base_kept", -1)),  # absent in states written before it existed
                served={k[len(_SERVED):]: v for k, v in arrays.items() if k.startswith(_SERVED)},
                served_name=str(meta.get("served_name", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"{self.state_path}: unreadable state ({exc})") from None

    def load_or_create(self, name: str | None) -> DeviceState:
        """Load the state; a fresh directory gets `name` (or a new random one), saved at once so a
        restarted device keeps its name and therefore its device id."""
        state = self.load()
        if state is None:
            state = DeviceState(name=name or f"device-{uuid.uuid4().hex[:12]}")
            self.save(state)
        elif name and name != state.name:
            raise StateError(f"{self.state_path} belongs to device {state.name!r}, not {name!r}; use another --state")
        return state

    def save(self, state: DeviceState) -> None:
        """Write the whole state in one atomic step."""
        arrays = {_LOCAL + k: v for k, v in state.local.items()}
        arrays.update({_RESID + k: v for k, v in state.residuals.items()})
        arrays.update({_BASE + k: v for k, v in state.base.items()})
        arrays.update({_SERVED + k: v for k, v in state.served.items()})
        meta = {
            "format": STATE_FORMAT,
            "name": state.name,
            "device_id": state.device_id,
            "last_round": state.last_round,
            "base_version": state.base_version,
            "codec": state.codec,
            "history": [asdict(r) for r in state.history],
            "bytes_up": state.bytes_up,
            "bytes_down": state.bytes_down,
            "base_kept": state.base_kept,
            "served_name": state.served_name,
        }
        save_arrays(self.state_path, arrays, meta)

    def save_upload(self, round_id: int, blob: bytes) -> Path:
        """Keep a copy of an uploaded blob (debugging and tests: what exactly left the device)."""
        path = self.directory / UPLOADS_DIR / f"round-{round_id:06d}.blob"
        atomic_write_bytes(path, blob)
        return path


def personal_layer_names(spec_layers: Iterable[Any], server_personal: Iterable[str] = ()) -> set[str]:
    """Layers that stay on the device: marked `personal = true` in the model, or named by the server."""
    return {layer.name for layer in spec_layers if getattr(layer, "personal", False)} | set(server_personal)


def check_shared(
    shared: Iterable[str], weight_layers: Mapping[str, str], personal_layers: set[str]
) -> list[str]:
    """Validate the server's shared tensor list against the model: every name must be a weight of
    the model and none may belong to a personal layer. Returns the names sorted."""
    names = sorted(set(shared))
    unknown = [n for n in names if n not in weight_layers]
    if unknown:
        raise TaskMismatch(f"the server asks for tensors the model does not have: {unknown}")
    leaked = [n for n in names if weight_layers[n] in personal_layers]
    if leaked:
        raise PersonalLeak(f"the server asks for tensors of personal layers, which never leave the device: {leaked}")
    return names


def split_weights(
    weights: Mapping[str, np.ndarray], shared: Iterable[str]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(shared, local): the tensors that go to the server and those that stay."""
    shared_set = set(shared)
    up = {k: v for k, v in weights.items() if k in shared_set}
    local = {k: v for k, v in weights.items() if k not in shared_set}
    return up, local


def overlay(
    initial: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray], local: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The weights a round starts from: the server's base for shared tensors, the device's saved
    local tensors for the rest (where shapes still fit), the model's initial values otherwise."""
    out = dict(initial)
    for name, value in local.items():
        if name in base:
            continue
        if name in out and out[name].shape == value.shape:
            out[name] = value
        elif name in out:
            log.warning("dropping saved local tensor %s: shape %s, the model now has %s", name, value.shape,
                        out[name].shape)
    for name, value in base.items():
        if name not in out or out[name].shape != value.shape:
            have = out[name].shape if name in out else None
            raise TaskMismatch(f"base tensor {name} has shape {value.shape}, the model has {have}")
        out[name] = value
    return out
