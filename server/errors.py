"""The refusals the server can give, by kind; server/service.py maps each kind to one gRPC status."""

from __future__ import annotations


class FederationError(Exception):
    """Base of every refusal a device can receive; the message names the problem."""


class BadToken(FederationError):
    """Missing or wrong device id / session token / device secret / admin token, or wrong enrollment
    token (UNAUTHENTICATED)."""


class StaleRound(FederationError):
    """The update or request does not belong to the open round (FAILED_PRECONDITION)."""


class NotSelected(StaleRound):
    """The device is not selected for the open round."""


class StaleBase(StaleRound):
    """The update was trained from another base version than the round's."""


class AlreadyReported(StaleRound):
    """The device already has an accepted update in this round."""


class LateUpdate(StaleRound):
    """The update names a round the device was selected for that has already closed (counted in status)."""


class BadUpdate(FederationError, ValueError):
    """The update's content is wrong: tensor names, shapes, dtype, non-finite values, norm (INVALID_ARGUMENT)."""


class LocalTensor(BadUpdate):
    """The update carries a tensor that stays on the device under the federation's personalization method
    (or its personal layers); the server never accepts one (INVALID_ARGUMENT)."""


class NotFinished(StaleRound):
    """A request for after the federation (the choice exchange) came before it finished, or names another
    final version (FAILED_PRECONDITION)."""


class UnknownVersion(FederationError, LookupError):
    """The requested model version does not exist (NOT_FOUND)."""


class ShuttingDown(FederationError):
    """The server is stopping and takes no more work (UNAVAILABLE)."""


class RetryLater(FederationError):
    """A refusal that retrying after `retry_after` seconds can cure; the hint travels in the trailing
    metadata (x-fedpers-retry-after) and the agent waits at least that long."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Busy(RetryLater):
    """Every upload slot is taken; the device should retry shortly (UNAVAILABLE)."""


# ---------------------------------------------------------------- identity (server/identity.py)


class Revoked(FederationError):
    """The device was revoked by an operator; it can never join again (PERMISSION_DENIED)."""


class EnrollmentClosed(FederationError):
    """The server takes no new devices: no enrollment token is configured (PERMISSION_DENIED)."""


class NameTaken(FederationError):
    """Another enrolled device has this name; names never yield an existing identity (ALREADY_EXISTS)."""


class TooManyDevices(FederationError):
    """The cap on enrolled devices (--max-devices) is reached (RESOURCE_EXHAUSTED)."""


# ---------------------------------------------------------------- limits (server/limits.py)


class RateLimited(RetryLater):
    """The caller exceeded its call rate for this method (RESOURCE_EXHAUSTED, with a retry hint)."""


class TooManyStreams(RetryLater):
    """The device already has its maximum of uploads/downloads open (RESOURCE_EXHAUSTED, with a retry hint)."""


class StreamCut(FederationError):
    """An upload stream ended early: cancelled by the device, the connection lost, or cut by the server
    for sending nothing or too slowly (CANCELLED; logged at INFO, not an error of the server)."""
