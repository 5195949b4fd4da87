"""`fedpers-client train`: train a model locally on a DATA.npz, no server needed."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from fedpers.argtypes import positive_float, positive_int, share
from fedpers.nn import BudgetError, ModelError, Trainer, WeightError, load_ini, output_size, rss, warmup
from fedpers.nn.budget import format_size
from fedpers.nn.modes import (
    DEFAULT_KERNELS,
    DEFAULT_MEMORY_MODE,
    KERNEL_BACKENDS,
    MEMORY_MODES,
    kernel_backends_help,
    memory_modes_help,
)

from .data import HOLDOUT_FRACTION, DataError, check_against_model, load_data, load_model_data
from .progress import ProgressBar

log = logging.getLogger(__name__)


def add_memory_args(p: argparse.ArgumentParser, swap_dir_default: str = "a temp dir") -> None:
    """The trainer's memory flags, shared by train and run."""
    p.add_argument("--memory", choices=MEMORY_MODES, default=DEFAULT_MEMORY_MODE,
                   help=memory_modes_help(DEFAULT_MEMORY_MODE))
    p.add_argument("--lookahead", type=positive_int, default=2, metavar="K",
                   help="swap mode: read tensors back K steps before use (default 2)")
    p.add_argument("--micro-batch", type=positive_int, default=1, metavar="M",
                   help="run each batch as M micro-batches with gradient accumulation (default 1)")
    p.add_argument("--swap-dir", default=None, metavar="DIR",
                   help=f"where the swap file lives (default: {swap_dir_default}; unlinked once opened)")
    p.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="e.g. 96MiB, the whole process's peak RSS: pick the fastest plan (kernels, mode, lookahead, "
                        "micro-batch) predicted to stay under it, or stop before training naming the smallest")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train a model locally on DATA.npz",
                              description="Train MODEL.ini on DATA.npz on this machine, without a server.")
    p.add_argument("model", type=Path, metavar="MODEL.ini", help="NNTrainer-style model file")
    p.add_argument("--data", type=Path, metavar="DATA.npz",
                   help="x float32 (N,C,H,W) or (N,F), y integer labels (N,); optional x_test, y_test "
                        "(default: the model's [train_set] / [DataSet] files, NNTrainer's raw format)")
    p.add_argument("--epochs", type=positive_int, default=None, metavar="N", help="override [Model] Epochs")
    p.add_argument("--batch", type=positive_int, default=None, metavar="B", help="override [Model] batch_size")
    p.add_argument("--lr", type=positive_float, default=None, metavar="X", help="override the learning rate")
    p.add_argument("--init-weights", type=Path, default=None, metavar="W.npz", help="start from these weights")
    p.add_argument("--save-weights", type=Path, default=None, metavar="OUT.npz",
                   help="write trained weights here (default: [Model] Save_Path, if the model names one)")
    p.add_argument("--holdout", type=share, default=HOLDOUT_FRACTION, metavar="F",
                   help=f"without x_test/y_test in the data file, hold out this seeded fraction of the examples "
                        f"as the test split (default {HOLDOUT_FRACTION}); said on stderr when it happens")
    p.add_argument("--drop-last", action="store_true",
                   help="drop each epoch's last partial batch (default: train it, filled up from the epoch's start)")
    p.add_argument("--no-shuffle", action="store_true", help="keep batch order (reproducible runs)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed for init, shuffling, dropout")
    p.add_argument("--json", action="store_true", help="print one JSON object with the results at the end")
    add_memory_args(p)
    p.add_argument("--kernels", choices=KERNEL_BACKENDS, default=None,
                   help=kernel_backends_help(DEFAULT_KERNELS))
    return p


def main(args: argparse.Namespace) -> int:
    try:
        spec = load_ini(args.model)
        for note in spec.notes:
            print(f"note: {note}", file=sys.stderr)
        if args.data is not None:
            data = load_data(args.data, holdout=args.holdout)
        else:
            data = load_model_data(spec, args.model, holdout=args.holdout)
        if data.held_out_by_device:
            print(f"{args.data or args.model} has no test split: holding out {args.holdout:.0%} "
                  f"({data.y_test.size} examples) as the test split (--holdout)", file=sys.stderr)
        check_against_model(data, spec.layers[0].input_shape, output_size(spec) if spec.loss == "cross" else None,
                            str(args.data or args.model))
        trainer = Trainer(spec, memory=args.memory, memory_budget=args.memory_budget, lookahead=args.lookahead,
                          micro_batch=args.micro_batch, swap_dir=args.swap_dir, seed=args.seed, kernels=args.kernels)
        batch = min(args.batch or spec.batch_size, data.num_examples)
        if args.memory_budget is not None:  # choose the plan first: the warm-up runs in it, within the budget
            trainer.compile(batch)
            print(f"memory budget {args.memory_budget}: {trainer.choice.describe()}", file=sys.stderr)
        mode = trainer.choice.mode if trainer.choice is not None else args.memory
        warmup(spec, kernels=trainer.kernels, memory=mode)
        rss.mark_baseline()
        if args.init_weights:
            trainer.load_weights(str(args.init_weights))
        trainer.compile(batch)
        result = trainer.fit(data.x, data.y, epochs=args.epochs, batch_size=batch, shuffle=not args.no_shuffle,
                             seed=args.seed, learning_rate=args.lr, progress=ProgressBar(), drop_last=args.drop_last)
        report = trainer.memory_report()
        test = trainer.evaluate(data.x_test, data.y_test) if data.x_test is not None else None
        save_to = args.save_weights or spec.save_path
        if save_to:
            trainer.save_weights(str(save_to))
    except (ModelError, DataError, WeightError, BudgetError, FileNotFoundError, ValueError) as e:
        print(f"fedpers-client train: {e}", file=sys.stderr)
        return 2
    out = {
        "loss": result.loss, "accuracy": result.accuracy, "steps": result.steps,
        "step_seconds": result.step_seconds, "epochs": result.epochs, "memory": report.to_dict(),
    }
    if test is not None:
        out["test_loss"], out["test_accuracy"] = test.loss, test.accuracy
    if args.json:
        print(json.dumps(out))
    else:
        print(f"loss {result.loss:.4f}  accuracy {result.accuracy:.4f}  steps {result.steps}  "
              f"median step {result.step_seconds * 1e3:.2f} ms")
        if test is not None:
            print(f"test loss {test.loss:.4f}  test accuracy {test.accuracy:.4f}")
        print(f"memory ({report.mode}): arena {format_size(report.arena_bytes)}, lower bound "
              f"{format_size(report.lower_bound_bytes)}, naive {format_size(report.naive_bytes)}, "
              f"rss growth {format_size(max(0, (report.rss_peak_bytes or 0) - (report.rss_baseline_bytes or 0)))}")
    return 0
