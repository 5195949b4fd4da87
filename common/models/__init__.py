"""The model files shipped with fedpers (`<name>.ini`), found the same way in a checkout and an install."""

from __future__ import annotations

from pathlib import Path

DIR = Path(__file__).resolve().parent


def names() -> list[str]:
    """The shipped model files, e.g. ['digits_cnn.ini', ...]."""
    return sorted(p.name for p in DIR.glob("*.ini"))


def path(name: str) -> Path:
    """The path of a shipped model file by name (with or without `.ini`)."""
    file = name if name.endswith(".ini") else f"{name}.ini"
    p = DIR / file
    if not p.is_file():
        raise FileNotFoundError(f"no shipped model {name!r}; shipped: {', '.join(names())}")
    return p
