"""What one personalization round does on the device, and what the device serves at the end.

No gRPC here: the agent downloads the base, calls `run_round`, encodes `RoundResult.shared - base`
for the server and keeps `RoundResult.local` on the device; when the federation is done it builds
`final_candidates`, adds a local-only model (`train_local_only`) and serves what `choose` picks on
its validation split (`validation_split` of its own training data).

Device optimizer state is reset at the start of every training phase (`Trainer.reset_optimizer`):
each round starts from weights the server replaced, so moments estimated on the previous round's
trajectory point the wrong way; a device may skip rounds; keeping them would mean persisting two
more model-sized tensors per round; and the local-only baseline starts fresh too. The learning-rate
schedule restarts with it (one local training = one schedule).

Local tensors are named like the model's weights, except Ditto's personal model, which is a whole
model copy kept under `PERSONAL_PREFIX` so no local name ever equals a shared one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
from fedpers.codec import STATISTICS_SUFFIXES
from fedpers.nn import FitResult, ModelSpec, Trainer, init_weights, weight_specs
from fedpers.personalization import (
    LOCAL_ONLY,
    PERSONAL_PREFIX,
    Hyperparams,
    Keep,
    Method,
    MethodError,
    TensorSplit,
    fleet_default,  # noqa: F401 - re-exported: what the server decides, for in-process callers
    head_layers,
)
from fedpers.personalization import get as get_method

log = logging.getLogger(__name__)

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class TrainSettings:
    """One local training as the round's task asks for it (None: the model file's value)."""

    epochs: int
    batch_size: int | None = None
    learning_rate: float | None = None
    seed: int = 0


@dataclass(frozen=True)
class Setup:
    """A device's view of its federation's method: hyperparameters, tensor split, head and body."""

    spec: ModelSpec
    method: Method
    hp: Hyperparams
    split: TensorSplit
    init: Mapping[str, np.ndarray]  # weights for tensors neither the base nor the device has yet
    head: tuple[str, ...]  # layers fine-tuning with ft_scope=head and FedRep's head phase train
    body: tuple[str, ...]  # every other layer

    @classmethod
    def create(cls, spec: ModelSpec, method: str | Method, hp: Hyperparams | Mapping | None = None,
               init_seed: int = 0) -> Setup:
        """Check the method against the model and derive the split (MethodError names any problem)."""
        m = get_method(method) if isinstance(method, str) else method
        h = hp if isinstance(hp, Hyperparams) else m.hyperparams(hp)
        split = m.split(weight_specs(spec).values(), spec.layers, h)
        head = split.local_layers if m.keeps is Keep.HEAD else head_layers(spec.layers, h.head_depth)
        body = tuple(ls.name for ls in spec.layers if ls.name not in head)
        return cls(spec, m, h, split, init_weights(spec, init_seed), head, body)

    def with_shared(self, shared: Iterable[str]) -> Setup:
        """This setup with the server's shared set, which may leave out batch-norm running statistics
        (`--bn-stats local`): those then stay on the device with the local tensors. MethodError when the
        server asks for a tensor the method does not share, or leaves out anything else."""
        names = tuple(sorted(set(shared)))
        if names == self.split.shared:
            return self
        extra = sorted(set(names) - set(self.split.shared))
        if extra:
            raise MethodError(f"{self.method.name} does not share {extra}")
        kept = sorted(set(self.split.shared) - set(names))
        if not all(k.endswith(STATISTICS_SUFFIXES) for k in kept):
            raise MethodError(f"{self.method.name} shares {[k for k in kept if not k.endswith(STATISTICS_SUFFIXES)]}, "
                              "which the server does not ask for")
        split = replace(self.split, shared=names, served=tuple(n for n in self.split.served if n not in kept),
                        local=tuple(sorted({*self.split.local, *kept})))
        return replace(self, split=split)

    @property
    def anchored(self) -> tuple[str, ...]:
        """Weights the Trainer must anchor for this method (so its memory plan counts the anchors)."""
        if self.method.personal_model and self.hp.lam > 0:
            return tuple(sorted(self.init))  # Ditto: the personal model is pulled towards the whole global one
        return self.split.shared if self.hp.mu > 0 else ()

    def trainer(self, **options) -> Trainer:
        """A Trainer for this method (memory options as for Trainer) with the anchors it needs."""
        return Trainer(self.spec, anchored=self.anchored, **options)


@dataclass
class RoundResult:
    """One round on the device: what goes to the server, what stays, and how training went."""

    shared: Weights  # trained shared tensors: the update is shared - base
    local: Weights  # the device's local tensors after the round (never sent)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Choice:
    """What a device serves at the end, and the validation scores it chose by."""

    picked: str
    val_accuracy: dict[str, float]
    val_loss: dict[str, float]
    val_examples: int


# ------------------------------------------------------------------------------- helpers


def start_weights(setup: Setup, base: Mapping[str, np.ndarray], local: Mapping[str, np.ndarray]) -> Weights:
    """The full model a phase starts from: the base where it has a tensor, then the device's local
    tensors (plain names only), then the initial weights."""
    out = {k: np.asarray(v, np.float32) for k, v in setup.init.items()}
    for src in (local, base):
        for k, v in src.items():
            if k in out and not k.startswith(PERSONAL_PREFIX):
                out[k] = np.asarray(v, np.float32)
    return out


def _train(trainer: Trainer, x: np.ndarray, y: np.ndarray, s: TrainSettings, epochs: int, phase: int, *,
           frozen: tuple[str, ...] = (), mu: float | Mapping[str, float] = 0.0) -> FitResult:
    """One training phase from the trainer's current weights, with a fresh optimizer (each phase its own
    shuffling seed)."""
    trainer.set_frozen(frozen)
    trainer.set_proximal(mu)
    trainer.reset_optimizer()
    return trainer.fit(x, y, epochs=epochs, batch_size=s.batch_size, learning_rate=s.learning_rate,
                       seed=s.seed * 101 + phase, shuffle=True)


def _shared_prox(setup: Setup, trainer: Trainer, base: Mapping[str, np.ndarray]) -> dict[str, float]:
    """FedProx's term on the shared part: anchors set to the base, mu per shared weight with an anchor."""
    if setup.hp.mu <= 0:
        return {}
    if not set(setup.split.shared) & set(trainer.anchored):
        raise MethodError(f"mu={setup.hp.mu} needs a Trainer built with Setup.trainer() (anchored shared weights)")
    trainer.set_anchor(base)
    return {k: setup.hp.mu for k in setup.split.shared if k in trainer.anchored}


def _split(setup: Setup, trained: Weights) -> tuple[Weights, Weights]:
    """(shared, local) tensors of a trained model: what the server gets, what stays."""
    shared = {k: trained[k] for k in setup.split.shared}
    local = {k: trained[k] for k in setup.split.local}
    return shared, local


def _metrics(prefix: str, fit: FitResult) -> dict[str, float]:
    """A fit's loss, accuracy and steps as round metrics (the agent reports them to the server)."""
    return {f"{prefix}loss": float(fit.loss), f"{prefix}accuracy": float(fit.accuracy), f"{prefix}steps": fit.steps}


# ------------------------------------------------------------------------------- rounds


def _joint_round(setup: Setup, trainer: Trainer, base: Mapping[str, np.ndarray], local: Mapping[str, np.ndarray],
                 x: np.ndarray, y: np.ndarray, s: TrainSettings) -> RoundResult:
    """FedAvg, FedProx, FedPer, FedBN: every layer trains together from base + local tensors."""
    trainer.set_weights(start_weights(setup, base, local))
    fit = _train(trainer, x, y, s, s.epochs, 0, mu=_shared_prox(setup, trainer, base))
    shared, new_local = _split(setup, trainer.get_weights())
    return RoundResult(shared, new_local, _metrics("train_", fit))


def _fedrep_round(setup: Setup, trainer: Trainer, base: Mapping[str, np.ndarray], local: Mapping[str, np.ndarray],
                  x: np.ndarray, y: np.ndarray, s: TrainSettings) -> RoundResult:
    """FedRep: head_epochs on the head with the body frozen, then body_epochs on the body with the head
    frozen; the body is shared, the head stays."""
    hp = setup.hp
    trainer.set_weights(start_weights(setup, base, local))
    head_fit = _train(trainer, x, y, s, hp.head_epochs, 0, frozen=setup.body)
    body_fit = _train(trainer, x, y, s, hp.body_epochs, 1, frozen=setup.head,
                      mu=_shared_prox(setup, trainer, base))
    trainer.set_frozen(())
    shared, new_local = _split(setup, trainer.get_weights())
    return RoundResult(shared, new_local, {**_metrics("head_", head_fit), **_metrics("train_", body_fit)})


def _ditto_round(setup: Setup, trainer: Trainer, base: Mapping[str, np.ndarray], local: Mapping[str, np.ndarray],
                 x: np.ndarray, y: np.ndarray, s: TrainSettings) -> RoundResult:
    """Ditto: the global model trains as in FedAvg (its update is shared); then the personal model v
    (the global one on the first round) trains `personal_epochs` with lam/2·||v - w_global||², w_global
    being the round's base."""
    hp = setup.hp
    trainer.set_weights(start_weights(setup, base, local))
    fit = _train(trainer, x, y, s, s.epochs, 0, mu=_shared_prox(setup, trainer, base))
    shared, kept = _split(setup, trainer.get_weights())  # kept: statistics the server leaves on the device
    personal = personal_model(setup, local) or start_weights(setup, base, {})
    trainer.set_weights(personal)
    if hp.lam > 0:
        trainer.set_anchor(start_weights(setup, base, {}))
    pfit = _train(trainer, x, y, s, hp.personal_epochs, 1, mu=hp.lam)
    trainer.set_proximal(0.0)
    new_local = {**kept, **{PERSONAL_PREFIX + k: v for k, v in trainer.get_weights().items()}}
    return RoundResult(shared, new_local, {**_metrics("train_", fit), **_metrics("personal_", pfit)})


RoundFn = Callable[[Setup, Trainer, Mapping, Mapping, np.ndarray, np.ndarray, TrainSettings], RoundResult]
# Method.procedure -> what one round does on the device (a registered method names one of these)
ROUNDS: dict[str, RoundFn] = {
    "joint": _joint_round,  # FedAvg, FedProx, FedPer, FedBN
    "alternating": _fedrep_round,  # FedRep
    "ditto": _ditto_round,
}


def run_round(setup: Setup, trainer: Trainer, base: Mapping[str, np.ndarray], local: Mapping[str, np.ndarray],
              x: np.ndarray, y: np.ndarray, settings: TrainSettings) -> RoundResult:
    """One round of `setup.method` from the server's base and the device's local tensors."""
    missing = sorted(set(setup.split.shared) - set(base))
    if missing:
        raise MethodError(f"the base lacks shared tensors {missing}")
    leaked = sorted(set(base) & set(setup.split.local))
    if leaked:
        raise MethodError(f"the base carries tensors that stay on the device under {setup.method.name}: {leaked}")
    result = ROUNDS[setup.method.procedure](setup, trainer, base, local, x, y, settings)
    assert set(result.shared) == set(setup.split.shared) and not set(result.local) & set(result.shared)
    return result


def personal_model(setup: Setup, local: Mapping[str, np.ndarray]) -> Weights | None:
    """Ditto's personal model from the device's local tensors (None before its first round)."""
    n = len(PERSONAL_PREFIX)
    found = {k[n:]: np.asarray(v, np.float32) for k, v in local.items() if k.startswith(PERSONAL_PREFIX)}
    return start_weights(setup, found, {}) if found else None


# ------------------------------------------------------------------------------- the end


def final_candidates(setup: Setup, trainer: Trainer, base: Mapping[str, np.ndarray],
                     local: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray,
                     settings: TrainSettings) -> dict[str, Weights]:
    """The models this method can serve after the last round (see Method.candidates):
    global = the final base (methods that keep no layers); personal = base + the device's layers
    (FedRep first retrains its head on the final body, Ditto's is its personal model); finetuned =
    global or personal trained ft_epochs more on the device (all layers or the head)."""
    hp, m = setup.hp, setup.method
    out: dict[str, Weights] = {}
    if "global" in m.candidates:
        out["global"] = start_weights(setup, base, local)
    if "personal" in m.candidates:
        if m.personal_model:
            out["personal"] = personal_model(setup, local) or start_weights(setup, base, {})
        else:
            out["personal"] = start_weights(setup, base, local)
            if m.procedure == "alternating":
                trainer.set_weights(out["personal"])
                _train(trainer, x, y, settings, hp.head_epochs, 2, frozen=setup.body)
                out["personal"] = trainer.get_weights()
    if "finetuned" in m.candidates and hp.ft_epochs > 0:
        trainer.set_weights(out["global"] if "global" in out else out["personal"])
        frozen = setup.body if hp.ft_scope == "head" else ()
        _train(trainer, x, y, settings, hp.ft_epochs, 3, frozen=frozen)
        out["finetuned"] = trainer.get_weights()
    trainer.set_frozen(())
    return out


def train_local_only(setup: Setup, trainer: Trainer, x: np.ndarray, y: np.ndarray, settings: TrainSettings) -> Weights:
    """A model trained on this device alone from the initial weights (settings.epochs: the same number of
    epochs the federation trained here): the reference a device must not fall below."""
    trainer.set_weights(setup.init)
    _train(trainer, x, y, settings, settings.epochs, 4)
    return trainer.get_weights()


MIN_EVIDENCE = 8  # validation examples below which a one-example difference is noise


def pick(acc: Mapping[str, float], loss: Mapping[str, float], n_val: int, own: str | None = None,
         min_evidence: int = MIN_EVIDENCE) -> str:
    """The rule `choose` applies to validation scores (pure, so it can be checked and replayed).

    The highest validation accuracy wins, guarded for validation splits of a handful of examples:
    - `own` (the model the federation serves this device: the method's own, or local-only when the
      federation's validation says so) is only replaced by a candidate right on more validation
      examples: one more, two more below `min_evidence` examples;
    - when the leaders are all perfect on at least `min_evidence` examples, accuracy cannot tell them
      apart and `own` and local-only compare validation loss (a derived model, global or fine-tuned,
      still needs a better accuracy); with fewer, a loss mostly measures how overconfident an overfit
      local model is.
    Without `own`: ties go to the lower loss, then to the earlier candidate."""
    if not acc:
        raise MethodError("no candidates to choose from")
    if own is None:
        return min(acc, key=lambda n: (-acc[n], loss[n]))
    if own not in acc:
        raise MethodError(f"the model to serve by default, {own!r}, is not among the candidates {sorted(acc)}")
    anchors = {own, LOCAL_ONLY}
    by_loss = max(acc.values()) >= 1.0 and n_val >= min_evidence
    best = min(acc, key=lambda n: (-acc[n], n not in anchors, loss[n] if by_loss else n != own, loss[n]))
    if best == own or (by_loss and acc[best] == acc[own]):
        return best
    need = 1 if n_val >= min_evidence else 2
    return best if round((acc[best] - acc[own]) * n_val) >= need else own


def score(trainer: Trainer, candidates: Mapping[str, Mapping[str, np.ndarray]], x_val: np.ndarray,
          y_val: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
    """(accuracy, loss) of every candidate on the device's validation split."""
    if not candidates:
        raise MethodError("no candidates to choose from")
    if len(y_val) == 0:
        raise MethodError("no validation examples to choose with (val_fraction is 0 or the device too small)")
    acc, loss = {}, {}
    for name, w in candidates.items():
        trainer.set_weights(w)
        ev = trainer.evaluate(x_val, y_val)
        acc[name], loss[name] = float(ev.accuracy), float(ev.loss)
    return acc, loss


def choose(trainer: Trainer, candidates: Mapping[str, Mapping[str, np.ndarray]], x_val: np.ndarray,
           y_val: np.ndarray, own: str | None = None) -> Choice:
    """Evaluate every candidate on the device's validation split and `pick` one."""
    acc, loss = score(trainer, candidates, x_val, y_val)
    picked = pick(acc, loss, len(y_val), own)
    log.info("serving %s (validation accuracy %s)", picked, {k: round(v, 3) for k, v in acc.items()})
    return Choice(picked, acc, loss, int(len(y_val)))


def validation_split(x: np.ndarray, y: np.ndarray, fraction: float, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_val, y_val), seeded: round(fraction * n) examples held out (at least one when
    fraction > 0), spread over the classes in proportion (largest remainders); a class always keeps
    one example for training."""
    if not 0.0 <= fraction < 1.0:
        raise MethodError(f"val_fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    want = 0 if fraction == 0 else max(1, round(fraction * len(y)))
    cap = counts - 1
    take = np.minimum(np.floor(fraction * counts).astype(np.int64), cap)
    rest = fraction * counts - take + rng.random(len(counts)) * 1e-6  # random tie-break
    for c in np.argsort(-rest, kind="stable"):
        if take.sum() >= want:
            break
        if take[c] < cap[c]:
            take[c] += 1
    val = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take, strict=True)]
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    mask = np.ones(len(y), bool)
    mask[val_idx] = False
    return x[mask], y[mask], x[val_idx], y[val_idx]
