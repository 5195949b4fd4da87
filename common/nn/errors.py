"""Errors the trainer raises about what callers hand it, importable without loading the trainer
(device code checks data before it trains). ModelError lives in spec.py, BudgetError in budget.py."""

from __future__ import annotations


class WeightError(ValueError):
    """Weights given to a model do not match it (names or shapes); the message names them."""


class DataError(ValueError):
    """Data is missing, unreadable or does not fit the model (keys, shape, dtype, labels); the
    message names the file or array and what is wrong."""
