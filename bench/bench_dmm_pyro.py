"""Our DMM against Pyro's ``examples/dmm.py`` on the same data: the same network sizes,
optimiser settings, KL annealing and number of epochs, both seeded; prints each side's
validation ELBO per frame after the last epoch (one sample, as Pyro's script evaluates)
and its seconds per epoch.

Pyro's script is not in the ``pyro-ppl`` package: pass its path (a Pyro checkout's
``examples/dmm.py``). It is run as it is, with three things given to it: our ``jsb``
splits in place of its download (``poly.load_data``), the sizes (its ``DMM`` takes them
as defaults) and its command-line options. It evaluates every 50 epochs, so epochs must
be at least 51. The learning rate is its default, 3e-4: at configs/dmm-jsb.yaml's 0.01 (and
at 1e-3) its ReLU inference RNN diverges within the first epoch (a transition scale of 0,
"Expected parameter scale ... found invalid values"), which is why ours is a tanh RNN
(trainables/models/dmm.py); so the two sides differ in that one nonlinearity.

    python bench/bench_dmm_pyro.py --pyro-dmm ~/pyro/examples/dmm.py [--epochs 51] [--key c]
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
import tempfile
import time
import types
from pathlib import Path

import pyro

from common import machine, setup_threads
from trainables.data import load_dataset
from trainables.models import build_model
from trainables.settings import TrainConfig
from trainables.svi import train

SIZES = {"hidden_dim": 16, "emission_dim": 32, "transition_dim": 64, "rnn_dim": 64}  # configs/dmm-jsb.yaml's
OPTIMISER = {"lr": 3e-4, "beta1": 0.9, "beta2": 0.999, "clip_norm": 10.0, "lr_decay": 1.0, "batch_size": 20}
ANNEALING = {"annealing_epochs": 3, "minimum_annealing_factor": 0.2}


def ours(data, epochs: int, seed: int) -> tuple[float, float]:
    """Our DMM trained ``epochs`` epochs: the validation ELBO per frame after the last
    (one particle: the bound Pyro's script reports) and seconds per epoch."""
    model = build_model("dmm", data_dim=data.data_dim, num_particles=1, **SIZES, **ANNEALING)
    result = train(model, data, TrainConfig(epochs=epochs, patience=None, seed=seed, **OPTIMISER))
    last = result.history[-1]
    return last.valid_nll, sum(record.epoch_s for record in result.history) / len(result.history)


def _without_torchvision(scratch: str) -> None:
    """Pyro's data loader imports ``pyro.contrib.examples.util`` for one function,
    ``get_data_directory``, and that module imports torchvision (for MNIST), which this
    project does not install: give the loader that one function, pointing at ``scratch``."""
    util = types.ModuleType("pyro.contrib.examples.util")
    util.get_data_directory = lambda _file=None: scratch
    sys.modules.setdefault("pyro.contrib.examples.util", util)


def pyros(path: Path, data, epochs: int, seed: int) -> tuple[float, float]:
    """Pyro's script on ``data`` with our settings: its validation figure at its last
    evaluation and seconds per epoch, read from its log."""
    scratch = tempfile.mkdtemp(prefix="pyro-dmm-")  # its data directory and log, kept for reading
    _without_torchvision(scratch)
    spec = importlib.util.spec_from_file_location("pyro_examples_dmm", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.poly.load_data = lambda _name: {
        name: {"sequences": split.x, "sequence_lengths": split.lengths} for name, split in data.splits.items()
    }
    defaults = list(script.DMM.__init__.__defaults__)  # input_dim, z_dim, emission_dim, transition_dim, rnn_dim, ...
    defaults[1:5] = [SIZES["hidden_dim"], SIZES["emission_dim"], SIZES["transition_dim"], SIZES["rnn_dim"]]
    script.DMM.__init__.__defaults__ = tuple(defaults)
    log = Path(scratch) / "dmm.log"
    options = argparse.Namespace(
        num_epochs=epochs, learning_rate=OPTIMISER["lr"], beta1=OPTIMISER["beta1"], beta2=OPTIMISER["beta2"],
        clip_norm=OPTIMISER["clip_norm"], lr_decay=OPTIMISER["lr_decay"], weight_decay=0.0,
        mini_batch_size=OPTIMISER["batch_size"], rnn_dropout_rate=0.0, num_iafs=0, iaf_dim=50,
        checkpoint_freq=0, load_opt="", load_model="", save_opt="", save_model="", cuda=False, jit=False,
        tmc=False, tmcelbo=False, tmc_num_samples=10, log=str(log), **ANNEALING,
    )  # fmt: skip
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    script.main(options)
    text = log.read_text()
    valid = float(re.findall(r"\[val/test epoch \d+\]\s+(\S+)", text)[-1])
    seconds = [float(value) for value in re.findall(r"dt = ([0-9.]+) sec", text)]
    return valid, sum(seconds) / len(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyro-dmm", type=Path, required=True, help="Pyro's examples/dmm.py")
    parser.add_argument("--epochs", type=int, default=51)
    parser.add_argument("--key", choices=["original", "c"], default="original")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=OPTIMISER["lr"])
    args = parser.parse_args()
    if args.epochs < 51:
        parser.error("Pyro's script evaluates every 50 epochs: --epochs 51 or more")
    OPTIMISER["lr"] = args.lr
    setup_threads()
    print(machine())
    data = load_dataset(name="jsb", key=args.key)
    print(f"jsb (key {args.key}), sizes {SIZES}, {OPTIMISER}, {ANNEALING}, {args.epochs} epochs, seed {args.seed}")
    started = time.perf_counter()
    our_valid, our_epoch = ours(data, args.epochs, args.seed)
    pyro_valid, pyro_epoch = pyros(args.pyro_dmm, data, args.epochs, args.seed)
    print(f"{'':>6}  {'valid -ELBO/frame':>18}  {'s/epoch':>8}")
    print(f"{'ours':>6}  {our_valid:18.4f}  {our_epoch:8.2f}")
    print(f"{'pyro':>6}  {pyro_valid:18.4f}  {pyro_epoch:8.2f}")
    print(f"difference (ours - Pyro's): {our_valid - pyro_valid:+.4f} nats per frame; {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
