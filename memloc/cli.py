"""``memloc`` command line: ``memloc train``, ``memloc summary``, ``memloc investigate``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _kv(items: list[str] | None) -> dict:
    """Parse ``key=value`` pairs; values are read as JSON when they parse (numbers, lists), else as strings."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"memloc: expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def _add_train_args(p: argparse.ArgumentParser, default_out: str | None) -> None:
    from .train import TrainConfig

    d = TrainConfig()
    p.add_argument("--dataset", default=d.dataset, help="mnist1d | digits | cifar10 (default %(default)s)")
    p.add_argument("--data-arg", action="append", metavar="KEY=VALUE",
                   help="dataset argument, repeatable (e.g. num_samples=2000, root=data/, images=true)")
    p.add_argument("--noise", type=float, default=d.noise, help="fraction of flipped training labels (%(default)s)")
    p.add_argument("--model", default=d.model, help="mlp | cnn1d | cnn2d | resnet9 (default %(default)s)")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                   help="model argument, repeatable (e.g. hidden=[512,512], width=0.5)")
    p.add_argument("--optimizer", default=d.optimizer, help="sgd | adam | adamw (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--schedule", default=d.schedule, help="constant | cosine | triangle | step")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--epochs", type=int, default=d.epochs, help="maximum epochs (%(default)s)")
    p.add_argument("--stop-at", type=float, default=d.stop_at_train_acc,
                   help="stop once train accuracy (noisy labels included) reaches this; 0 = train all epochs")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", default=default_out, required=default_out is None, help="run folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _train_from_args(a: argparse.Namespace):
    import torch

    from .train import format_summary, train

    if a.threads:
        torch.set_num_threads(a.threads)
    run = train(
        {"dataset": a.dataset, "dataset_kwargs": _kv(a.data_arg), "noise": a.noise, "model": a.model,
         "model_kwargs": _kv(a.model_arg), "optimizer": a.optimizer, "lr": a.lr, "weight_decay": a.weight_decay,
         "schedule": a.schedule, "batch_size": a.batch_size, "epochs": a.epochs,
         "stop_at_train_acc": a.stop_at or None, "seed": a.seed},
        a.out, overwrite=a.overwrite, progress=not a.quiet)
    print(format_summary(run.summary, run.path))
    return run


def _investigate(a: argparse.Namespace) -> None:
    """Train the testbed into OUT/run, then write OUT/summary.txt and OUT/learning_curves.png.

    Later issues grow this into the full investigation (scores, localisation, probes, an HTML page).
    Re-running into the same folder resumes the run instead of starting over.
    """
    from .analyses.plots import plot_learning_curves
    from .results import atomic_path
    from .train import format_summary

    report = Path(a.out)
    a.out = str(report / "run")
    run = _train_from_args(a)
    text = format_summary(run.summary, run.path)
    with atomic_path(report / "summary.txt") as tmp:
        tmp.write_text(text + "\n")
    c = run.config
    fig = plot_learning_curves(run.dynamics, run.examples,
                               title=f"{c.model} on {c.dataset}, {c.noise:.0%} flipped labels, seed {c.seed}")
    with atomic_path(report / "learning_curves.png") as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    print(f"report: {report}/ (summary.txt, learning_curves.png, run/)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="memloc", description="Locate memorization in neural networks.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model on noisy labels, with checkpoints and per-example dynamics")
    _add_train_args(p, default_out=None)

    p = sub.add_parser("investigate", help="the main job: train the default memorization testbed and report")
    _add_train_args(p, default_out="reports/default")

    p = sub.add_parser("summary", help="print the summary of a run folder")
    p.add_argument("run")
    p.add_argument("--json", action="store_true", help="print summary.json as is")

    a = parser.parse_args(argv)
    try:
        if a.command == "train":
            _train_from_args(a)
        elif a.command == "investigate":
            _investigate(a)
        elif a.command == "summary":
            from .train import Run, format_summary

            run = Run(a.run)
            if run.summary is None:
                print(f"{run!r}: not finished; rerun the same `memloc train` command to resume it.")
                return 1
            print(json.dumps(run.summary, indent=2) if a.json else format_summary(run.summary, run.path))
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as e:
        print(f"memloc: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
