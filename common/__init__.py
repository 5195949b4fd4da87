"""fedpers: federated personalization for devices too small to train the usual way.

The package holds the device trainer (`fedpers.nn`), what device and server share (codecs, wire format,
stores, TLS), the device (`fedpers.client`) and the aggregation server (`fedpers.server`). The names below
are the library's front door; each loads its module on first use, so `import fedpers` stays light.
See docs/api.md.
"""

from __future__ import annotations

from importlib import import_module, metadata
from typing import Any

try:
    __version__ = metadata.version("fedpers")
except metadata.PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

_LAZY = {
    "Trainer": "fedpers.nn.trainer",
    "ModelSpec": "fedpers.nn.spec",
    "LayerSpec": "fedpers.nn.spec",
    "OptimizerSpec": "fedpers.nn.spec",
    "ModelError": "fedpers.nn.spec",
    "DataError": "fedpers.nn.errors",
    "load_ini": "fedpers.nn.ini",
    "parse_ini": "fedpers.nn.ini",
    "save_ini": "fedpers.nn.ini",
    "to_ini": "fedpers.nn.ini",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fedpers' has no attribute {name!r}")
    return getattr(import_module(module), name)
