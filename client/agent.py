"""The device agent: join, ask for work, pull the base, train locally, push a compressed delta.

One round (DESIGN.md, "One round, as data"): GetTask -> DownloadModel (resumable) -> overlay the
device's local tensors -> evaluate the global model -> train -> evaluate the personalized model ->
delta of the shared tensors -> codec with the carried residual -> UploadUpdate -> save local
tensors, residual and bookkeeping in one atomic write. Personal layers are checked never to be in
the shared set and are never serialized for the server.

With a personalization method in the task (docs/personalization.md), "train" is the method's round
(`client.methods.run_round`) on the device's data minus its validation split, held out for the
whole federation; after DONE the device builds the method's candidates and a local-only model,
reports their validation accuracy (ReportChoice), learns the fleet default and serves its pick.
Without one, "train" is one `Trainer.fit` and the end is one fine-tune.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import random
import resource
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from fedpers import codec as codecs
from fedpers import wire
from fedpers.backoff import Backoff
from fedpers.client.data import HOLDOUT_FRACTION, Dataset, check_against_model, evaluate_on_test, load_data
from fedpers.client.personal import (
    DeviceState,
    PersonalLeak,
    PersonalStore,
    RoundRecord,
    TaskMismatch,
    check_shared,
    overlay,
    personal_layer_names,
    split_weights,
)
from fedpers.client.privacy import privatize_weights
from fedpers.client.report import DeviceReport, write_report
from fedpers.locks import DirLock
from fedpers.modelsteps import apply_steps, rebuilt_matches
from fedpers.nn.modes import DEFAULT_MEMORY_MODE
from fedpers.store import atomic_write_bytes
from fedpers.stub import FederationClient
from fedpers.tls import TlsConfig, explain

log = logging.getLogger(__name__)

T = TypeVar("T")

# CANCELLED: a stream the server cut for stalling (this agent never cancels its own calls).
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})
# Refusals that waiting cures: the server's rate and stream limits, which carry a retry hint.
RETRYABLE_REFUSALS = frozenset({wire.Refusal.RATE_LIMITED, wire.Refusal.TOO_MANY_STREAMS})
RPC_TIMEOUT = 60.0
MODEL_FILE = "model.ini"
CHOICE_WAIT = 900.0  # after DONE, wait at most this long for the server's fleet default, then serve the method's


class AgentError(RuntimeError):
    """The agent cannot go on (server refused an update as malformed, bad model, ...)."""


class EnrollmentRefused(AgentError):
    """The server refused what this device was started with (enrollment token, name): fix the input."""


# Refusals of Enroll/Join that the device's own input caused (exit 2), not the server's state (exit 1).
BAD_CREDENTIALS = frozenset({wire.Refusal.BAD_TOKEN, wire.Refusal.ENROLLMENT_CLOSED, wire.Refusal.NAME_TAKEN})


class Stopped(Exception):
    """A stop was requested (SIGTERM/SIGINT) while waiting; the state on disk is consistent."""


@dataclass(frozen=True)
class AgentConfig:
    """How `fedpers-client run` was asked to behave."""

    server: str
    data: Path
    state: Path
    tls: TlsConfig = TlsConfig()  # how the channel is secured (default: TLS trusting the system's CAs)
    enroll_token: str = field(default="", repr=False)  # needed only for the first enrollment; never logged
    memory: str = DEFAULT_MEMORY_MODE
    memory_budget: str | None = None
    lookahead: int = 2
    micro_batch: int = 1
    swap_dir: str | None = None  # default: <state>/swap
    codec: str | None = None  # overrides the server's codec
    local_epochs: int | None = None  # overrides the server's local epochs
    name: str | None = None
    max_rounds: int | None = None
    save_uploads: bool = False  # keep a copy of every uploaded blob in <state>/uploads
    retry_seconds: float = 120.0  # keep retrying an unreachable server this long
    holdout: float = HOLDOUT_FRACTION  # held-out share of the data when the file has no x_test/y_test
    backoff_initial: float = 0.1
    backoff_max: float = 3.0


@dataclass
class RunResult:
    """How a run ended."""

    reason: str  # done | max_rounds | stopped
    rounds: int  # rounds completed in this run
    report: DeviceReport


class StepKind(enum.Enum):
    """What one `Agent.step()` did."""

    WAIT = "wait"  # nothing to do yet: ask again after `Step.wait` seconds
    TRAINED = "trained"  # trained and the server accepted the update
    REFUSED = "refused"  # trained, but the server did not take the update (e.g. its round closed)
    DONE = "done"  # the federation is finished; the final model was evaluated and personalized


@dataclass(frozen=True)
class Step:
    """One step of a device: what happened, and how long the server asked it to wait before the next."""

    kind: StepKind
    wait: float = 0.0
    round_id: int = 0


@dataclass(frozen=True)
class RoundPlan:
    """What one TRAIN task asks of this device, resolved against its model and its own flags."""

    spec: Any  # fedpers.nn.ModelSpec
    trainer: Any  # fedpers.nn.Trainer
    shared: list[str]  # tensors whose deltas go to the server
    personal: set[str]  # layers that never leave the device
    codec: codecs.CodecSpec
    epochs: int
    batch: int
    learning_rate: float | None
    setup: Any = None  # fedpers.client.methods.Setup of the task's personalization method; None: no method


@dataclass(frozen=True)
class Trained:
    """One round's training, whatever ran it: what goes up, what stays, and the numbers it reports."""

    shared: dict[str, np.ndarray]  # trained shared tensors (the update is shared - base)
    local: dict[str, np.ndarray]  # the device's local tensors after the round (never sent)
    global_loss: float  # the round's base (with the local tensors) on the test split
    global_accuracy: float
    personalized_loss: float  # what the device would serve after the round, on the test split
    personalized_accuracy: float
    train_loss: float
    train_accuracy: float
    metrics: dict[str, float] = field(default_factory=dict)  # a method's phases


@dataclass(frozen=True)
class EncodedUpdate:
    """The encoded deltas of the shared tensors, ready to upload, and the residuals to keep."""

    blob: bytes
    residuals: dict[str, np.ndarray]


@dataclass(frozen=True)
class FinalEvaluation:
    """The final base model evaluated on this device, and that model personalized once more."""

    version: int
    global_accuracy: float
    personalized_accuracy: float | None = None
    epochs: int = 0
    method: str = ""  # with a personalization method, the per-device choice:
    candidate_accuracy: dict[str, float] = field(default_factory=dict)
    val_accuracy: dict[str, float] = field(default_factory=dict)
    val_examples: int = 0
    fleet_default: str = ""
    served: str = ""
    local_only_epochs: int = 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process: VmHWM from /proc (getrusage's ru_maxrss can carry the
    parent's peak across exec), else ru_maxrss (KiB on Linux)."""
    from fedpers.nn import rss

    return rss.peak_rss_bytes() or int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class Agent:
    """One device. `run()` loops until the federation is done, max_rounds, or `stop` is set."""

    def __init__(self, config: AgentConfig, stop: threading.Event | None = None,
                 server: FederationClient | None = None) -> None:
        """`server`: the client to call through instead of a channel of its own (a simulator host gives each
        of its virtual devices a client on one shared channel; the session stays with that client)."""
        self.cfg = config
        self.stop = stop or threading.Event()
        self._lock = DirLock(config.state, "device (fedpers-client run)")
        self.store = PersonalStore(config.state)
        self.data: Dataset = load_data(config.data, holdout=config.holdout)
        if self.data.held_out_by_device:
            log.info("%s has no x_test/y_test: %d examples (%.0f%%) held out as this device's test split",
                     config.data, self.data.y_test.size, 100 * config.holdout)
        self.state: DeviceState = self.store.load_or_create(config.name)
        if config.codec:
            codecs.parse_codec(config.codec)  # refuse a bad name before touching the network
        self.server = server or FederationClient(config.server, tls=config.tls, timeout=RPC_TIMEOUT)
        # (model INI digest, proximal anchors) -> (spec, trainer)
        self._models: dict[tuple[str, tuple[str, ...]], tuple[Any, Any]] = {}
        self._setups: dict[tuple[str, Any, tuple[str, ...]], Any] = {}  # (INI digest, hp, shared) -> methods.Setup
        self._splits: dict[float, tuple[np.ndarray, ...]] = {}  # val_fraction -> (x, y, x_val, y_val)
        self._parsed: tuple[str, Any] | None = None  # (model INI digest, spec)
        self._memory_report: dict[str, Any] | None = None
        self._rng = random.Random(self.state.name)  # backoff jitter only
        self._final: FinalEvaluation | None = None
        self._last_training: tuple[int, int, float | None] | None = None
        model_path = self.cfg.state / MODEL_FILE
        self._last_model_ini = model_path.read_text() if model_path.exists() else ""

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        for _, trainer in self._models.values():
            trainer.close()
        self._models.clear()
        self.server.close()
        self._lock.release()

    def _wait(self, seconds: float) -> None:
        if self.stop.wait(max(0.0, seconds)):
            raise Stopped

    def _retry(self, what: str, call: Callable[[], T]) -> T:
        """Run an RPC; on UNAVAILABLE/DEADLINE_EXCEEDED, a stream the server cut (CANCELLED) or a rate or
        stream limit (RESOURCE_EXHAUSTED with a retry hint) back off (capped, with jitter, at least the
        server's hint) and try again for up to retry_seconds; on UNAUTHENTICATED join again once."""
        backoff = Backoff(self.cfg.backoff_initial, self.cfg.backoff_max, rng=self._rng)
        first_failure: float | None = None
        rejoined = False
        while True:
            if self.stop.is_set():
                raise Stopped
            try:
                return call()
            except grpc.RpcError as exc:
                code = exc.code()
                problem = explain(exc)
                if problem:  # a certificate or TLS mismatch does not go away by retrying
                    raise AgentError(f"{what}: cannot reach {self.cfg.server}: {problem}") from None
                if wire.refusal_of(exc) is wire.Refusal.REVOKED:
                    raise AgentError(f"{what}: {exc.details()}") from None
                if code == grpc.StatusCode.UNAUTHENTICATED and not rejoined and what not in ("Join", "Enroll"):
                    log.warning("%s: session refused (%s); joining again", what, exc.details())
                    rejoined = True
                    self.join()
                    continue
                if code not in RETRYABLE and wire.refusal_of(exc) not in RETRYABLE_REFUSALS:
                    raise
                now = time.monotonic()
                first_failure = first_failure or now
                if now - first_failure > self.cfg.retry_seconds:
                    raise AgentError(f"{what}: server {self.cfg.server} unreachable for {self.cfg.retry_seconds:.0f}s "
                                     f"({code.name}: {exc.details()})") from None
                delay = backoff.next(wire.retry_after_of(exc))
                hint = " (plaintext: if the server uses TLS, drop --insecure and give --tls-ca)" \
                    if self.cfg.tls.insecure and "Socket closed" in (exc.details() or "") else ""
                log.info("%s: %s (%s)%s; retrying in %.2fs", what, code.name, exc.details(), hint, delay)
                self._wait(delay)

    # ------------------------------------------------------------------ protocol steps

    def join(self) -> int:
        """Prove this device's secret and get a session (enrolling first on the very first start)."""
        creds = self.store.load_credentials()
        if creds is None or not creds.enrolled:
            creds = self.enroll(creds)
        req = wire.JoinRequest(device_id=creds.device_id, device_secret=creds.secret)  # type: ignore[arg-type]
        reply = self._refusal_is_final("Join", lambda: self._retry("Join", lambda: self.server.join(req)))
        if self.state.device_id not in (None, reply.device_id):
            log.warning("server gave id %d, this device had %d", reply.device_id, self.state.device_id)
        if self.state.device_id != reply.device_id:
            self.state.device_id = reply.device_id
            self.store.save(self.state)
        log.info("joined %s as device %d (%s)", self.cfg.server, reply.device_id, self.state.name)
        if reply.model_ini:  # refuse data that does not fit the model now, not when the device is first selected
            from fedpers.nn import parse_ini

            self._check_data(parse_ini(reply.model_ini))
        return reply.device_id

    def enroll(self, pending: Any = None) -> Any:
        """First contact: the enrollment token and this device's name buy an id and a long-term secret,
        kept 0600 in --state. The request id is saved before it is sent, so an enrollment whose reply
        was lost is repeated safely (the server recognizes it and issues the secret again)."""
        from fedpers.client.personal import Credentials

        creds = pending or self.store.begin_enrollment()
        req = wire.EnrollRequest(enroll_token=self.cfg.enroll_token, device_name=self.state.name,
                                 request_id=creds.request_id)
        reply = self._refusal_is_final("Enroll", lambda: self._retry("Enroll", lambda: self.server.enroll(req)))
        creds = Credentials(request_id=creds.request_id, device_id=reply.device_id, secret=reply.device_secret)
        self.store.save_credentials(creds)
        log.info("enrolled at %s as device %d (%s); its secret is in %s", self.cfg.server, reply.device_id,
                 self.state.name, self.store.credentials_path)
        return creds

    def _refusal_is_final(self, what: str, call: Callable[[], T]) -> T:
        """Enroll/Join refusals that retrying cannot fix become an AgentError that says what to do."""
        try:
            return call()
        except grpc.RpcError as exc:
            kind = wire.refusal_of(exc)
            remedy = {
                wire.Refusal.BAD_TOKEN: (f"check the enrollment token; if the server's store was reset, move "
                                         f"{self.store.credentials_path} away to enroll again"),
                wire.Refusal.REVOKED: "this device was revoked by the server's operator",
                wire.Refusal.ENROLLMENT_CLOSED: "the server takes no new devices (ask for an enrollment token)",
                wire.Refusal.NAME_TAKEN: "another device has this name: start with another --name and --state",
                wire.Refusal.TOO_MANY_DEVICES: "the server has as many devices as it accepts",
                wire.Refusal.MALFORMED_MESSAGE: "the server refused the request as malformed",
            }.get(kind)  # type: ignore[arg-type]
            if remedy is None:
                raise
            kind_of_error = EnrollmentRefused if kind in BAD_CREDENTIALS else AgentError
            raise kind_of_error(f"{what} refused by {self.cfg.server}: {exc.details()} ({remedy})") from None

    def get_task(self) -> wire.Task:
        try:
            return self._retry("GetTask", self.server.get_task)
        except wire.MalformedMessage as exc:  # e.g. a personalization method this device does not know
            raise TaskMismatch(f"the server's task cannot be used here: {exc}") from None

    def download(self, version: int) -> dict[str, np.ndarray]:
        """The served weights of `version`. A device holding an earlier version asks for the compressed
        steps since and rebuilds the server's weights, checked bit for bit (else it fetches the weights);
        a broken stream resumes at the byte it reached."""
        have, held = self.state.base_kept, self.state.base
        if held and have == version:
            return {k: v.copy() for k, v in held.items()}
        if held and 0 <= have < version:
            blob, content = self._fetch(version, have)
            if content == wire.STEPS:
                steps = wire.model_steps_from_blob(blob)
                if (steps.from_version, steps.to_version) != (have, version):
                    raise AgentError(f"asked for the steps v{have} -> v{version}, the server sent "
                                     f"v{steps.from_version} -> v{steps.to_version}")
                rebuilt = apply_steps(held, steps)
                if rebuilt_matches(rebuilt, steps):
                    log.info("version %d rebuilt from v%d and %d compressed step(s) (%d bytes)", version, have,
                             len(steps.steps), len(blob))
                    return rebuilt
                log.warning("version %d rebuilt from v%d does not match the server's; fetching it whole",
                            version, have)
            else:
                return wire.arrays_from_blob(blob)
        blob, _ = self._fetch(version, None)
        return wire.arrays_from_blob(blob)

    def _fetch(self, version: int, have: int | None) -> tuple[bytes, str]:
        """(blob, content) of one download, resumed at the byte it reached when the stream breaks."""
        got = bytearray()
        announced: dict[str, Any] = {}

        def attempt() -> bytes:
            def tap(stream: Iterator[Any]) -> Iterator[Any]:
                for chunk in stream:
                    if "total" not in announced:
                        announced.update(total=chunk.total_size, sha=bytes(chunk.sha256), content=chunk.content)
                    elif chunk.sha256 != announced["sha"]:  # a different blob: start over
                        got.clear()
                        announced.update(total=chunk.total_size, sha=bytes(chunk.sha256), content=chunk.content)
                        raise wire.ChecksumMismatch("the model changed while resuming its download")
                    yield chunk
                    if chunk.offset == len(got):
                        got.extend(chunk.data)
                        self.state.bytes_down += len(chunk.data)

            prefix = bytes(got)
            stream = self.server.download(wire.DownloadRequest(version, len(got), have_version=have))
            return wire.join_chunks(tap(stream), expected_total=announced.get("total"),
                                    expected_sha256=announced.get("sha"), received=prefix)

        tries = 0
        while True:
            try:
                blob = self._retry(f"DownloadModel(v{version})", attempt)
                return blob, announced.get("content", "")  # the bytearray join_chunks filled, not a copy
            except wire.WireError as exc:
                tries += 1
                if tries >= 3:
                    raise AgentError(f"download of version {version} keeps failing its checks: {exc}") from None
                log.warning("download of version %d failed its checks (%s); starting over", version, exc)
                got.clear()
                announced.clear()

    def upload(self, header: wire.UpdateHeader, blob: bytes) -> wire.UploadReply:
        """Send header + chunks; retried on UNAVAILABLE. If a retry finds the update already
        reported, an earlier attempt got through (only its reply was lost): that counts as accepted."""
        attempts = 0

        def call() -> wire.UploadReply:
            nonlocal attempts
            attempts += 1
            try:
                return self.server.upload(header, blob)
            except grpc.RpcError as exc:
                if attempts > 1 and wire.refusal_of(exc) is wire.Refusal.ALREADY_REPORTED:
                    log.info("round %d: an earlier upload attempt was accepted", header.round_id)
                    return wire.UploadReply(accepted=True, message="accepted by an earlier attempt")
                raise

        return self._retry("UploadUpdate", call)

    # ------------------------------------------------------------------ model and training

    def _model(self, model_ini: str, anchored: tuple[str, ...] = ()) -> tuple[Any, Any]:
        """(spec, trainer) of a model, the trainer planned with the agent's memory flags and the proximal
        anchors a method needs (`anchored`: their copies count in the plan and in --memory-budget)."""
        from fedpers.nn import Trainer

        key = (hashlib.sha256(model_ini.encode()).hexdigest(), tuple(anchored))
        if key not in self._models:
            for _, old in self._models.values():
                old.close()
            self._models.clear()
            spec = self._spec(model_ini)
            swap_dir = None
            if self.cfg.memory in ("swap", "swap-all") or self.cfg.memory_budget is not None:
                swap_dir = Path(self.cfg.swap_dir) if self.cfg.swap_dir else self.cfg.state / "swap"
                swap_dir.mkdir(parents=True, exist_ok=True)
            trainer = Trainer(spec, memory=self.cfg.memory, memory_budget=self.cfg.memory_budget,
                              lookahead=self.cfg.lookahead, micro_batch=self.cfg.micro_batch,
                              seed=codecs.derive_seed(self.state.name) & 0x7FFFFFFF,
                              swap_dir=str(swap_dir) if swap_dir else None, anchored=tuple(anchored))
            self._models[key] = (spec, trainer)
        return self._models[key]

    def _spec(self, model_ini: str) -> Any:
        """The model parsed (the last one kept), its notes logged and this device's data checked against it."""
        from fedpers.nn import parse_ini

        key = hashlib.sha256(model_ini.encode()).hexdigest()
        if self._parsed is None or self._parsed[0] != key:
            spec = parse_ini(model_ini)
            for note in spec.notes:  # NNTrainer keys the model gives that fedpers does not act on
                log.info("model: %s", note)
            self._check_data(spec)
            self._parsed = (key, spec)
        return self._parsed[1]

    def _check_data(self, spec: Any) -> None:
        """DataError when this device's examples or labels do not fit the model."""
        first, last = spec.layers[0], spec.layers[-1]
        num_classes = last.unit if last.type == "fully_connected" else None
        if first.input_shape is not None:
            check_against_model(self.data, first.input_shape, num_classes, str(self.cfg.data))

    def _remember_model(self, model_ini: str) -> None:
        """Keep the model text in --state, so a restarted device can still evaluate the final base."""
        if model_ini != self._last_model_ini:
            atomic_write_bytes(self.cfg.state / MODEL_FILE, model_ini.encode())
            self._last_model_ini = model_ini

    def _initial_weights(self, spec: Any) -> dict[str, np.ndarray]:
        from fedpers.nn import init_weights

        return init_weights(spec, 0)

    def _plan(self, task: wire.Task) -> RoundPlan:
        """Resolve a TRAIN task against the model, refusing a shared set that names personal tensors."""
        from fedpers.nn import weight_specs

        assert task.config is not None
        cfg = task.config
        setup = None
        if cfg.personalization is not None:
            spec = self._spec(task.model_ini)
            setup = self._method_setup(task.model_ini, spec, cfg.personalization, cfg.shared_tensors)
            spec, trainer = self._model(task.model_ini, setup.anchored)
            shared, personal = list(setup.split.shared), set(setup.split.local_layers)
        else:
            spec, trainer = self._model(task.model_ini)
            wspecs = weight_specs(spec)
            personal = personal_layer_names(spec.layers, cfg.personal_layers)
            shared = check_shared(cfg.shared_tensors, {n: w.layer for n, w in wspecs.items()}, personal)
        self._remember_model(task.model_ini)
        codec_name = self.cfg.codec or cfg.codec or "fp32"
        return RoundPlan(spec=spec, trainer=trainer, shared=shared, personal=personal,
                         codec=codecs.parse_codec(codec_name),
                         epochs=self.cfg.local_epochs or cfg.local_epochs or spec.epochs,
                         batch=cfg.batch_size or spec.batch_size, learning_rate=cfg.learning_rate or None, setup=setup)

    def _method_setup(self, model_ini: str, spec: Any, hp: Any, shared: tuple[str, ...]) -> Any:
        """The method's Setup on this model, narrowed to the server's shared set. PersonalLeak when the server
        asks for a tensor the method keeps on the device; TaskMismatch when the method does not fit."""
        from fedpers.client.methods import Setup
        from fedpers.nn import weight_specs
        from fedpers.personalization import PERSONAL_PREFIX, MethodError

        key = (hashlib.sha256(model_ini.encode()).hexdigest(), hp, tuple(sorted(shared)))
        if key not in self._setups:
            try:
                full = Setup.create(spec, hp.method, hp)
            except MethodError as exc:
                raise TaskMismatch(f"personalization {hp.method} does not fit the model: {exc}") from None
            leaked = sorted(n for n in shared if n in full.split.local or n.startswith(PERSONAL_PREFIX))
            if leaked:
                raise PersonalLeak(f"the server asks for tensors that stay on the device under {hp.method}: "
                                   f"{leaked}")
            check_shared(shared, {n: w.layer for n, w in weight_specs(spec).items()}, set(full.split.local_layers))
            try:
                self._setups[key] = full.with_shared(shared)
            except MethodError as exc:
                raise TaskMismatch(f"the server's shared tensors do not fit {hp.method}: {exc}") from None
            log.info("personalization %s: %d shared tensors, %d stay on this device%s", hp.method,
                     len(shared), len(self._setups[key].split.local),
                     " with a whole personal model" if full.method.personal_model else "")
        return self._setups[key]

    def _train_val(self, fraction: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(x, y, x_val, y_val): the validation split the device holds out for the whole federation to
        choose what it serves, seeded by its name (the same split after a restart)."""
        from fedpers.client.methods import validation_split

        if fraction not in self._splits:
            seed = codecs.derive_seed(self.state.name, "validation") & 0x7FFFFFFF
            self._splits[fraction] = validation_split(self.data.x, self.data.y, fraction, seed)
            log.info("holding out %d of %d examples to choose the model this device serves",
                     self._splits[fraction][3].size, self.data.num_examples)
        x, y, xv, yv = self._splits[fraction]
        return x, y, xv, yv

    def _evaluate(self, trainer: Any, weights: Mapping[str, np.ndarray] | None = None) -> tuple[float, float]:
        """(loss, accuracy) on the test split, of `weights` or the trainer's current ones."""
        if weights is not None:
            trainer.set_weights(weights, strict=False)
        return evaluate_on_test(trainer, self.data)

    def _download_base(self, plan: RoundPlan, version: int) -> dict[str, np.ndarray]:
        """The base's shared tensors, checked to be exactly what the task said would be shared."""
        from fedpers.nn import weight_specs

        base = self.download(version)
        wspecs = weight_specs(plan.spec)
        missing = sorted(set(plan.shared) - set(base))
        foreign = sorted(n for n in base if n not in wspecs or wspecs[n].layer in plan.personal)
        if missing or foreign:
            raise AgentError(f"base v{version} does not fit the task: missing shared tensors {missing}, "
                             f"unknown or personal tensors {foreign}")
        return base

    def _encode(self, plan: RoundPlan, trained: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray],
                round_id: int, feedback: bool = True) -> EncodedUpdate:
        """Deltas of the shared tensors through the codec, carrying each tensor's residual (error feedback).
        Without `feedback` (DP: the residual would pile up quantized noise round after round) none is kept."""
        residuals = self.state.residuals if self.state.codec == plan.codec.name and feedback else {}
        new_residuals: dict[str, np.ndarray] = {}
        tensors = []
        for name in plan.shared:
            delta = trained[name].astype(np.float32) - base[name].astype(np.float32)
            res = residuals.get(name)
            if res is not None and res.shape != delta.shape:
                res = None
            spec = codecs.codec_for(name, plan.codec)
            payload, new_res = codecs.encode(spec, delta, res, codecs.derive_seed(self.state.device_id, round_id, name))
            if new_res is not None and feedback:
                new_residuals[name] = new_res
            tensors.append(wire.encoded_to_wire(name, delta.shape, spec.name, payload))
        return EncodedUpdate(blob=wire.tensorset_to_blob(tensors), residuals=new_residuals)

    def _commit(self, record: RoundRecord, local: dict[str, np.ndarray], encoded: EncodedUpdate,
                codec_name: str, base: Mapping[str, np.ndarray]) -> None:
        """After the server accepted: local tensors, the base they pair with, residuals and bookkeeping
        in one atomic write."""
        self.state.local = local
        self.state.base, self.state.base_kept = dict(base), record.base_version
        self.state.residuals = encoded.residuals
        self.state.codec = codec_name
        self.state.last_round = record.round_id
        self.state.base_version = record.base_version
        self.state.bytes_up += record.bytes_up
        self.state.history.append(record)
        self.store.save(self.state)
        self.write_report()

    def _fit(self, plan: RoundPlan, base: Mapping[str, np.ndarray], seed: int) -> Trained:
        """No method: one Trainer.fit from base + local tensors, with a fresh optimizer (the device policy)."""
        trainer = plan.trainer
        trainer.set_weights(overlay(self._initial_weights(plan.spec), base, self.state.local), strict=False)
        glob = self._evaluate(trainer)
        trainer.reset_optimizer()
        fit = trainer.fit(self.data.x, self.data.y, epochs=plan.epochs, batch_size=plan.batch, shuffle=True,
                          seed=seed, learning_rate=plan.learning_rate)
        pers = self._evaluate(trainer)
        up, local = split_weights(trainer.get_weights(), plan.shared)
        return Trained(up, local, *glob, *pers, float(fit.loss), float(fit.accuracy))

    def _fit_method(self, plan: RoundPlan, base: Mapping[str, np.ndarray], seed: int) -> Trained:
        """The method's round (client.methods.run_round) on the data minus the validation split."""
        from fedpers.client.methods import TrainSettings, personal_model, run_round, start_weights

        setup, trainer = plan.setup, plan.trainer
        x, y, _, _ = self._train_val(setup.hp.val_fraction)
        glob = self._evaluate(trainer, start_weights(setup, base, self.state.local))
        res = run_round(setup, trainer, base, self.state.local, x, y,
                        TrainSettings(plan.epochs, plan.batch, plan.learning_rate, seed))
        trained = {**base, **res.shared}
        own = personal_model(setup, res.local) if setup.method.personal_model else None
        pers = self._evaluate(trainer, own or start_weights(setup, trained, res.local))
        m = res.metrics
        return Trained(res.shared, res.local, *glob, *pers, m.get("train_loss", float("nan")),
                       m.get("train_accuracy", float("nan")),
                       {k: float(v) for k, v in m.items() if k not in ("train_loss", "train_accuracy")})

    def train_round(self, task: wire.Task) -> bool:
        """One TRAIN task end to end. Returns True when the server accepted the update."""
        plan = self._plan(task)
        trainer = plan.trainer
        self._last_training = (plan.epochs, plan.batch, plan.learning_rate)
        r, v = task.round_id, task.base_version
        method = plan.setup.method.name if plan.setup is not None else "none"
        log.info("round %d: training from base v%d (personalization %s, %d shared tensors, personal layers %s, "
                 "codec %s, %d epochs)", r, v, method, len(plan.shared), sorted(plan.personal) or "none",
                 plan.codec.name, plan.epochs)

        down_before = self.state.bytes_down
        base = self._download_base(plan, v)
        if self.stop.is_set():
            raise Stopped
        t0 = time.perf_counter()
        seed = codecs.derive_seed(self.state.device_id, r) & 0x7FFFFFFF
        done = self._fit(plan, base, seed) if plan.setup is None else self._fit_method(plan, base, seed)
        train_seconds = time.perf_counter() - t0
        if self.stop.is_set():  # training finished but we are asked to stop: abandon, state untouched
            log.info("round %d: stop requested; abandoning the trained update", r)
            raise Stopped
        self._memory_report = trainer.memory_report().to_dict()

        # delta of the shared tensors only; local tensors are never serialized for the server
        up = {k: done.shared[k] for k in plan.shared}
        examples = self._examples(plan)
        cfg = task.config
        dp = cfg is not None and cfg.dp_clip_norm > 0
        if dp:  # differential privacy: clip + noise before the codec, and no error feedback
            up = privatize_weights(up, base, plan.shared, cfg.dp_clip_norm, cfg.dp_noise_multiplier)
        encoded = self._encode(plan, up, base, r, feedback=not dp)
        record = RoundRecord(
            round_id=r, base_version=v, num_examples=examples,
            global_accuracy=done.global_accuracy, global_loss=done.global_loss,
            personalized_accuracy=done.personalized_accuracy, personalized_loss=done.personalized_loss,
            train_loss=done.train_loss, train_accuracy=done.train_accuracy, bytes_up=len(encoded.blob),
            bytes_down=self.state.bytes_down - down_before, train_seconds=train_seconds, codec=plan.codec.name,
            epochs=int(plan.epochs), test_examples=int(self.data.y_test.size),
            dp_noise_multiplier=cfg.dp_noise_multiplier if dp else 0.0, dp_delta=cfg.dp_delta if dp else 0.0,
            method_metrics=done.metrics,
        )
        header = wire.UpdateHeader(round_id=r, base_version=v, num_examples=examples,
                                   total_size=len(encoded.blob), sha256=wire.sha256(encoded.blob),
                                   codec=plan.codec.name, metrics=record.metrics())
        if self.cfg.save_uploads:
            self.store.save_upload(r, encoded.blob)
        try:
            reply = self.upload(header, encoded.blob)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                log.warning("round %d: update refused (%s); dropping it", r, exc.details())
                return False
            raise AgentError(f"round {r}: the server refused the update: {exc.code().name}: {exc.details()}") from None
        if not reply.accepted:
            log.warning("round %d: update not accepted (%s)", r, reply.message)
            return False
        self._commit(record, done.local, encoded, plan.codec.name, base)
        log.info("round %d: sent %d bytes; global acc %.3f -> personalized %.3f (%d in round)",
                 r, record.bytes_up, done.global_accuracy, done.personalized_accuracy, reply.updates_in_round)
        return True

    def _examples(self, plan: RoundPlan) -> int:
        """The examples the round trained on (its weight in the server's mean): without the validation split."""
        if plan.setup is None:
            return self.data.num_examples
        return int(self._train_val(plan.setup.hp.val_fraction)[1].size)

    def finalize(self, task: wire.Task) -> None:
        """After DONE: evaluate the final base (with this device's local tensors) on the held-out split,
        then, without a method, personalize it with one more local training (same epochs as a round,
        nothing uploaded) and evaluate that; with a method, make the per-device choice
        (`_choose_served`). What it serves is kept in --state. A server that is gone by now only costs
        the final numbers (logged); any other failure is raised."""
        model_ini = task.model_ini or self._last_model_ini
        v = task.base_version
        if not model_ini or v <= 0 or not self.state.history:
            return
        spec = self._spec(model_ini)
        try:
            base = self.download(v)
        except (grpc.RpcError, AgentError) as exc:
            log.warning("could not download the final model v%d to evaluate it: %s", v, exc)
            return
        if task.config is not None:  # the server's settings (the DONE task carries them, as a TRAIN task does)
            cfg = task.config
            self._last_training = (self.cfg.local_epochs or cfg.local_epochs or spec.epochs,
                                   cfg.batch_size or spec.batch_size, cfg.learning_rate or None)
            if cfg.personalization is not None:
                self._choose_served(model_ini, spec, cfg.personalization, cfg.shared_tensors, base, v)
                return
        _, trainer = self._model(model_ini)
        trainer.set_weights(overlay(self._initial_weights(spec), base, self.state.local), strict=False)
        log.info("final base v%d: evaluating it on %d held-out examples", v, self.data.y_test.size)
        final_global = self._evaluate(trainer)[1]
        self._final = FinalEvaluation(version=v, global_accuracy=final_global)
        epochs, batch, lr = self._last_training or (self.cfg.local_epochs or spec.epochs, spec.batch_size, None)
        if self.stop.is_set():
            raise Stopped
        log.info("final base v%d: personalizing it with %d local epochs (nothing is uploaded)", v, epochs)
        trainer.reset_optimizer()
        trainer.fit(self.data.x, self.data.y, epochs=epochs, batch_size=batch, shuffle=True, learning_rate=lr,
                    seed=codecs.derive_seed(self.state.device_id, "final", v) & 0x7FFFFFFF)
        if self.stop.is_set():
            raise Stopped
        personalized = self._evaluate(trainer)[1]
        self._final = FinalEvaluation(version=v, global_accuracy=final_global, personalized_accuracy=personalized,
                                      epochs=int(epochs))
        _, local = split_weights(trainer.get_weights(), base)
        self.state.local = local
        self.state.base, self.state.base_kept = dict(base), v
        self.store.save(self.state)
        log.info("final base v%d: accuracy %.3f; personalized with %d local epochs: %.3f", v, final_global, epochs,
                 personalized)

    def _choose_served(self, model_ini: str, spec: Any, hp: Any, shared: tuple[str, ...], base: dict[str, np.ndarray],
                       v: int) -> None:
        """The per-device choice after the federation: the method's candidates (final_candidates) and a
        local-only model trained on the device alone for the epochs the federation trained here plus
        ft_epochs, scored on the validation split; the scores go to the server (ReportChoice), which
        answers the fleet default; `pick` then chooses, and the pick is kept in --state and reported."""
        from fedpers.client.methods import (
            TrainSettings,
            final_candidates,
            pick,
            score,
            start_weights,
            train_local_only,
        )
        from fedpers.personalization import LOCAL_ONLY

        setup = self._method_setup(model_ini, spec, hp, shared)
        _, trainer = self._model(model_ini, setup.anchored)
        x, y, xv, yv = self._train_val(hp.val_fraction)
        epochs, batch, lr = self._last_training or (self.cfg.local_epochs or spec.epochs, spec.batch_size, None)
        seed = codecs.derive_seed(self.state.device_id, "final", v) & 0x7FFFFFFF
        final_global = self._evaluate(trainer, start_weights(setup, base, self.state.local))[1]
        self._final = FinalEvaluation(version=v, global_accuracy=final_global, method=hp.method)
        log.info("final base v%d: building %s's candidates %s (%d fine-tuning epochs)", v, hp.method,
                 list(setup.method.candidates), hp.ft_epochs)
        cands = final_candidates(setup, trainer, base, self.state.local, x, y, TrainSettings(epochs, batch, lr, seed))
        if self.stop.is_set():
            raise Stopped
        lo_epochs = v * epochs + hp.ft_epochs  # what a device in every round trained, plus the fine-tuning
        log.info("training a local-only model on this device's %d examples alone (%d epochs, nothing is uploaded)",
                 y.size, lo_epochs)
        lo_seed = codecs.derive_seed(self.state.name, "local_only") & 0x7FFFFFFF
        cands[LOCAL_ONLY] = train_local_only(setup, trainer, x, y, TrainSettings(lo_epochs, batch, lr, lo_seed))
        if self.stop.is_set():
            raise Stopped
        test = {name: self._evaluate(trainer, w)[1] for name, w in cands.items()}
        own = setup.method.serves
        if yv.size:
            acc, loss = score(trainer, cands, xv, yv)
        else:
            acc, loss = {}, {}
        default = self._fleet_default(v, acc, int(yv.size), own)
        picked = pick(acc, loss, int(yv.size), own=default) if yv.size else default
        self._final = FinalEvaluation(
            version=v, global_accuracy=final_global, personalized_accuracy=test[own], epochs=int(hp.ft_epochs),
            method=hp.method, candidate_accuracy=test, val_accuracy=acc, val_examples=int(yv.size),
            fleet_default=default, served=picked, local_only_epochs=int(lo_epochs))
        self.state.served, self.state.served_name = dict(cands[picked]), picked
        self.state.base, self.state.base_kept = dict(base), v
        self.store.save(self.state)
        log.info("serving %s (fleet default %s): test accuracy %s", picked, default,
                 {k: round(a, 3) for k, a in test.items()})

    def _fleet_default(self, version: int, acc: dict[str, float], n_val: int, own: str) -> str:
        """Report the validation scores and wait for the server's fleet default (ReportChoice, repeated
        until decided, at most CHOICE_WAIT seconds); the method's own model when the server cannot say."""
        request = wire.ChoiceRequest(version=version, val_accuracy=acc, val_examples=n_val)
        deadline = time.monotonic() + CHOICE_WAIT
        while True:
            try:
                reply = self._retry("ReportChoice", lambda: self.server.report_choice(request))
            except (grpc.RpcError, AgentError, wire.WireError) as exc:
                details = exc.details() if isinstance(exc, grpc.RpcError) else str(exc)
                log.warning("no fleet default from the server (%s); serving by the method's default, %s", details,
                            own)
                return own
            if reply.decided:
                return reply.fleet_default
            if time.monotonic() > deadline:
                log.warning("the server decided no fleet default in %.0fs; serving by the method's default, %s",
                            CHOICE_WAIT, own)
                return own
            log.info("waiting for the fleet default (%d of %d devices reported)", reply.reported, reply.expected)
            self._wait(reply.retry_after_seconds or 1.0)

    # ------------------------------------------------------------------ the loop

    def report(self, finished: bool = False, reason: str = "") -> DeviceReport:
        final = self._final
        return DeviceReport.from_state(
            self.state, peak_rss_bytes=peak_rss_bytes(), memory_report=self._memory_report,
            train_examples=self.data.num_examples, test_examples=int(self.data.y_test.size), finished=finished,
            reason=reason, final_version=final.version if final else None,
            final_global_accuracy=final.global_accuracy if final else None,
            final_personalized_accuracy=final.personalized_accuracy if final else None,
            final_epochs=final.epochs if final else 0,
            **({} if final is None or not final.method else dict(
                method=final.method, candidate_accuracy=final.candidate_accuracy, val_accuracy=final.val_accuracy,
                val_examples=final.val_examples, fleet_default=final.fleet_default, served=final.served,
                local_only_epochs=final.local_only_epochs)),
        )

    def write_report(self, finished: bool = False, reason: str = "") -> DeviceReport:
        rep = self.report(finished, reason)
        write_report(self.store.report_path, rep)
        return rep

    def step(self, task: wire.Task | None = None) -> Step:
        """Advance this device by one task and say what happened, without sleeping: `task` when the
        caller already asked GetTask for it (a simulator host polling many devices), else the next one
        (joining first when the client has no session). `run()` loops over it; a host of virtual
        devices calls it once per device and moves on."""
        if task is None:
            if self.server.device_id is None:
                self.join()
            task = self.get_task()
        if task.kind == wire.TaskKind.DONE:
            log.info("the federation is done")
            self.finalize(task)
            return Step(StepKind.DONE, round_id=task.round_id)
        if task.kind == wire.TaskKind.WAIT:
            return Step(StepKind.WAIT, wait=task.retry_after_seconds or 0.5)
        if self.train_round(task):
            return Step(StepKind.TRAINED, round_id=task.round_id)
        return Step(StepKind.REFUSED, wait=task.retry_after_seconds or 0.5, round_id=task.round_id)

    def run(self) -> RunResult:
        done_here = 0
        reason = "stopped"
        try:
            self.join()
            while True:
                if self.cfg.max_rounds is not None and done_here >= self.cfg.max_rounds:
                    reason = "max_rounds"
                    break
                step = self.step()
                if step.kind is StepKind.DONE:
                    reason = "done"
                    break
                if step.kind is StepKind.TRAINED:
                    done_here += 1
                else:
                    self._wait(step.wait)
        except Stopped:
            log.info("stopped; state in %s is consistent", self.cfg.state)
            reason = "stopped"
        except BaseException:
            reason = "error"
            raise
        finally:
            rep = self.write_report(finished=reason == "done", reason=reason)
            self.close()
        return RunResult(reason=reason, rounds=done_here, report=rep)


def describe(cfg: AgentConfig) -> dict[str, Any]:
    """The config as plain JSON (for logs)."""
    out = asdict(cfg)
    out["data"], out["state"] = str(cfg.data), str(cfg.state)
    out["tls"] = cfg.tls.describe()
    out.pop("enroll_token", None)
    return out
