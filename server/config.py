"""Server settings: one typed record, filled from defaults < TOML file (--config) < command-line flags."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from fedpers import personalization as pers
from fedpers.codec import CodecError, parse_codec
from fedpers.logs import LOG_FORMATS
from fedpers.privacy import DPConfig, PrivacyError
from fedpers.private import SecretError, secret_from
from fedpers.server.identity import (
    ENV_ADMIN_TOKEN,
    ENV_ENROLL_TOKEN,
    IdentityConfigError,
    IdentityPolicy,
    admin_token_for,
)
from fedpers.server.limits import LimitsPolicy
from fedpers.server.rounds import PolicyError, RoundPolicy
from fedpers.strategies import AGGREGATORS, STRATEGIES
from fedpers.tls import ServerTls

ENV_STATE_URL = "FEDPERS_STATE_URL"  # the state URL from the environment (it may carry a password there)
ENV_STATE_PASSWORD = "FEDPERS_STATE_PASSWORD"


class ConfigError(ValueError):
    """A setting is unknown or out of range; the message names the key."""


@dataclass(frozen=True)
class ServerConfig:
    model: Path
    store: Path
    listen: str = "127.0.0.1:50051"
    rounds: int = 10
    min_devices: int = 2
    fraction: float = 1.0
    round_timeout: float = 60.0
    strategy: str = "fedavg"
    server_lr: float | None = None  # None: the strategy's default (fedavg/fedavgm 1.0, fedadam 0.01)
    enroll_token: str = ""  # from --enroll-token-file, FEDPERS_ENROLL_TOKEN or the TOML file; never argv
    enroll_token_file: Path | None = None
    open_enrollment: bool = False  # anyone may enroll (capped by max_devices); else a token is needed
    max_devices: int = 1000  # enrolled devices that are not revoked
    admin_token: str = ""  # GetStatus for operators; "" : FEDPERS_ADMIN_TOKEN, else <store>/admin.token
    admin_token_file: Path | None = None
    personal_layers: tuple[str, ...] = ()
    personalization: str | None = None  # a method of fedpers.personalization.METHODS; None: the INI's personal marks
    personalization_params: str = ""  # "name=value,..." for the method (its defaults otherwise)
    choice_timeout: float = 120.0  # after the last round: how long the fleet default waits for the devices' scores
    local_epochs: int | None = None  # None: from the model INI ([Model] Epochs)
    batch_size: int | None = None  # None: from the model INI
    learning_rate: float | None = None  # None: from the model INI ([Optimizer] Learning_rate)
    codec: str = "fp32"
    downlink_codec: str = "none"  # each version = previous + this codec's step; "none": exact versions, full downloads
    downlink_steps: int = 8  # a device at most this many versions behind downloads steps, else the weights
    seed: int = 0
    log_level: str = "INFO"
    log_file: Path | None = None  # None: stderr
    log_format: str = "text"  # text | json (one object per line)
    clip_norm: float | None = None  # clip each delta to this global L2 norm before averaging
    aggregation: str = "mean"  # fedpers.strategies.AGGREGATORS
    trim: float = 0.2  # trimmed mean: fraction dropped at each end, per coordinate
    robust_memory_mb: float = 1024.0  # trimmed / median keep every delta: at most this much
    dp_clip: float = 0.0  # devices clip their delta to this L2 norm (0: no differential privacy)
    dp_noise: float = 0.0  # ... and add Gaussian noise of std dp_noise x dp_clip
    dp_delta: float = 1e-5  # the delta of the (epsilon, delta) reported per round
    bn_stats: str = "shared"  # shared | local: batch-norm running statistics averaged, or kept on devices
    norm_bound: float | None = None  # refuse updates whose global L2 norm is larger
    max_update_mb: float | None = None  # None: 2x the fp32 size of the shared tensors + 1 MiB
    workers: int = 4  # gRPC handler threads: bounds concurrent uploads, hence server memory
    retry_after: float = 0.5  # seconds a waiting device is told to wait
    waiting_ttl: float | None = None  # liveness: None = max(2 s, 6 x retry_after)
    target_devices: int | None = None  # close a round at this many updates (over-selection)
    over_select: float = 0.3  # with target_devices: select ceil(target x (1 + over_select))
    max_examples: int = 10_000  # ceiling on the num_examples one update may count for
    port_file: Path | None = None  # write the bound port here once serving (for --listen HOST:0)
    metrics_listen: str | None = None  # HOST:PORT for Prometheus /metrics; None: no metrics endpoint
    linger: float = 10.0  # after the federation finished: exit once no device has called for this long
    keep_serving: bool = False  # never exit by itself (status, downloads and exports stay available)
    tls_cert: Path | None = None  # the server's certificate chain (PEM)
    tls_key: Path | None = None  # its private key (PEM)
    tls_client_ca: Path | None = None  # require client certificates signed by this CA (mutual TLS)
    insecure: bool = False  # plaintext: the only way to run without --tls-cert/--tls-key
    stream_idle_timeout: float = 20.0  # an upload/download that sends nothing this long is cut
    stream_min_rate: float = 4096.0  # ... or that averages fewer bytes/s once stream_idle_timeout has passed
    streams_per_device: int = 2  # concurrent uploads/downloads of one device
    rate_scale: float = 1.0  # multiplies every per-caller call rate and burst (server/limits.py); 0: none
    state_url: str | None = None  # postgresql://...: state on PostgreSQL, shared by replicas; None: SQLite in store
    state_password_file: Path | None = None  # the PostgreSQL password (or FEDPERS_STATE_PASSWORD / libpq's own)
    replica_name: str | None = None  # this replica's name in the cluster tables (None: host-pid-random)

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"{key}: {why}")

        if self.strategy not in STRATEGIES:
            raise bad("strategy", f"unknown {self.strategy!r}; known: {list(STRATEGIES)}")
        if self.log_format not in LOG_FORMATS:
            raise bad("log_format", f"must be one of {list(LOG_FORMATS)}, got {self.log_format!r}")
        if self.aggregation not in AGGREGATORS:
            raise bad("aggregation", f"unknown {self.aggregation!r}; known: {list(AGGREGATORS)}")
        if self.aggregation == "normbounded" and self.clip_norm is None:
            raise bad("aggregation", "normbounded needs clip_norm (--clip-norm)")
        if not 0 <= self.trim < 0.5:
            raise bad("trim", f"must be in [0, 0.5), got {self.trim}")
        if not self.robust_memory_mb > 0:
            raise bad("robust_memory_mb", f"must be > 0, got {self.robust_memory_mb}")
        if self.bn_stats not in ("shared", "local"):
            raise bad("bn_stats", f"must be shared or local, got {self.bn_stats!r}")
        try:
            self.dp_config()  # the DP settings are checked where they are used, once
        except PrivacyError as exc:
            raise ConfigError(str(exc)) from None
        if self.workers < 1:
            raise bad("workers", f"must be >= 1, got {self.workers}")
        if self.max_devices < 1:
            raise bad("max_devices", f"must be >= 1, got {self.max_devices}")
        if self.rate_scale < 0:
            raise bad("rate_scale", f"must be >= 0, got {self.rate_scale}")
        if self.streams_per_device < 1:
            raise bad("streams_per_device", f"must be >= 1, got {self.streams_per_device}")
        if not self.stream_idle_timeout > 0 or self.stream_min_rate < 0:
            raise bad("stream_idle_timeout", f"must be > 0 (and stream_min_rate >= 0), got {self.stream_idle_timeout} "
                                             f"and {self.stream_min_rate}")
        try:
            self.hyperparams()  # the method and its hyperparameters are checked once, here
        except pers.MethodError as exc:
            raise bad("personalization", str(exc)) from None
        for key in ("server_lr", "clip_norm", "max_update_mb", "learning_rate", "linger", "choice_timeout"):
            v = getattr(self, key)
            if v is not None and not v > 0:
                raise bad(key, f"must be > 0, got {v}")
        if self.downlink_codec != "none":
            try:
                parse_codec(self.downlink_codec)
            except CodecError as exc:
                raise bad("downlink_codec", str(exc)) from None
        for key in ("local_epochs", "batch_size", "downlink_steps"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise bad(key, f"must be >= 1, got {v}")
        for key in ("listen", "metrics_listen"):
            v = getattr(self, key)
            if v is not None and ":" not in v:
                raise bad(key, f"must be HOST:PORT, got {v!r}")
        try:
            self.round_policy()  # the round settings are checked where they are used, once
        except PolicyError as exc:
            raise ConfigError(str(exc)) from None
        if self.state_url is not None:
            from fedpers.server.state_pg import is_postgres_url

            if not is_postgres_url(self.state_url):
                raise bad("state_url", f"must be a postgresql:// URL (the default state is SQLite in --store), "
                                       f"got {self.state_url.split('://')[0]}://...")
        if self.insecure and (self.tls_cert or self.tls_key or self.tls_client_ca):
            raise bad("insecure", "plaintext cannot be combined with --tls-cert/--tls-key/--tls-client-ca")
        if not self.insecure and not (self.tls_cert and self.tls_key):
            raise bad("tls_cert", "the server needs --tls-cert and --tls-key (see SECURITY.md; "
                                  "`fedpers-server dev-certs` makes throwaway ones), or --insecure for plaintext "
                                  "on a trusted network")

    def hyperparams(self) -> pers.Hyperparams | None:
        """The personalization method's checked hyperparameters, or None without a method."""
        if self.personalization is None:
            if self.personalization_params:
                raise pers.MethodError("personalization_params given without personalization (--personalization NAME)")
            return None
        return pers.get(self.personalization).parse(self.personalization_params)

    def identity_policy(self) -> IdentityPolicy:
        """Who may enroll and read the status, with the tokens read from their files or the environment
        (the admin token falls back to <store>/admin.token, made on first start)."""
        try:
            enroll = self.enroll_token or secret_from(self.enroll_token_file, ENV_ENROLL_TOKEN, "enrollment token")
            admin = self.admin_token or secret_from(self.admin_token_file, ENV_ADMIN_TOKEN, "admin token")
            return IdentityPolicy(enroll_token=enroll, open_enrollment=self.open_enrollment,
                                  max_devices=self.max_devices, admin_token=admin_token_for(self.store, admin))
        except (SecretError, IdentityConfigError) as exc:
            raise ConfigError(str(exc)) from None

    def state_password(self) -> str:
        """The PostgreSQL password from --state-password-file or FEDPERS_STATE_PASSWORD ("" : libpq finds it
        itself, from PGPASSWORD or PGPASSFILE, or none is needed)."""
        try:
            return secret_from(self.state_password_file, ENV_STATE_PASSWORD, "PostgreSQL password")
        except SecretError as exc:
            raise ConfigError(f"state_password_file: {exc}") from None

    def limits_policy(self) -> LimitsPolicy:
        """Per-caller rates, streams and stall limits (server/limits.py)."""
        return LimitsPolicy.for_server(self.retry_after, self.rate_scale, streams_per_device=self.streams_per_device,
                                       idle_timeout=self.stream_idle_timeout, min_rate=self.stream_min_rate)

    def server_tls(self) -> ServerTls | None:
        """The TLS side of the gRPC port, or None for plaintext (--insecure)."""
        if self.insecure or self.tls_cert is None or self.tls_key is None:
            return None
        return ServerTls(cert=self.tls_cert, key=self.tls_key, client_ca=self.tls_client_ca)

    def dp_config(self) -> DPConfig:
        """The devices' clipping and noise, and the delta the server reports epsilon at."""
        return DPConfig(clip_norm=self.dp_clip, noise_multiplier=self.dp_noise, delta=self.dp_delta)

    def round_policy(self) -> RoundPolicy:
        """The coordinator's policy from these settings."""
        return RoundPolicy(
            rounds=self.rounds, min_devices=self.min_devices, fraction=self.fraction,
            round_timeout=self.round_timeout, retry_after=self.retry_after, waiting_ttl=self.waiting_ttl,
            max_update_bytes=int(self.max_update_mb * (1 << 20)) if self.max_update_mb else None,
            norm_bound=self.norm_bound, seed=self.seed, target_devices=self.target_devices,
            over_select=self.over_select, max_examples=self.max_examples, choice_timeout=self.choice_timeout,
        )


_FIELDS = {f.name: f for f in fields(ServerConfig)}
# Path settings: relative paths in a config file are relative to it.
PATH_KEYS = ("model", "store", "port_file", "log_file", "tls_cert", "tls_key", "tls_client_ca", "enroll_token_file",
             "admin_token_file", "state_password_file")


def _coerce(key: str, value: Any) -> Any:
    """A flag or TOML value as the field's type; ConfigError naming the key when it is of another kind."""
    if value is None:
        return None
    if key in PATH_KEYS:
        if not isinstance(value, str | Path):
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        return Path(value)
    if key == "personalization_params" and isinstance(value, Mapping):  # a TOML table: {lam = 0.5, ...}
        return ",".join(f"{k}={v}" for k, v in value.items())
    if key == "personal_layers":
        if isinstance(value, str):
            return tuple(s.strip() for s in value.split(",") if s.strip())
        if not isinstance(value, list | tuple) or not all(isinstance(s, str) for s in value):
            raise ConfigError(f"{key}: expected a list of layer names or 'a,b', got {value!r}")
        return tuple(value)
    kind = _FIELDS[key].type
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if "int" in kind and "float" not in kind and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if "float" in kind:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if kind.startswith("str") and not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def load_config(flags: Mapping[str, Any], config_file: str | Path | None = None) -> ServerConfig:
    """Merge a TOML file (keys as the long flags, with '_' or '-') and flags (None = not given)."""
    merged: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        data = data.get("server", data)  # a [server] table or top-level keys
        for raw_key, value in data.items():
            key = raw_key.replace("-", "_")
            if key not in _FIELDS:
                raise ConfigError(f"{path}: unknown key {raw_key!r}; known: {sorted(_FIELDS)}")
            if key in PATH_KEYS and isinstance(value, str) and not Path(value).is_absolute():
                value = path.parent / value  # relative to the config file
            merged[key] = value
    merged.update({k: v for k, v in flags.items() if v is not None and k in _FIELDS})
    if "state_url" not in merged and os.environ.get(ENV_STATE_URL, "").strip():
        merged["state_url"] = os.environ[ENV_STATE_URL].strip()  # the environment is not argv: it may hold a password
    for key in ("model", "store"):
        if key not in merged:
            raise ConfigError(f"{key}: required (--{key} or in the --config file)")
    try:
        return ServerConfig(**{k: _coerce(k, v) for k, v in merged.items()})
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


def with_overrides(cfg: ServerConfig, **changes: Any) -> ServerConfig:
    return replace(cfg, **{k: _coerce(k, v) for k, v in changes.items()})
