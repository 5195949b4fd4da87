"""The personalization benchmark's --quick mode runs every scenario and method end to end."""

import json
import subprocess
import sys
from pathlib import Path

from fedpers.client.methods import pick
from fedpers.client.scenarios import SCENARIOS
from fedpers.personalization import CANDIDATES, METHODS

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_prints_the_table_and_writes_every_run(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "personalization.py"), "--quick", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "no gRPC" in text and "fedpers.server.aggregate" in text
    for label in ("FedAvg", "FedAvg+FT", "FedProx", "FedPer", "FedRep", "Ditto", "FedBN", "choice", "local-only"):
        assert f" {label} " in text, label
    for name in SCENARIOS:
        assert f"{name}: best personalized" in text
    report = json.loads(out.read_text())
    assert {r["scenario"] for r in report["results"]} == set(SCENARIOS)
    for res in report["results"]:
        assert set(res["runs"]) == set(METHODS) and res["choice_over"] in METHODS
        n = len(res["examples"])
        assert all(len(v) == n for v in res["references"].values())
        for method, run in res["runs"].items():
            assert len(run["devices"]) == n and run["hyperparams"]["method"] == method
            assert run["default"] in (METHODS[method].serves, "local_only")
            for dev in run["devices"]:
                assert set(dev["accuracy"]) == {*METHODS[method].candidates, "local_only", "choice"}
                assert set(dev["accuracy"]) <= {*CANDIDATES, "choice"}
                assert dev["picked"] in dev["accuracy"] and dev["accuracy"]["choice"] == dev["accuracy"][dev["picked"]]
                assert dev["picked"] == pick(dev["val_accuracy"], dev["val_loss"], dev["val_examples"],
                                             own=run["default"])  # the rule, replayed from the report
                assert all(0.0 <= a <= 1.0 for a in dev["accuracy"].values())
    rows = {(r["scenario"], r["label"]) for r in report["rows"]}
    assert ("iid", "pooled+prior") in rows and ("scarce", "choice") in rows
