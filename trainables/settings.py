"""The training settings, declared once: the sweep file's ``train`` section, the
``pyrosweep train`` flags and the trainer all read :class:`TrainSettings` (what a sweep
may set or search) and :class:`TrainConfig` (those plus what a trial's resources and
restarts decide)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .declared import Declared


class TrainSettings(Declared):
    """The settings of one training run; every one can be fixed or searched in a sweep."""

    method: Literal["svi", "em"] = Field(
        "svi", description="svi: minibatch gradient steps; em: full-batch MAP expectation-maximisation, "
        "an epoch being one iteration (every HMM family and gmm; nnhmm's network by gradient steps)")
    epochs: int = Field(100, ge=1, description="passes over the training split (em: most iterations)")
    tolerance: float = Field(1e-6, ge=0, description="em: stop once an iteration changes the objective by "
                             "less than this, relatively")
    network_steps: int = Field(5, ge=1, description="em for a family with a network (nnhmm): gradient steps "
                               "on its expected complete-data log-likelihood per iteration (generalised EM)")
    batch_size: int = Field(20, ge=1, description="sequences (points) per minibatch")
    lr: float = Field(0.01, gt=0, description="ClippedAdam learning rate")
    lr_decay: float = Field(1.0, gt=0, le=1, description="factor on the learning rate after every step")
    clip_norm: float = Field(10.0, gt=0, description="elementwise gradient clip")
    beta1: float = Field(0.9, ge=0, lt=1, description="Adam's first-moment decay")
    beta2: float = Field(0.999, ge=0, lt=1, description="Adam's second-moment decay")
    patience: int | None = Field(10, ge=1, description="epochs without a better valid NLL before stopping (none: never)")
    seed: int = Field(0, description="seed of the initialisation, minibatches and any sampling")


class TrainConfig(TrainSettings):
    """:class:`TrainSettings` plus what a sweep sets elsewhere (``restarts.screen``,
    ``resources.gpu``, ``resources.cpu``)."""

    screen: int = Field(1, ge=1, description="random initialisations screened, the best trained (best-of-N)")
    device: str = Field("cpu", description="cpu, cuda or cuda:N")
    # The engine's ops are small: more threads than cores (two trials, or another busy
    # process) made an epoch 400x slower here, so default to one.
    threads: int = Field(1, ge=1, description="CPU threads for torch")
