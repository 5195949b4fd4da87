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
