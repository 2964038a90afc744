"""What every HMM-like family shares: the contract, implemented once on the exact engine.

A family only says how its parameters become the three factors of
:mod:`trainables.inference` over its state space of size ``S`` (a product space for
factorial and second-order chains) and how to sample its emissions; training, scoring,
decoding, posteriors and sampling all go through the same engine.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from .. import inference
from . import em
from .base import MapModel
from .contract import Hyperparameters, Marginals, Samples, StatePath
from .parts import flat_dirichlet, safe_log, sticky_dirichlet, sticky_simplex, uniform_simplex
from .topology import MaskedDirichlet, chain_masks, load_mask


class ChainHyperparameters(Hyperparameters):
    """The chain priors every HMM family shares, and the chain's topology (its structural
    zeros, :mod:`.topology`). A ``transition_mask`` given as a file path is read at
    validation, so the validated value (hence ``config``, checkpoints and ``/v1/model``)
    holds the K x K 0/1 lists themselves."""

    #: whether the family's chain is the single ``initial`` / ``transition`` a topology constrains
    single_chain: ClassVar[bool] = True

    prior_sticky: float = Field(0.9, gt=0, description="extra Dirichlet weight on staying in a state")
    prior_smooth: float = Field(0.1, gt=0, description="Dirichlet weight on every transition")
    prior_initial: float = Field(1.0, gt=0, description="flat Dirichlet weight of initial distributions")
    topology: Literal["ergodic", "left-right", "banded"] = Field(
        "ergodic",
        description="allowed transitions: any (ergodic); j - i in [0, bandwidth] starting in state 0 "
        "(left-right); |j - i| <= bandwidth (banded); the others are exactly 0",
    )
    bandwidth: int = Field(
        1, ge=1, description="widest allowed step of left-right and banded (hidden_dim - 1 or more: any); ergodic ignores it"
    )
    transition_mask: str | list[list[Literal[0, 1]]] | None = Field(
        None,
        description="K x K 0/1 allowed transitions (a .npy, .txt or .csv file, read at validation); "
        "replaces topology, any first state",
    )

    @model_validator(mode="before")
    @classmethod
    def _read_mask_file(cls, values: Any) -> Any:
        if isinstance(values, dict) and isinstance(values.get("transition_mask"), str):
            return {**values, "transition_mask": load_mask(values["transition_mask"])}
        return values

    @model_validator(mode="after")
    def _check_topology(self) -> ChainHyperparameters:
        constrained = self.topology != "ergodic" or self.transition_mask is not None
        if constrained and not self.single_chain:
            raise ValueError(
                "topology and transition_mask constrain a single initial/transition chain; "
                "this family's chain is a product or second-order chain: leave topology ergodic"
            )
        self.chain_masks()
        return self

    def chain_masks(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The allowed first states ``(K,)`` and transitions ``(K, K)`` (bool), ``None``
        for an ergodic chain (:func:`.topology.chain_masks`)."""
        return chain_masks(self.topology, self.bandwidth, self.transition_mask, self.hidden_dim)


class HMMFamily(MapModel):
    """Base of the HMM families, with the chain priors they share: a sticky
    ``Dirichlet(prior_sticky * I + prior_smooth)`` on every transition row (Pyro's
    ``examples/hmm.py``) and a flat ``Dirichlet(prior_initial)`` on initial distributions.
    Subclasses implement ``chain_factors``,
    ``emission_log_probs`` and ``sample_emissions``; product-space families may override
    ``output_states`` / ``output_marginals`` to report in the user's state space, and
    ``state_labels`` / ``state_space`` to name the engine's states in pictures."""

    latent = "states"
    hyperparameters = ChainHyperparameters
    #: how the engine's states read in pictures
    state_space: ClassVar[str] = "states"
    #: how many earlier frames a frame's emission reads (0, or 1: the previous frame, all
    #: zeros before the first): what a stream filtered chunk by chunk carries over
    emission_context: ClassVar[int] = 0

    def _transition_prior(self, num_states: int, *batch: int):
        """Sticky Dirichlet on the rows of ``(*batch, K, K)`` transition probabilities,
        over the allowed entries of a constrained topology (:class:`.topology.MaskedDirichlet`)."""
        prior = sticky_dirichlet(
            num_states, self.hparams.prior_sticky, self.hparams.prior_smooth, self._anchor
        )
        masks = self._masks()
        if masks is not None:
            prior = MaskedDirichlet(em.base(prior).concentration, masks[1]).to_event(1)
        return prior.expand_by(batch).to_event(len(batch)) if batch else prior

    def _initial_prior(self, *shape: int):
        """Flat ``Dirichlet(prior_initial)`` on initial distributions of ``shape``, over
        the allowed first states of a constrained topology."""
        prior = flat_dirichlet(shape, self.hparams.prior_initial, self._anchor)
        masks = self._masks()
        if masks is not None and not bool(masks[0].all()):
            prior = MaskedDirichlet(em.base(prior).concentration, masks[0])
        return prior

    @cached_property
    def _chain_masks(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``hparams.chain_masks()``, built and checked once: ``priors()`` runs every step."""
        return self.hparams.chain_masks()

    def _masks(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The chain's allowed first states ``(K,)`` and transitions ``(K, K)`` as bool
        tensors on the priors' device, ``None`` for an ergodic chain."""
        masks = self._chain_masks
        return None if masks is None else tuple(torch.as_tensor(m, device=self._anchor.device) for m in masks)

    def chain_init(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """A random ``initial`` ``(K,)`` (uniform on the simplex) and ``transition``
        ``(K, K)`` (leaning towards staying), renormalised over the allowed entries of a
        constrained topology."""
        K = self.hidden_dim
        params = {"initial": uniform_simplex((K,), generator), "transition": sticky_simplex((K, K), generator)}
        masks = self._chain_masks
        if masks is None:
            return params
        return {name: _renormalised(params[name], torch.from_numpy(mask)) for name, mask in zip(params, masks)}

    # Hooks for the families. ``params`` may carry leading batch dims (...).
    def chain_factors(self, params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``log_init`` ``(..., S)`` and ``log_trans`` ``(..., S, S)``; by default from the
        single chain's ``initial`` and ``transition``."""
        return safe_log(params["initial"]), safe_log(params["transition"])

    def emission_log_probs(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``(..., N, T, S)`` log p(x_t | state, earlier frames) for ``x`` ``(N, T, D)``."""
        raise NotImplementedError

    def sample_emissions(
        self,
        params: dict[str, torch.Tensor],
        states: torch.Tensor,
        generator: torch.Generator,
        previous: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(N, T, D)`` frames drawn given ``states`` ``(N, T)`` in the engine's space;
        ``previous`` ``(N, D)``: the frame before the first, for a family whose emissions
        read it (``emission_context`` 1; all zeros when None), ignored by the others."""
        raise NotImplementedError

    def emission_means(self, params: dict[str, torch.Tensor], previous: torch.Tensor | None = None) -> torch.Tensor:
        """``(S, D)`` E[x_t | z_t = s] per engine state (given the previous frame
        ``previous`` ``(D,)``, all zeros when None, for a family whose emissions read it)."""
        raise NotImplementedError(f"{self.family}: no emission means (a forecast's mean needs them)")

    def output_states(self, states: torch.Tensor) -> torch.Tensor:
        """Engine states ``(N, T)`` (-1 at padding) as reported to users."""
        return states

    def output_marginals(self, marginals: torch.Tensor) -> torch.Tensor:
        """Engine marginals ``(N, T, S)`` as reported to users ``(N, T, K)``."""
        return marginals

    def relabel_problem(self) -> str | None:
        if not self.hparams.single_chain:
            return f"{self.family}: its states are tuples of a product or second-order chain, not one chain's labels"
        if self._chain_masks is not None:
            return f"{self.family}: its chain has structural zeros (topology {self.hparams.topology} or a transition_mask) that a renumbering would move"
        return None

    def state_labels(self) -> list[str]:
        """Names of the engine's ``S`` states (for pictures)."""
        return [str(s) for s in range(self.transition_matrix().shape[-1])]

    @torch.no_grad()
    def transition_matrix(self) -> torch.Tensor:
        """``(S, S)`` p(to | from) over the engine's state space."""
        return self.chain_factors(self.map_values())[1].exp()

    @classmethod
    def supports_em(cls) -> bool:
        """EM needs an emission M-step, and a chain M-step where the chain is not the
        single ``initial`` and ``transition``."""
        own_chain = cls.chain_factors is HMMFamily.chain_factors or cls.chain_m_step is not HMMFamily.chain_m_step
        return own_chain and cls.emission_m_step is not HMMFamily.emission_m_step

    def em_step(self, params, x, lengths, improve=None):
        """The engine's E-step, then the chain's MAP updates under its Dirichlet priors
        (:meth:`chain_m_step`) and the family's :meth:`emission_m_step`; a family with
        networks (``nnhmm``) then has ``improve`` take gradient steps on their expected
        complete-data log-likelihood per frame (generalised EM, seed 002's ``NeuralHMM``)."""
        log_likelihood, marginals, counts = inference.expected_statistics(*self.factors(params, x, lengths), lengths)
        chain = self.chain_m_step(marginals[..., 0, :].sum(-2), counts.sum(-3))
        if self.network_parameters():
            frames = marginals.sum()
            improve(lambda: -(marginals * self.emission_log_probs(params, x)).sum() / frames)
        return {**chain, **self.emission_m_step(params, x, lengths, marginals)}, log_likelihood

    def chain_m_step(self, first: torch.Tensor, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        """The chain's parameters from the expected engine states at the first frames
        ``first`` ``(..., S)`` and the expected transitions ``counts`` ``(..., S, S)``,
        summed over sequences; by default the single chain's ``initial`` and ``transition``."""
        return {"initial": self.dirichlet_update("initial", first), "transition": self.dirichlet_update("transition", counts)}

    def dirichlet_update(self, name: str, counts: torch.Tensor) -> torch.Tensor:
        """:func:`em.dirichlet_map` of parameter ``name`` under its own prior."""
        prior = em.base(self.priors()[name])
        allowed = prior.allowed if isinstance(prior, MaskedDirichlet) else None
        return em.dirichlet_map(counts, prior.concentration, allowed)

    def emission_m_step(
        self, params: dict[str, torch.Tensor], x: torch.Tensor, lengths: torch.Tensor, marginals: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The emission parameters' MAP update given the smoothed ``marginals``
        ``(..., N, T, S)``; families without one are trained by SVI only."""
        raise NotImplementedError

    # The contract, once for all families.
    def factors(
        self, params: dict[str, torch.Tensor], x: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Engine factors with the sequence dim in place: ``(..., 1, S)``,
        ``(..., 1, S, S)``, ``(..., N, T, S)``."""
        log_init, log_trans = self.chain_factors(params)
        log_emit = self.emission_log_probs(params, x)
        return log_init.unsqueeze(-2), log_trans.unsqueeze(-3), log_emit

    def log_likelihood_of(self, params, x, lengths) -> torch.Tensor:
        return inference.log_likelihood(*self.factors(params, x, lengths), lengths)

    def log_likelihood(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``(N,)`` exact log p(x) in nats, with the engine's fast backward pass."""
        return self.log_likelihood_of(self.map_values(), x, lengths)

    def log_likelihood_steps(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        factors = self.factors(self.map_values(), x, lengths)
        return inference.log_likelihood_steps(*factors, lengths)

    @torch.no_grad()
    def decode(self, x: torch.Tensor, lengths: torch.Tensor) -> StatePath:
        """Viterbi: ``states`` ``(N, T)`` int64 (-1 past length) and ``log_joint`` ``(N,)``,
        the joint log p(z*, x) of the best path."""
        states, log_joint = inference.viterbi(*self.factors(self.map_values(), x, lengths), lengths)
        return StatePath(self.output_states(states), log_joint)

    @torch.no_grad()
    def posterior(self, x: torch.Tensor, lengths: torch.Tensor) -> Marginals:
        """Smoothed marginals ``(N, T, K)`` (forward-backward), zero at padding."""
        factors = self.factors(self.map_values(), x, lengths)
        return Marginals(self.output_marginals(inference.posterior_marginals(*factors, lengths)))

    @torch.no_grad()
    def sample(self, num_sequences: int, length: int | None = None, seed: int = 0) -> Samples:
        """Ancestral samples: ``x`` ``(num_sequences, length, D)`` and states
        ``(num_sequences, length)``; the same seed gives the same draws."""
        if length is None or length < 1 or num_sequences < 1:
            raise ValueError(
                f"{self.family}: sample needs num_sequences >= 1 and length >= 1, "
                f"got {num_sequences} and {length}"
            )
        generator = torch.Generator(device=self.device).manual_seed(seed)
        params = self.map_values()
        log_init, log_trans = self.chain_factors(params)
        states = inference.sample_states(log_init, log_trans, num_sequences, length, generator)
        x = self.sample_emissions(params, states, generator)
        return Samples(x, self.output_states(states))


def _renormalised(probs: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``probs`` ``(..., K)`` zeroed where ``allowed`` is False and renormalised."""
    kept = probs * allowed
    return kept / kept.sum(-1, keepdim=True)
