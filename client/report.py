"""`DeviceReport`: what a device says about its run, as one typed record with a JSON form.

The agent writes it to `<state>/report.json` after every round and prints it with `--json`; the
simulator and the Docker fleet check read it back with `DeviceReport.from_json`, so a field that
one side renames is an error on the other, not a silent None.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedpers.client.personal import DeviceState, RoundRecord
from fedpers.store import atomic_write_bytes


class ReportError(ValueError):
    """A report file or JSON text does not hold a DeviceReport; the message names the field."""


@dataclass
class DeviceReport:
    """One device's run: identity, rounds, bytes, memory, and how it ended."""

    name: str
    id: int | None = None
    last_round: int = 0
    rounds_trained: int = 0
    epochs_trained: int = 0
    global_accuracy: float | None = None  # the last round's base model, before local training
    personalized_accuracy: float | None = None  # the last round's model after local training
    bytes_up: int = 0
    bytes_down: int = 0
    rounds: list[RoundRecord] = field(default_factory=list)
    train_examples: int = 0
    test_examples: int = 0
    peak_rss_bytes: int | None = None
    memory_report: dict[str, Any] | None = None  # fedpers.nn.MemoryReport.to_dict() of the last round
    finished: bool = False
    reason: str = ""  # done | max_rounds | stopped | error
    final_version: int | None = None  # the base evaluated after the federation finished
    final_global_accuracy: float | None = None
    final_personalized_accuracy: float | None = None
    final_epochs: int = 0
    dp_epsilon: float | None = None  # privacy spent over the rounds sent with DP (None: DP never on)
    dp_delta: float | None = None
    # With a personalization method, after the federation (docs/personalization.md):
    method: str = ""  # the federation's method ("": none)
    candidate_accuracy: dict[str, float] = field(default_factory=dict)  # test accuracy of every candidate
    val_accuracy: dict[str, float] = field(default_factory=dict)  # what the choice saw, per candidate
    val_examples: int = 0
    fleet_default: str = ""  # what the server said to serve when the device's validation cannot tell
    served: str = ""  # the candidate this device serves (its per-device choice)
    local_only_epochs: int = 0  # epochs of the local-only candidate

    @property
    def served_accuracy(self) -> float | None:
        """Test accuracy of the model the device serves after the federation (None without a method)."""
        return self.candidate_accuracy.get(self.served) if self.served else None

    @classmethod
    def from_state(cls, state: DeviceState, **extra: Any) -> DeviceReport:
        """The report of a device state, plus the run's own numbers in `extra`."""
        from fedpers.privacy import epsilon_of

        last = state.history[-1] if state.history else None
        dp = [r for r in state.history if r.dp_delta > 0]
        eps = epsilon_of([r.dp_noise_multiplier for r in dp], dp[-1].dp_delta) if dp else None
        return cls(name=state.name, id=state.device_id, last_round=state.last_round,
                   rounds_trained=len(state.history), epochs_trained=state.epochs_trained,
                   global_accuracy=last.global_accuracy if last else None,
                   personalized_accuracy=last.personalized_accuracy if last else None,
                   bytes_up=state.bytes_up, bytes_down=state.bytes_down, rounds=list(state.history),
                   dp_epsilon=eps, dp_delta=dp[-1].dp_delta if dp else None, **extra)

    @property
    def end_global_accuracy(self) -> float | None:
        """The final base model's accuracy when it was evaluated, else the last round's."""
        return self.final_global_accuracy if self.final_global_accuracy is not None else self.global_accuracy

    @property
    def end_personalized_accuracy(self) -> float | None:
        """The final personalized model's accuracy when there is one, else the last round's."""
        if self.final_personalized_accuracy is not None:
            return self.final_personalized_accuracy
        return self.personalized_accuracy

    @property
    def total_epochs(self) -> int:
        """Local epochs over all rounds plus the final personalization (what a local-only baseline gets)."""
        return self.epochs_trained + self.final_epochs

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceReport:
        """The inverse of to_dict; unknown or missing required keys are a ReportError."""
        if not isinstance(data, dict):
            raise ReportError(f"a device report is a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ReportError(f"unknown device report fields {unknown}")
        values = dict(data)
        try:
            values["rounds"] = [RoundRecord(**r) for r in values.get("rounds", [])]
            return cls(**values)
        except TypeError as exc:
            raise ReportError(f"device report: {exc}") from None

    @classmethod
    def from_json(cls, text: str) -> DeviceReport:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ReportError(f"device report is not JSON: {exc}") from None
        return cls.from_dict(data)


def write_report(path: str | os.PathLike, report: DeviceReport) -> None:
    """Write a report as indented JSON, atomically (a reader never sees half of it)."""
    atomic_write_bytes(Path(path), (report.to_json(indent=2) + "\n").encode())


def read_report(path: str | os.PathLike) -> DeviceReport | None:
    """The report at `path`, or None when the device has not written one yet."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    return DeviceReport.from_json(text)
