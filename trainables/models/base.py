"""The model contract shared by every family (docs/design.md, "Model contract").

``SequenceModel`` is what training, scoring, serving and the tests rely on; what a family
declares about itself (kinds, hyperparameters) and the named results it returns are in
:mod:`.contract`. ``MapModel``
adds what the HMM families and the GMM share: parameters with priors, estimated MAP by an
``AutoDelta`` guide that the module owns, so the learnable tensors are the module's
``parameters()`` and a checkpoint is its ``state_dict()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import pyro
import torch
from pyro import poutine
from pyro.distributions import Distribution
from pyro.infer import ELBO, Trace_ELBO
from pyro.infer.autoguide import AutoDelta
from pyro.nn import PyroModule
from torch.distributions import transform_to

from .contract import (
    DataKind,
    GaussianPosterior,
    Hyperparameters,
    Latent,
    LatentPath,
    Marginals,
    Observation,
    Samples,
    StatePath,
)


class SequenceModel(PyroModule):
    """Base of every family: validates its hyperparameters against the family's
    declaration and declares the contract.

    Sequence data is ``x`` ``(N, T, D)`` float with ``lengths`` ``(N,)`` int64; frames past a
    sequence's length are padding. Mixtures take points ``x`` ``(N, D)`` and no lengths.
    ``self.hparams`` is the validated :class:`~.contract.Hyperparameters` instance.
    """

    family: ClassVar[str]
    data_kind: ClassVar[DataKind] = "sequences"
    observation: ClassVar[Observation]
    latent: ClassVar[Latent]
    exact: ClassVar[bool] = True  # False where log_likelihood is a bound (DMM)
    # whether NaN values are missing values integrated out (.missing); False where a frame's
    # emission conditions on the previous frame's values (arhmm, nnhmm)
    missing_values: ClassVar[bool] = True
    hyperparameters: ClassVar[type[Hyperparameters]] = Hyperparameters

    def __init__(self, data_dim: int, hidden_dim: int, **hparams: Any) -> None:
        super().__init__()
        if data_dim < 1:
            raise ValueError(f"{self.family}: data_dim must be >= 1, got data_dim={data_dim}")
        self.hparams = self.hyperparameters.build(self.family, {"hidden_dim": hidden_dim, **hparams})
        self.data_dim = int(data_dim)
        self.hidden_dim = self.hparams.hidden_dim

    @property
    def config(self) -> dict[str, Any]:
        """Everything ``build_model`` needs to rebuild this model (JSON-serialisable)."""
        return {"family": self.family, "data_dim": self.data_dim, **self.hparams.model_dump()}

    @property
    def device(self) -> torch.device:
        return next(self.buffers(), next(self.parameters())).device

    def get_parameters(self) -> dict[str, torch.Tensor]:
        """The model's named parameters in their natural space (none by default)."""
        return {}

    def training_kwargs(self, epoch: int, num_epochs: int) -> dict[str, Any]:
        """Extra keyword arguments for ``model`` and ``guide`` after ``epoch`` completed
        epochs (0-based; e.g. KL annealing)."""
        return {}

    # The contract; each family implements these.
    def model(self, x: torch.Tensor, lengths: torch.Tensor | None, scale: float = 1.0):
        """Pyro model for SVI; ``scale`` weighs the data term (full size / batch size)."""
        raise NotImplementedError

    def guide(self, x: torch.Tensor, lengths: torch.Tensor | None, scale: float = 1.0):
        raise NotImplementedError

    def training_loss(
        self, x: torch.Tensor, lengths: torch.Tensor | None, scale: float = 1.0, **extra: Any
    ) -> torch.Tensor:
        """The differentiable loss of :meth:`elbo` for ``model`` and ``guide`` on a batch
        (``extra``: ``training_kwargs``). Pyro's per-site argument validation is off: data
        are checked at load and the trainer checks the loss."""
        with pyro.validation_enabled(False):
            return self.elbo().differentiable_loss(self.model, self.guide, x, lengths, scale=scale, **extra)

    def elbo(self) -> ELBO:
        """The training objective: ``Trace_ELBO`` (every term estimated by sampling)."""
        return Trace_ELBO()

    @classmethod
    def supports_em(cls) -> bool:
        """Whether ``train: {method: em}`` can train this family: MAP families with an
        M-step (:meth:`MapModel.em_step`)."""
        return False

    def log_likelihood(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``(N,)`` log p(x) in nats (a bound where ``exact`` is False)."""
        return self.log_likelihood_steps(x, lengths).sum(-1)

    def log_likelihood_steps(
        self, x: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(N, T)`` per-step increments log p(x_t | x_<t), zero at padding."""
        raise NotImplementedError

    def decode(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> StatePath | LatentPath:
        raise NotImplementedError

    def posterior(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> Marginals | GaussianPosterior:
        raise NotImplementedError

    def sample(self, num_sequences: int, length: int | None = None, seed: int = 0) -> Samples:
        raise NotImplementedError

    def relabel_problem(self) -> str | None:
        """Why this model's states cannot be renumbered (:meth:`MapModel.relabel`); None
        where they can."""
        return f"{self.family}: its latents are not labelled states"


class MapModel(SequenceModel):
    """A model whose parameters have priors and are point-estimated (MAP) by ``AutoDelta``.

    Subclasses define ``priors()`` (site name -> distribution whose event covers the whole
    tensor), ``init_parameters`` (a random initialisation, optionally informed by data) and
    ``log_likelihood_of(params, x, lengths)``, which must accept parameters with extra
    leading batch dimensions ``(R, ...)`` and return ``(R, N)``: that is what lets
    best-of-N screening score every initialisation in one batched pass.
    ``priors`` and ``init_parameters`` may only use the dims, ``hparams`` and ``_anchor``:
    the guide is set up at the end of ``MapModel.__init__``.
    """

    def __init__(self, data_dim: int, hidden_dim: int, **hparams: Any) -> None:
        super().__init__(data_dim, hidden_dim, **hparams)
        # dtype and device of the priors, moved by .to() / .double() with the module
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)
        self._setup_guide()
        #: the prior sites, once: building the priors to name them cost a scoring call 20%
        self.parameter_names = tuple(self.priors())

    def priors(self) -> dict[str, Distribution]:
        """Site name -> prior; build them on ``self._anchor``'s dtype and device."""
        raise NotImplementedError

    def init_parameters(
        self,
        x: torch.Tensor | None,
        lengths: torch.Tensor | None,
        generator: torch.Generator,
    ) -> dict[str, torch.Tensor]:
        """A random initialisation (data-informed when ``x`` is given) of every parameter."""
        raise NotImplementedError

    def log_likelihood_of(
        self,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        lengths: torch.Tensor | None,
    ) -> torch.Tensor:
        """``(..., N)`` log-likelihood under ``params`` with leading batch shape ``(...)``."""
        raise NotImplementedError

    def _setup_guide(self) -> None:
        generator = torch.Generator().manual_seed(0)
        values = self.init_parameters(None, None, generator)
        self.map_guide = AutoDelta(
            self._sample_parameters, init_loc_fn=lambda site: values[site["name"]]
        )
        with poutine.block(), torch.no_grad():
            self.map_guide()

    def _sample_parameters(self) -> dict[str, torch.Tensor]:
        return {name: pyro.sample(name, prior) for name, prior in self.priors().items()}

    def map_values(self) -> dict[str, torch.Tensor]:
        """The current MAP parameters, constrained and differentiable."""
        return {name: getattr(self.map_guide, name) for name in self.parameter_names}

    def get_parameters(self) -> dict[str, torch.Tensor]:
        """The current parameters as plain (detached) tensors, in probability space."""
        return {name: value.detach().clone() for name, value in self.map_values().items()}

    def shared_parameters(self) -> frozenset[str]:
        """The parameters no state (component) owns, e.g. a tied covariance; every other
        parameter's first axis indexes the states."""
        return frozenset()

    @torch.no_grad()
    def relabel(self, order: torch.Tensor) -> None:
        """Renumber the states (components): new state ``i`` is old state ``order[i]``.
        The first axis of every parameter but :meth:`shared_parameters` is reordered
        (``transition``'s second axis too); likelihoods do not change.

        :param order: ``(K,)`` a permutation of ``0..K-1``.
        """
        if (problem := self.relabel_problem()) is not None:
            raise ValueError(problem)
        order = torch.as_tensor(order, dtype=torch.long, device=self.device)
        if sorted(order.tolist()) != list(range(self.hidden_dim)):
            raise ValueError(f"{self.family}: a relabelling is a permutation of 0..{self.hidden_dim - 1}, got {order.tolist()}")
        values = {name: value[order] for name, value in self.map_values().items() if name not in self.shared_parameters()}
        if "transition" in values:
            values["transition"] = values["transition"][:, order]
        self.set_parameters(**values)

    def set_parameters(self, **values: torch.Tensor) -> None:
        """Overwrite some or all parameters in place (optimiser state stays attached)."""
        priors = self.priors()
        for name, value in values.items():
            if name not in priors:
                raise ValueError(
                    f"{self.family}: unknown parameter {name!r}; expected one of {sorted(priors)}"
                )
            current = getattr(self.map_guide, f"{name}_unconstrained")
            value = torch.as_tensor(value, dtype=current.dtype, device=current.device)
            if value.shape != current.shape:
                raise ValueError(
                    f"{self.family}: parameter {name!r} must have shape "
                    f"{tuple(current.shape)}, got {tuple(value.shape)}"
                )
            support = priors[name].support
            if not bool(support.check(value).all()):
                raise ValueError(f"{self.family}: parameter {name!r} is outside {support}")
            with torch.no_grad():
                current.copy_(transform_to(support).inv(value))

    def log_prior_of(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(...)`` log prior density of parameters with leading batch shape ``(...)``."""
        return sum(prior.log_prob(params[name]) for name, prior in self.priors().items())

    def model(self, x: torch.Tensor, lengths: torch.Tensor | None, scale: float = 1.0):
        params = self._sample_parameters()
        log_likelihood = self.log_likelihood_of(params, x, lengths).sum()
        pyro.factor("log_likelihood", scale * log_likelihood)

    def guide(self, x: torch.Tensor, lengths: torch.Tensor | None, scale: float = 1.0):
        return self.map_guide()

    def training_loss_of(
        self,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        lengths: torch.Tensor | None,
        scale: float = 1.0,
    ) -> torch.Tensor:
        """``(...)`` ``Trace_ELBO``'s loss for ``model`` and the ``AutoDelta`` guide, computed
        directly at parameters with leading batch shape ``(...)``: the guide's point masses
        have log density 0, so the loss is ``-(log prior + scale * log-likelihood)``, the
        same number and gradient without tracing the two programs (measured 1.4x faster
        per epoch). Argument validation is off, as in ``training_loss``: a diverged
        parameter gives a non-finite loss for the trainer to report, not a support error."""
        with pyro.validation_enabled(False):
            log_likelihood = self.log_likelihood_of(params, x, lengths).sum(-1)
            return -(self.log_prior_of(params) + scale * log_likelihood)

    def training_loss(
        self, x: torch.Tensor, lengths: torch.Tensor | None, scale: float = 1.0, **extra: Any
    ) -> torch.Tensor:
        return self.training_loss_of(self.map_values(), x, lengths, scale)

    def unconstrained(self) -> dict[str, torch.nn.Parameter]:
        """The guide's learnable tensors: every prior site's value in unconstrained space."""
        return {name: getattr(self.map_guide, f"{name}_unconstrained") for name in self.parameter_names}

    def constrain(self, unconstrained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Parameters from unconstrained tensors with any leading batch shape ``(...)``, by
        the transform the guide applies to its own."""
        return {name: transform_to(prior.support)(unconstrained[name]) for name, prior in self.priors().items()}

    def unconstrain(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`constrain`: unconstrained tensors of ``params``."""
        return {name: transform_to(prior.support).inv(params[name]) for name, prior in self.priors().items()}

    @classmethod
    def supports_em(cls) -> bool:
        return cls.em_step is not MapModel.em_step

    def em_step(
        self,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        lengths: torch.Tensor | None,
        improve: Callable[[Callable[[], torch.Tensor]], None] | None = None,
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One EM iteration from ``params`` (leading batch dims ``(R, ...)``: restarts) on
        the whole of ``x``: the new parameters, constrained, of the same shapes, that
        maximise the expected complete-data log-likelihood plus the log prior, and the
        log-likelihood ``(R..., N)`` under ``params`` (the E-step's by-product). A family
        with networks hands ``improve`` a loss function of them to take gradient steps on
        (generalised EM)."""
        raise NotImplementedError(f"{self.family}: EM is not available for this family; use train: {{method: svi}}")

    def network_parameters(self) -> list[torch.nn.Parameter]:
        """Learnable tensors outside the priors (a neural net's weights, estimated by
        maximum likelihood). Restarts stacked into one batched model would share them,
        so a family with any trains its restarts one model each."""
        sites = {id(value) for value in self.unconstrained().values()}
        return [p for p in self.parameters() if id(p) not in sites]
