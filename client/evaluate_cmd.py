"""`fedpers-client evaluate`: a model's loss and accuracy on a data file (model, weights and data
are found as `predict` finds them)."""

from __future__ import annotations

import argparse
import json
import sys

from .predict_cmd import ERRORS, add_model_args, inference_inputs, trainer_for


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate", help="print a model's loss and accuracy on a data file",
        description="Evaluate MODEL.ini with --weights (or a device's --state) on --data (DATA.npz: x_test/y_test "
                    "when present, else x/y; or an NNTrainer raw data file), or on the model's own [test_set].")
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object: loss, accuracy, examples, data")
    return p


def main(args: argparse.Namespace) -> int:
    try:
        inf = inference_inputs(args, labels=True)
        with trainer_for(inf) as trainer:
            result = trainer.evaluate(inf.x, inf.y, batch_size=args.batch)
    except ERRORS as e:
        print(f"fedpers-client evaluate: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"loss": result.loss, "accuracy": result.accuracy, "examples": result.examples,
                          "data": inf.data, "model": str(inf.model_path)}))
    else:
        print(f"loss {result.loss:.4f}  accuracy {result.accuracy:.4f}  examples {result.examples}  ({inf.data})")
    return 0
