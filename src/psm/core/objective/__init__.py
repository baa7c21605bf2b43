"""Training objectives: what one block learns from — its times, its pairs, its loss weights.

An :class:`Objective` is built per block, for the block's time range ``[t_lo, t_hi]`` and the
run's :class:`~psm.core.process.Process`, the shape of edm's ``VPLoss``/``EDMLoss`` (which own
their time sampling, noise and weighting). It

* draws one batch (:meth:`Objective.draw`): times ``t`` within the block, noise ε, the pair
  ``(x_t, target)`` of eq. 29 (:meth:`Process.training_pair`) and an optional per-sample loss
  weight;
* scores a stack of K blocks at once (:meth:`Objective.loss`): ``[K, B, *D] -> [K]``.

The default member, ``mse`` (:class:`MSEObjective`, ``mse.py``), is the paper's:
``t ~ U[t_lo, t_hi]`` (Algorithm 1; K = 1 is SA-DPM), the fixed time of a grid point
(Algorithm 2), and the plain mean squared error of the process's own prediction (eq. 26 for ε;
the velocity for flow matching).
``likelihood`` (:class:`LikelihoodObjective`, ``likelihood.py``) weights the same error by the
likelihood bound's ``½ λ(t)/q(t)``, times importance-sampled ``∝ λ`` (Song et al. 2021).

The ``train.objective`` section of a config is a member of :data:`OBJECTIVES`, discriminated by
``name`` like ``data:`` and ``net:``. A new objective is an :class:`Objective` subclass (usually
only :meth:`Objective.times`) and its :class:`ObjectiveSpec` in a file of this package, plus
one line in :data:`OBJECTIVES`; the training loop does not change.
"""

from __future__ import annotations

from ...spec import Registry
from .base import Batch, Objective, ObjectiveSpec, stack_batches
from .likelihood import LikelihoodObjective, LikelihoodSpec
from .mse import MSEObjective, MSESpec

__all__ = [
    "OBJECTIVES",
    "Batch",
    "LikelihoodObjective",
    "LikelihoodSpec",
    "MSEObjective",
    "MSESpec",
    "Objective",
    "ObjectiveSpec",
    "stack_batches",
]

OBJECTIVES: Registry[ObjectiveSpec] = Registry(
    "objective", [MSESpec, LikelihoodSpec], default="mse"
)
"""The objectives ``train.objective`` can name; ``mse`` when none is given."""
