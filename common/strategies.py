"""The server strategies by name, with a line of help each: one list for the server's registry and every CLI.

`fedpers.server.aggregate.OPTIMIZERS` maps the same names to classes (a test checks they agree);
the simulator and the device-side tools read the names from here without importing the server.
"""

from __future__ import annotations

STRATEGIES: dict[str, str] = {
    "fedavg": "the example-weighted mean delta, applied with the server learning rate (default 1.0)",
    "fedavgm": "FedAvg with server momentum 0.9 (Hsu et al. 2019; default server lr 1.0)",
    "fedadam": "Adam on the server with bias correction (Reddi et al. 2021; default server lr 0.01)",
}


def help_text() -> str:
    """'name: what it does' for argparse help."""
    return "; ".join(f"{name}: {text}" for name, text in STRATEGIES.items())


# How the round's deltas are combined (server/robust.py), by name, with the help text of every CLI.
AGGREGATORS: dict[str, str] = {
    "mean": "example-weighted mean (with --clip-norm: each delta clipped first); memory O(model)",
    "normbounded": "norm-bounded mean: each delta clipped to --clip-norm, then the weighted mean; memory O(model)",
    "trimmed": "coordinate-wise trimmed mean (drops the --trim fraction at each end; ignores example counts); "
               "memory O(devices x model), bounded by --robust-memory-mb",
    "median": "coordinate-wise median (ignores example counts); memory O(devices x model), bounded by "
              "--robust-memory-mb",
}
