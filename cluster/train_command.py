"""``pyrosweep train``: train one model in this process and print its NLL per split.

Its flags come from the declarations: one per training setting
(:class:`trainables.settings.TrainConfig`) and one per hyperparameter of any registered
family (:mod:`trainables.models.contract`), with the declared types, choices, defaults and
descriptions. A flag left out takes the declared default.
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic.fields import FieldInfo

from .console import print_table
from .data_arguments import add_data_arguments, data_options
from .home import project_home

MODEL_FLAGS = "model hyperparameters (those of the --model family; see the list below)"


def _converter(annotation: Any) -> tuple[Any, list[str] | None]:
    """The argparse ``type`` and ``choices`` of a declared field's annotation."""
    if typing.get_origin(annotation) is Literal:
        return str, list(typing.get_args(annotation))
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if args and len(args) < len(typing.get_args(annotation)):  # X | None
        inner = args[0]
        return (lambda text: None if text.lower() == "none" else inner(text)), None
    return annotation, None


def _add_flag(group: argparse._ArgumentGroup, name: str, field: FieldInfo, default: str, note: str = "") -> None:
    kind, choices = _converter(field.annotation)
    group.add_argument(
        f"--{name.replace('_', '-')}",
        dest=name,
        type=kind,
        choices=choices,
        default=argparse.SUPPRESS,
        help=f"{field.description or name} (default: {default}){note}",
    )


def _family_epilog(families: dict[str, Any]) -> str:
    """One line per family: its hyperparameters with their defaults."""
    lines = ["hyperparameters of each --model family (flag default):"]
    for family, cls in sorted(families.items()):
        fields = cls.hyperparameters.model_fields
        listed = ", ".join(f"--{name.replace('_', '-')} {field.default}" for name, field in fields.items())
        lines.append(f"  {family}: {listed}")
    return "\n".join(lines)


def add_train_arguments(parser: argparse.ArgumentParser, with_families: bool) -> None:
    """The flags of ``pyrosweep train``; the family hyperparameters only ``with_families``
    (building them imports every model: seconds that other commands should not pay)."""
    parser.add_argument("--model", default="hmm", help="model family")
    parser.add_argument("--data", default="jsb", help="data set name or file path")
    parser.add_argument("--out", default=None, help="checkpoint directory")
    add_data_arguments(parser)
    if not with_families:
        return
    from trainables.models import FAMILIES
    from trainables.settings import TrainConfig

    settings = parser.add_argument_group("training settings")
    for name, field in TrainConfig.model_fields.items():
        _add_flag(settings, name, field, field.default)
    declared: dict[str, dict[str, FieldInfo]] = {}
    for family, cls in FAMILIES.items():
        for name, field in cls.hyperparameters.model_fields.items():
            declared.setdefault(name, {})[family] = field
    group = parser.add_argument_group(MODEL_FLAGS)
    for name, by_family in declared.items():
        field, *_ = by_family.values()
        defaults = {str(f.default) for f in by_family.values()}
        default = defaults.pop() if len(defaults) == 1 else "per family, below"
        note = "" if len(by_family) == len(FAMILIES) else f"; {', '.join(by_family)}"
        _add_flag(group, name, field, default, note)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _family_epilog(FAMILIES)


def _given(args: argparse.Namespace, names: typing.Iterable[str]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def cmd_train(args: argparse.Namespace) -> None:
    """Train ``args.model`` on ``args.data`` and write its checkpoint."""
    from trainables.checkpoint import save_checkpoint
    from trainables.data import load_argument
    from trainables.models import FAMILIES, family_class
    from trainables.settings import TrainConfig
    from trainables.svi import engine_path, evaluate_nll, resolve_device, train

    declaration = family_class(args.model).hyperparameters
    every_hparam = {name for cls in FAMILIES.values() for name in cls.hyperparameters.model_fields}
    foreign = sorted(set(_given(args, every_hparam)) - set(declaration.model_fields))
    if foreign:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in foreign)
        raise ValueError(f"{flags}: not a hyperparameter of {args.model} (its own: {', '.join(declaration.model_fields)})")
    hparams = declaration.build(args.model, _given(args, declaration.model_fields)).model_dump()
    config = TrainConfig.build("pyrosweep train", _given(args, TrainConfig.model_fields))
    dataset = load_argument(args.data, **data_options(args))
    model = family_class(args.model)(dataset.data_dim, **hparams)
    shown = ", ".join(f"{key}={value}" for key, value in _given(args, declaration.model_fields).items())
    path = engine_path(model, dataset.splits["train"], resolve_device(config.device))
    if config.method == "em":
        method = f"EM, at most {config.epochs} iterations (tolerance {config.tolerance})"
    else:
        method = f"{config.epochs} epochs, batch {config.batch_size}, lr {config.lr}"
    print(f"training {args.model} ({shown or 'declared defaults'}) on {dataset.name}: "
          f"{method}, best of {config.screen} inits" + (f", engine {path}" if path else ""))
    step = "iteration" if config.method == "em" else "epoch"

    def report(record, _model) -> None:
        print(f"{step} {record.epoch:3d}  train loss {record.train_loss:.4f}  "
              f"valid NLL {record.valid_nll:.4f}  ({record.epoch_s:.2f} s)", flush=True)

    result = train(model, dataset, config, on_epoch=report)
    bound = "" if model.exact else " (an upper bound: the model's likelihood is an IWAE bound)"
    print(f"\nbest epoch {result.best_epoch}; NLL in nats per frame{bound}:")
    rows = [
        {"split": "train", "nll": evaluate_nll(model, dataset.splits["train"])},
        {"split": "valid", "nll": result.best_valid_nll},
        {"split": "test", "nll": result.test_nll},
    ]
    print_table(rows, ["split", "nll"])
    seconds = [r.epoch_s for r in result.history]
    print(f"mean seconds per epoch: {sum(seconds) / len(seconds):.3f}")
    out = Path(args.out) if args.out else project_home() / "checkpoints" / f"{args.model}-{Path(args.data).stem}"
    save_checkpoint(model, out, data=args.data, train=config.model_dump(), test_nll=result.test_nll)
    print(f"checkpoint: {out}")
