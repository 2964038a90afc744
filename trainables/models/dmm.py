"""Deep Markov Model for binary frames: family ``dmm`` (seed 001, Pyro's ``examples/dmm.py``).

Krishnan, Shalit & Sontag (2017), "Structured Inference Networks for Nonlinear State Space
Models". The generative model is a chain of continuous latents ``z_t`` (``Z = hidden_dim``
dimensions) with a gated non-linear Gaussian transition and a neural Bernoulli emission::

    z_t ~ Normal(GatedTransition(z_{t-1}))          z_0 is a learned vector
    x_t ~ Bernoulli(logits=Emitter(z_t))             D = data_dim binary values per frame

The guide ``q(z_t | z_{t-1}, x_{t:})`` combines ``z_{t-1}`` with the state of a tanh RNN run
backwards over each sequence (within its own length), optionally followed by inverse
autoregressive flows (IAF). Training maximises the ELBO with KL annealing.

The RNN is tanh, not ReLU as in Pyro's example: its states then stay in ``(-1, 1)``, the
range of the ``tanh`` term the combiner averages them with (the paper's inference RNN is
an LSTM, whose outputs are bounded too). A ReLU RNN's states are unbounded: once training
makes its recurrence expansive they grow geometrically along a backward pass over a
chorale (up to 193 frames), which drives the combiner's softplus scale to 0 and the
guide's log-density to NaN within a few epochs at lr 1e-3.

Two paths compute with the same networks:

- ``model`` / ``guide``: Pyro programs for ``Trace_ELBO`` (training).
- ``log_likelihood_steps``, ``decode``, ``posterior``, ``sample``: pure torch, no Pyro
  effect handlers, so a serving replica may call them from several threads at once.

Sites are named ``z_1 .. z_T`` and ``x_1 .. x_T`` (1-based, as in the paper; ``z_0`` is the
learned initial latent). Frames at ``t >= lengths[n]`` are padding: they are replaced by
zeros on entry, masked out of every log-density and returned as zeros.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.distributions.transforms import AffineAutoregressive, affine_autoregressive
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO
from pydantic import Field
from torch import nn

from .base import SequenceModel
from .contract import GaussianPosterior, Hyperparameters, LatentPath, Samples
from .missing import filled, observed

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class Emitter(nn.Module):
    """Parameterises p(x_t | z_t): ``z`` ``(..., Z)`` -> Bernoulli logits ``(..., D)``.

    The network returns logits (``sigmoid(logits)`` are the Bernoulli probabilities) so that
    log-densities stay exact where the probabilities saturate.
    """

    def __init__(self, data_dim: int, latent_dim: int, emission_dim: int) -> None:
        super().__init__()
        self.lin_z_to_hidden = nn.Linear(latent_dim, emission_dim)
        self.lin_hidden_to_hidden = nn.Linear(emission_dim, emission_dim)
        self.lin_hidden_to_input = nn.Linear(emission_dim, data_dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.lin_z_to_hidden(z))
        hidden = F.relu(self.lin_hidden_to_hidden(hidden))
        return self.lin_hidden_to_input(hidden)


class GatedTransition(nn.Module):
    """Parameterises p(z_t | z_{t-1}): ``z_prev`` ``(..., Z)`` -> ``loc``, ``scale`` ``(..., Z)``.

    The mean mixes a linear map of ``z_{t-1}`` (initialised to the identity) with a non-linear
    proposal, weighted by a learned gate.
    """

    def __init__(self, latent_dim: int, transition_dim: int) -> None:
        super().__init__()
        self.lin_gate_z_to_hidden = nn.Linear(latent_dim, transition_dim)
        self.lin_gate_hidden_to_z = nn.Linear(transition_dim, latent_dim)
        self.lin_proposed_mean_z_to_hidden = nn.Linear(latent_dim, transition_dim)
        self.lin_proposed_mean_hidden_to_z = nn.Linear(transition_dim, latent_dim)
        self.lin_sig = nn.Linear(latent_dim, latent_dim)
        self.lin_z_to_loc = nn.Linear(latent_dim, latent_dim)
        with torch.no_grad():
            self.lin_z_to_loc.weight.copy_(torch.eye(latent_dim))
            self.lin_z_to_loc.bias.zero_()

    def forward(self, z_prev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = torch.sigmoid(self.lin_gate_hidden_to_z(F.relu(self.lin_gate_z_to_hidden(z_prev))))
        proposed_mean = self.lin_proposed_mean_hidden_to_z(
            F.relu(self.lin_proposed_mean_z_to_hidden(z_prev))
        )
        loc = (1 - gate) * self.lin_z_to_loc(z_prev) + gate * proposed_mean
        scale = F.softplus(self.lin_sig(F.relu(proposed_mean)))
        return loc, scale


class Combiner(nn.Module):
    """Parameterises the Gaussian part of q(z_t | z_{t-1}, x_{t:}).

    ``z_prev`` ``(..., Z)`` and the backward RNN state ``h`` ``(..., R)`` (broadcastable)
    -> ``loc``, ``scale`` ``(..., Z)``.
    """

    def __init__(self, latent_dim: int, rnn_dim: int) -> None:
        super().__init__()
        self.lin_z_to_hidden = nn.Linear(latent_dim, rnn_dim)
        self.lin_hidden_to_loc = nn.Linear(rnn_dim, latent_dim)
        self.lin_hidden_to_scale = nn.Linear(rnn_dim, latent_dim)

    def forward(
        self, z_prev: torch.Tensor, h: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        combined = 0.5 * (torch.tanh(self.lin_z_to_hidden(z_prev)) + h)
        return self.lin_hidden_to_loc(combined), F.softplus(self.lin_hidden_to_scale(combined))


def reverse_within_lengths(seq: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each sequence of ``seq`` ``(N, T, F)`` within its own length ``lengths`` ``(N,)``.

    Frame ``t < lengths[n]`` of the result is frame ``lengths[n] - 1 - t`` of the input; frames
    past the length hold an arbitrary real frame of the same sequence. Applied twice, it is the
    identity on the real frames.
    """
    steps = torch.arange(seq.size(1), device=seq.device)
    index = (lengths[:, None] - 1 - steps).clamp(min=0)
    return seq.gather(1, index[..., None].expand_as(seq))


def normal_log_prob(value: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Diagonal Normal log-density ``(...)`` of ``value`` ``(..., Z)`` (broadcasting)."""
    return (-0.5 * ((value - loc) / scale) ** 2 - scale.log() - _LOG_SQRT_2PI).sum(-1)


def bernoulli_log_prob(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Bernoulli log-probability ``(...)`` of the observed values of binary ``x`` ``(..., D)``
    (NaN where missing, :mod:`.missing`; broadcasting)."""
    mask = observed(x)
    x, logits = torch.broadcast_tensors(filled(x, mask), logits)
    terms = -F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    return (terms if mask is None else torch.where(mask, terms, 0.0)).sum(-1)


def stack_masked(frames: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """Stack ``T`` frames ``(N, F)`` into ``(N, T, F)``, zero where ``mask`` ``(N, T)`` is False."""
    return torch.where(mask[..., None], torch.stack(frames, dim=1), 0.0)


class DMMHyperparameters(Hyperparameters):
    """Network widths, the guide's options, the bound's particles and KL annealing."""

    hidden_dim: int = Field(16, ge=1, description="latent dimensions")
    emission_dim: int = Field(100, ge=1, description="hidden width of the emitter")
    transition_dim: int = Field(200, ge=1, description="hidden width of the gated transition")
    rnn_dim: int = Field(600, ge=1, description="width of the guide's backward RNN and combiner")
    rnn_dropout_rate: float = Field(0.0, ge=0, lt=1, description="dropout on the guide's RNN states while training")
    num_iafs: int = Field(0, ge=0, description="inverse autoregressive flows on q(z_t)")
    iaf_dim: int = Field(50, ge=1, description="hidden width of each IAF")
    num_particles: int = Field(8, ge=1, description="importance samples of the likelihood bound")
    annealing_epochs: int = Field(0, ge=0, description="epochs of KL annealing (0: none)")
    elbo: Literal["trace", "mean-field"] = Field(
        "trace", description="training objective: Trace_ELBO, or TraceMeanField_ELBO (each step's KL in closed form)"
    )
    minimum_annealing_factor: float = Field(0.2, gt=0, le=1, description="KL weight at the first epoch")


class DeepMarkovModel(SequenceModel):
    """Deep Markov Model over binary frames with ``Z = hidden_dim`` continuous latents.

    Hyperparameters: ``emission_dim``, ``transition_dim`` (hidden widths of the emitter and
    the gated transition), ``rnn_dim`` (backward RNN and combiner width),
    ``rnn_dropout_rate`` (dropout on the RNN states in the guide while training),
    ``num_iafs`` / ``iaf_dim`` (number and hidden width of IAF flows on q(z_t)),
    ``num_particles`` (importance samples of the ``log_likelihood`` bound),
    ``annealing_epochs`` / ``minimum_annealing_factor`` (KL annealing schedule).

    ``log_likelihood`` is an importance-weighted lower bound (IWAE), hence ``exact = False``.
    Its particles are drawn from the global torch RNG: results are reproducible after
    ``torch.manual_seed`` (and differ from call to call otherwise).
    """

    family = "dmm"
    observation = "binary"
    latent = "continuous"
    exact = False
    hyperparameters = DMMHyperparameters

    def __init__(self, data_dim: int, hidden_dim: int, **hparams: Any) -> None:
        super().__init__(data_dim, hidden_dim, **hparams)
        h = self.hparams
        self.rnn_dropout_rate = h.rnn_dropout_rate
        self.num_particles = h.num_particles
        self.annealing_epochs = h.annealing_epochs
        self.minimum_annealing_factor = h.minimum_annealing_factor

        latent_dim, rnn_dim = self.hidden_dim, h.rnn_dim
        self.emitter = Emitter(self.data_dim, latent_dim, h.emission_dim)
        self.transition = GatedTransition(latent_dim, h.transition_dim)
        self.combiner = Combiner(latent_dim, rnn_dim)
        # tanh keeps the states bounded (see the module docstring: ReLU diverged to NaN)
        self.rnn = nn.RNN(
            input_size=self.data_dim, hidden_size=rnn_dim, nonlinearity="tanh", batch_first=True
        )
        self.iafs = nn.ModuleList(
            affine_autoregressive(latent_dim, hidden_dims=[h.iaf_dim]) for _ in range(h.num_iafs)
        )
        self.z_0 = nn.Parameter(torch.zeros(latent_dim))
        self.z_q_0 = nn.Parameter(torch.zeros(latent_dim))
        self.h_0 = nn.Parameter(torch.zeros(1, 1, rnn_dim))

    # ----------------------------------------------------------------- shared pieces
    def _prepare(
        self, x: torch.Tensor, lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Validate ``x`` ``(N, T, D)``; return ``x`` with zeroed padding (missing values
        still NaN: every use fills them or masks their terms), ``lengths`` ``(N,)``
        (all ``T`` when None) and the frame mask ``(N, T)`` bool (True on real frames)."""
        if x.dim() != 3 or x.size(-1) != self.data_dim:
            raise ValueError(
                f"dmm: expected x of shape (N, T, {self.data_dim}), got {tuple(x.shape)}"
            )
        num_sequences, num_steps, _ = x.shape
        if num_steps < 1:
            raise ValueError("dmm: sequences need at least one frame (T >= 1)")
        if lengths is None:
            lengths = torch.full((num_sequences,), num_steps, dtype=torch.long, device=x.device)
        lengths = lengths.to(device=x.device, dtype=torch.long)
        if lengths.shape != (num_sequences,):
            raise ValueError(
                f"dmm: expected lengths of shape ({num_sequences},), got {tuple(lengths.shape)}"
            )
        if bool(((lengths < 0) | (lengths > num_steps)).any()):
            raise ValueError(f"dmm: lengths must lie in [0, {num_steps}] (the padded length T)")
        mask = torch.arange(num_steps, device=x.device) < lengths[:, None]
        x = torch.where(mask[..., None], x.to(self.z_0.dtype), 0.0)
        return x, lengths, mask

    def _rnn_states(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Backward RNN states ``(N, T, R)``: frame ``t`` summarises ``x_t .. x_{length-1}``."""
        h_0 = self.h_0.expand(1, x.size(0), self.h_0.size(-1)).contiguous()
        states, _ = self.rnn(reverse_within_lengths(filled(x, observed(x)), lengths), h_0)
        return reverse_within_lengths(states, lengths)

    def _step_iafs(self) -> list[AffineAutoregressive]:
        """Fresh transform objects over the IAFs' networks (shared parameters).

        A transform caches only its last ``(u, z)`` pair. One object reused at every time step
        would miss that cache when ``Trace_ELBO`` scores the sites after the whole trace,
        falling back to the sequential O(Z) inversion; and a shared cache is state that
        concurrent threads would race on. Objects made per step and per call avoid both.
        """
        return [
            AffineAutoregressive(
                iaf.arn,
                log_scale_min_clip=iaf.log_scale_min_clip,
                log_scale_max_clip=iaf.log_scale_max_clip,
            )
            for iaf in self.iafs
        ]

    def _flow(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Push base samples ``u`` ``(..., Z)`` through the IAFs: ``z`` ``(..., Z)`` and
        log|det dz/du| ``(...)``."""
        log_det = u.new_zeros(u.shape[:-1])
        for transform in self._step_iafs():
            z = transform(u)
            log_det = log_det + transform.log_abs_det_jacobian(u, z)
            u = z
        return u, log_det

    def _step_log_joint(
        self, z_prev: torch.Tensor, z: torch.Tensor, x_t: torch.Tensor
    ) -> torch.Tensor:
        """log p(z_t | z_{t-1}) + log p(x_t | z_t) ``(...)`` for ``z_prev``, ``z`` ``(..., Z)``
        and ``x_t`` ``(..., D)`` (broadcasting)."""
        loc, scale = self.transition(z_prev)
        return normal_log_prob(z, loc, scale) + bernoulli_log_prob(x_t, self.emitter(z))

    def _guide_distribution(
        self, loc: torch.Tensor, scale: torch.Tensor
    ) -> dist.TorchDistribution:
        """q(z_t | ...) with event shape ``(Z,)``: Normal(loc, scale), then the IAFs if any."""
        base = dist.Normal(loc, scale).to_event(1)
        if not self.iafs:
            return base
        return dist.TransformedDistribution(base, self._step_iafs())

    # ----------------------------------------------------------------- Pyro programs
    def model(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor | None,
        scale: float = 1.0,
        annealing: float = 1.0,
    ) -> None:
        """Generative model for SVI over ``x`` ``(N, T, D)``, ``lengths`` ``(N,)``.

        ``scale`` multiplies the whole program (full data size / batch size); ``annealing``
        additionally weighs the latent sites (KL annealing).
        """
        x, _, mask = self._prepare(x, lengths)
        num_sequences, present = x.size(0), observed(x)
        frames = filled(x, present)
        with poutine.scale(scale=scale), pyro.plate("sequences", num_sequences):
            z_prev = self.z_0.expand(num_sequences, self.hidden_dim)
            for t in pyro.markov(range(x.size(1))):
                loc, z_scale = self.transition(z_prev)
                with poutine.scale(scale=annealing):
                    z_t = pyro.sample(
                        f"z_{t + 1}", dist.Normal(loc, z_scale).to_event(1).mask(mask[:, t])
                    )
                emission = dist.Bernoulli(logits=self.emitter(z_t))
                if present is not None:  # the missing values' terms masked out of the bound
                    emission = emission.mask(present[:, t])
                pyro.sample(f"x_{t + 1}", emission.to_event(1).mask(mask[:, t]), obs=frames[:, t])
                z_prev = z_t

    def guide(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor | None,
        scale: float = 1.0,
        annealing: float = 1.0,
    ) -> None:
        """Structured guide q(z_{1:T} | x) for SVI; same arguments as :meth:`model`."""
        x, lengths, mask = self._prepare(x, lengths)
        num_sequences = x.size(0)
        states = F.dropout(self._rnn_states(x, lengths), self.rnn_dropout_rate, self.training)
        with poutine.scale(scale=scale), pyro.plate("sequences", num_sequences):
            z_prev = self.z_q_0.expand(num_sequences, self.hidden_dim)
            for t in pyro.markov(range(x.size(1))):
                loc, z_scale = self.combiner(z_prev, states[:, t])
                with poutine.scale(scale=annealing):
                    z_prev = pyro.sample(
                        f"z_{t + 1}", self._guide_distribution(loc, z_scale).mask(mask[:, t])
                    )

    def elbo(self) -> ELBO:
        """``Trace_ELBO``, or with ``elbo: mean-field`` ``TraceMeanField_ELBO``: the KL of
        each step's Normal guide from the transition's Normal in closed form, as in
        Krishnan et al. (with IAFs, whose KL has no closed form, it is estimated)."""
        return TraceMeanField_ELBO() if self.hparams.elbo == "mean-field" else Trace_ELBO()

    def training_kwargs(self, epoch: int, num_epochs: int) -> dict[str, Any]:
        """KL annealing factor at ``epoch`` (counted from 0): rises linearly from
        ``minimum_annealing_factor`` at epoch 0 to 1 at epoch ``annealing_epochs`` and stays
        there (always 1 when ``annealing_epochs`` is 0)."""
        if epoch >= self.annealing_epochs:
            return {"annealing": 1.0}
        low = self.minimum_annealing_factor
        return {"annealing": low + (1.0 - low) * epoch / self.annealing_epochs}

    # ----------------------------------------------------------------- pure torch
    def log_likelihood_steps(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``(N, T)`` per-step increments of the IWAE bound with ``num_particles`` particles.

        With log-weights ``w_{s,t} = log p(x_t|z_t) + log p(z_t|z_{t-1}) - log q(z_t|...)`` of
        ``S`` guide particles and their running sums ``W_{s,t}``, the bound on
        ``log p(x_{<=t})`` is ``L_t = logmeanexp_s W_{s,t}``; the result is ``L_t - L_{t-1}``
        (zero at padding), so it sums to the IWAE bound on ``log p(x)``. Particles come from
        ``generator`` (a fixed seed gives a repeatable answer) or else the global torch RNG;
        differentiable (reparameterised) in the module's parameters.
        """
        x, lengths, mask = self._prepare(x, lengths)
        num_sequences, num_steps, _ = x.shape
        states = self._rnn_states(x, lengths)
        shape = (self.num_particles, num_sequences, self.hidden_dim)
        guide_prev, model_prev = self.z_q_0.expand(shape), self.z_0.expand(shape)
        log_weights = []
        for t in range(num_steps):
            loc, scale = self.combiner(guide_prev, states[:, t])
            u = loc + scale * torch.randn(loc.shape, generator=generator, dtype=loc.dtype, device=loc.device)
            z, log_det = self._flow(u)
            log_weight = self._step_log_joint(model_prev, z, x[:, t]) - (
                normal_log_prob(u, loc, scale) - log_det
            )
            log_weights.append(torch.where(mask[:, t], log_weight, 0.0))
            guide_prev = model_prev = z
        running = torch.stack(log_weights, dim=-1).cumsum(-1)
        bound = running.logsumexp(0) - math.log(self.num_particles)
        steps = bound.diff(dim=-1, prepend=bound.new_zeros(num_sequences, 1))
        return torch.where(mask, steps, 0.0)

    def _mean_path(
        self, x: torch.Tensor, lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the guide feeding its mean as ``z_{t-1}``.

        Returns the prepared ``x`` ``(N, T, D)``, the mask ``(N, T)``, and ``latents``,
        ``loc``, ``scale`` ``(N, T, Z)`` (zero at padding), where ``loc``/``scale`` are the
        Gaussian part of q and ``latents`` is ``loc`` pushed through the IAFs (``loc`` itself
        without IAFs).
        """
        x, lengths, mask = self._prepare(x, lengths)
        states = self._rnn_states(x, lengths)
        z_prev = self.z_q_0.expand(x.size(0), self.hidden_dim)
        latents, locs, scales = [], [], []
        for t in range(x.size(1)):
            loc, scale = self.combiner(z_prev, states[:, t])
            z_prev, _ = self._flow(loc)
            latents.append(z_prev)
            locs.append(loc)
            scales.append(scale)
        return (
            x,
            mask,
            stack_masked(latents, mask),
            stack_masked(locs, mask),
            stack_masked(scales, mask),
        )

    def _log_joint(self, x: torch.Tensor, mask: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``(N,)`` log p(x, z) of prepared ``x`` ``(N, T, D)`` and latents ``z`` ``(N, T, Z)``
        on the real frames of ``mask`` ``(N, T)`` (a density in z)."""
        z_0 = self.z_0.expand(z.size(0), 1, self.hidden_dim)
        z_prev = torch.cat([z_0, z[:, :-1]], dim=1)
        return torch.where(mask, self._step_log_joint(z_prev, z, x), 0.0).sum(-1)

    def decode(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> LatentPath:
        """Posterior-mean latent path and its joint log-density.

        Returns ``latents`` ``(N, T, Z)`` (zero at padding): at each step the guide's Gaussian
        mean given the previous mean latent, pushed through the IAFs when there are any; and
        ``log_joint`` ``(N,)`` = log p(x, z=latents) under the model. Deterministic.
        """
        x, mask, latents, _, _ = self._mean_path(x, lengths)
        return LatentPath(latents, self._log_joint(x, mask, latents))

    def posterior(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> GaussianPosterior:
        """The guide's per-step ``loc`` and ``scale`` ``(N, T, Z)`` along the mean path of
        :meth:`decode` (zero at padding). With IAFs these describe the Gaussian before the
        flows. Deterministic."""
        _, _, _, loc, scale = self._mean_path(x, lengths)
        return GaussianPosterior(loc, scale)

    @torch.no_grad()
    def sample(self, num_sequences: int, length: int, seed: int = 0) -> Samples:
        """Ancestral samples: ``x`` ``(num_sequences, length, D)`` float 0/1 and ``latents``
        ``(num_sequences, length, Z)``, on the model's device, from a ``torch.Generator``
        seeded with ``seed`` (the same seed gives the same output)."""
        if num_sequences < 1 or length < 1:
            raise ValueError(
                f"dmm: num_sequences and length must be >= 1, got {num_sequences} and {length}"
            )
        generator = torch.Generator(device=self.device).manual_seed(int(seed))
        z_prev = self.z_0.expand(num_sequences, self.hidden_dim)
        frames, latents = [], []
        for _ in range(length):
            loc, scale = self.transition(z_prev)
            noise = torch.randn(loc.shape, generator=generator, dtype=loc.dtype, device=loc.device)
            z_prev = loc + scale * noise
            frames.append(torch.bernoulli(torch.sigmoid(self.emitter(z_prev)), generator=generator))
            latents.append(z_prev)
        return Samples(torch.stack(frames, dim=1), torch.stack(latents, dim=1))

