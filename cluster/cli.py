"""The ``pyrosweep`` command line.

Errors a user can act on are printed as one line without a traceback (``--debug`` shows
it) and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

DEMO = {"model": "hmm", "data": "jsb", "hidden_dim": 16, "epochs": 30, "lr": 0.05, "screen": 10}


def project_home() -> Path:
    """Where pyrosweep keeps its runs and checkpoints: ``$PYROSWEEP_HOME`` or ``~/.pyrosweep``."""
    return Path(os.environ.get("PYROSWEEP_HOME", Path.home() / ".pyrosweep")).expanduser().absolute()


def _print_table(rows: list[dict], columns: list[str]) -> None:
    cells = [[_format(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def _format(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def cmd_data_list(args: argparse.Namespace) -> None:
    from trainables.data import DATASETS

    _print_table([{"name": k, "description": v} for k, v in DATASETS.items()], ["name", "description"])
    print("\nuser files: pass a path ending in .npz ({split}_x, {split}_len) or .pkl (JSB pickle)")


def _load(name: str, max_chorales: int | None = None):
    from trainables.data import load_dataset

    options = {"max_chorales": max_chorales} if max_chorales is not None else {}
    if Path(name).suffix:
        return load_dataset(path=name)
    return load_dataset(name, **options)


def cmd_data_prepare(args: argparse.Namespace) -> None:
    from trainables.data import dataset_summary

    dataset = _load(args.name, args.max_chorales)
    rows = dataset_summary(dataset)
    columns = ["split", *[c for c in rows[0] if c != "split"]]
    print(f"{dataset.name}: {dataset.data_dim} values per frame")
    _print_table(rows, columns)


def cmd_train(args: argparse.Namespace) -> None:
    from trainables.models import build_model
    from trainables.svi import TrainConfig, evaluate_nll, save_checkpoint, train

    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_decay=args.lr_decay,
        patience=args.patience,
        seed=args.seed,
        screen=args.screen,
        device=args.device,
    )
    dataset = _load(args.data, args.max_chorales)
    model = build_model(args.model, data_dim=dataset.data_dim, hidden_dim=args.hidden_dim)
    print(f"training {args.model} (hidden_dim={args.hidden_dim}) on {dataset.name}: "
          f"{config.epochs} epochs, batch {config.batch_size}, lr {config.lr}, best of {config.screen} inits")

    def report(record, _model) -> None:
        print(f"epoch {record.epoch:3d}  train loss {record.train_loss:.4f}  "
              f"valid NLL {record.valid_nll:.4f}  ({record.epoch_s:.2f} s)", flush=True)

    result = train(model, dataset, config, on_epoch=report)
    bound = "" if model.exact else " (an upper bound: the model's likelihood is an IWAE bound)"
    print(f"\nbest epoch {result.best_epoch}; NLL in nats per frame{bound}:")
    rows = [
        {"split": "train", "nll": evaluate_nll(model, dataset.splits["train"])},
        {"split": "valid", "nll": result.best_valid_nll},
        {"split": "test", "nll": result.test_nll},
    ]
    _print_table(rows, ["split", "nll"])
    seconds = [r.epoch_s for r in result.history]
    print(f"mean seconds per epoch: {sum(seconds) / len(seconds):.3f}")
    out = Path(args.out) if args.out else project_home() / "checkpoints" / f"{args.model}-{Path(args.data).stem}"
    save_checkpoint(model, out, data=args.data, train=vars(config), test_nll=result.test_nll)
    print(f"checkpoint: {out}")


def _add_train_arguments(parser: argparse.ArgumentParser, defaults: dict) -> None:
    parser.add_argument("--model", default=defaults.get("model", "hmm"), help="model family")
    parser.add_argument("--data", default=defaults.get("data", "jsb"), help="data set name or file path")
    parser.add_argument("--hidden-dim", type=int, default=defaults.get("hidden_dim", 16))
    parser.add_argument("--epochs", type=int, default=defaults.get("epochs", 30))
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--lr", type=float, default=defaults.get("lr", 0.05))
    parser.add_argument("--lr-decay", type=float, default=1.0, help="per-step learning-rate factor")
    parser.add_argument("--patience", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--screen", type=int, default=defaults.get("screen", 1),
                        help="initialisations screened, best kept (best-of-N)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--max-chorales", type=int, default=None, help="jsb: parse only this many files")
    parser.add_argument("--out", default=None, help="checkpoint directory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyrosweep", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="list and prepare data sets")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    data_commands.add_parser("list", help="the built-in data sets").set_defaults(run=cmd_data_list)
    prepare = data_commands.add_parser("prepare", help="load (and cache) a data set, print its splits")
    prepare.add_argument("name", help="data set name or file path")
    prepare.add_argument("--max-chorales", type=int, default=None)
    prepare.set_defaults(run=cmd_data_prepare)

    train = commands.add_parser("train", help="train one model and print its NLL per frame")
    _add_train_arguments(train, {})
    train.set_defaults(run=cmd_train)

    demo = commands.add_parser("demo", help=f"the main job on embedded defaults: {DEMO}")
    _add_train_arguments(demo, DEMO)
    demo.set_defaults(run=cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, RuntimeError, FileNotFoundError, FloatingPointError) as error:
        if args.debug:
            raise
        print(f"pyrosweep: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
