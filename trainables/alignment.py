"""Stable state labels: a model's states renumbered to match a reference model's, so that
state 3 keeps its meaning from one restart or registered version to the next.

Two models of the same data are matched on their posterior co-occupancy over a split:
``C[i, j] = sum over real frames of p(z = i | x) q(z = j | x)``, ``i`` a state of the
model and ``j`` one of the reference's; the optimal one-to-one assignment (the Hungarian
algorithm, ``scipy.optimize.linear_sum_assignment``) maximises the matched mass. The
model's families need only ``posterior`` (marginals, or responsibilities for points);
renumbering is :meth:`trainables.models.MapModel.relabel`. Agreement between restarts'
decodings, which needs no matching, is the adjusted Rand index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from .data import Split
from .models import SequenceModel
from .svi import batches


@dataclass(frozen=True)
class Alignment:
    """``order``: new state ``i`` is the model's state ``order[i]`` (what ``relabel``
    takes); ``agreement``: the fraction of the split's real frames (points) whose most
    probable state, after renumbering, is the reference's."""

    order: list[int]
    agreement: float


@torch.no_grad()
def _marginals(model: SequenceModel, split: Split) -> torch.Tensor:
    """``(F, K)`` the state probabilities of every real frame (point) of ``split``, float64."""
    rows = []
    for x, lengths in batches(split, 64):
        marginals = model.posterior(x, lengths).marginals.double()
        if lengths is not None:
            real = torch.arange(marginals.shape[1], device=lengths.device) < lengths.unsqueeze(-1)
            marginals = marginals[real]
        rows.append(marginals.cpu())
    return torch.cat(rows)


def align(model: SequenceModel, reference: SequenceModel, split: Split) -> Alignment:
    """The renumbering of ``model``'s states that best matches ``reference``'s on ``split``
    (neither model is changed). With as many states as the reference, matched states take
    the reference's labels; with more, the unmatched ones follow in their own order; with
    fewer, the matched states keep the reference's order."""
    mine, theirs = _marginals(model, split), _marginals(reference, split)
    shared = (mine.T @ theirs).numpy()  # (K, K_ref) co-occupancy: expected frames in state i and state j
    rows, columns = linear_sum_assignment(shared, maximize=True)
    size, reference_size = shared.shape
    target = np.arange(size) + reference_size  # unmatched states go after every reference label
    target[rows] = columns
    order = [int(state) for state in np.argsort(target, kind="stable")]
    agreement = float((target[mine.argmax(1).numpy()] == theirs.argmax(1).numpy()).mean())
    return Alignment(order, agreement)


@torch.no_grad()
def decoded_states(model: SequenceModel, split: Split) -> np.ndarray:
    """``(F,)`` the most probable state path (Viterbi; the MAP component of a point) of
    ``split``, its real frames one after the other."""
    paths = []
    for x, lengths in batches(split, 64):
        states = model.decode(x, lengths).states
        paths.append((states[states >= 0] if lengths is not None else states).cpu().numpy())
    return np.concatenate(paths)


def restart_agreement(decodings: list[np.ndarray]) -> float:
    """The mean adjusted Rand index of every other restart's decoding with the first's
    (1: the same partition of the frames into states, whatever the labels; about 0: no
    more alike than chance).

    :param decodings: each restart's states of the same frames, ``(F,)`` each, at least two.
    """
    from sklearn.metrics import adjusted_rand_score  # a second to import: only where restarts are compared

    first, *others = decodings
    return float(np.mean([adjusted_rand_score(first, other) for other in others]))
