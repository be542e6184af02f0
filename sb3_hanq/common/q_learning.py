"""Q-learning math of the HANQ paper, once: targets, predictor, TD loss and the residual-gradient term.

Every function here is pure (tensors and modules in, tensors out) and used by both paths:

- :class:`sb3_hanq.HANQ` / :class:`sb3_hanq.SSAQ` call them on their own ``q_net`` (``HANQ.train``);
- the population trainer (:mod:`sb3_hanq.population`) calls the same functions on stacked parameters,
  through :func:`torch.func.functional_call` under :func:`torch.func.vmap` (one member per row).

A test pins the two paths to each other (``tests/test_population.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch as th
import torch.nn.functional as F
from torch import nn

TD_LOSSES = ("mse", "huber")


class PredictorOutput(NamedTuple):
    """The asymmetric prediction of Alg. 1-2 for the batch's actions (all ``[batch, 1]``)."""

    prediction: th.Tensor  #: Q_omega,theta(s, a) = omega_scale^+ Q_theta(s, a) + omega_bias
    q_values: th.Tensor  #: Q_theta(s, a)
    multiplier: th.Tensor | None  #: omega_scale^+ (``None`` without a predictor scale)
    bias: th.Tensor | None  #: omega_bias (``None`` without a predictor bias)


def predicted_q_values(q_net: Any, obs: th.Tensor, actions: th.Tensor) -> PredictorOutput:
    """Q_omega,theta(s, a) of a :class:`~sb3_hanq.hanq.policies.HANQNetwork` (Alg. 2, lines 4-6).

    With ``predictor="none"`` the prediction is Q_theta(s, a) itself, i.e. DQN's (Table 2 "w/o any pred.").

    :param q_net: a ``HANQNetwork`` (``latent``, ``q_from_latent``, ``predict_q``)
    :param obs: observations ``[batch, *obs_shape]``
    :param actions: integer actions ``[batch, 1]``
    """
    latent = q_net.latent(obs)
    return PredictorOutput(*q_net.predict_q(latent, q_net.q_from_latent(latent), actions))


def bootstrap_q_values(q_net: Any, next_obs: th.Tensor, symmetric: bool = False) -> th.Tensor:
    """Q-values of the bootstrap target ``[batch, n_actions]``: Q_theta(s', .) (Alg. 2, "discard or do not
    compute omega_theta(s', a')"), or Q_omega,theta(s', .) when ``symmetric`` (Table 2 "symmetrized")."""
    latent = q_net.latent(next_obs)
    q_values = q_net.q_from_latent(latent)
    return q_net.predict_q(latent, q_values)[0] if symmetric else q_values


def q_learning_targets(
    next_q_values: th.Tensor, rewards: th.Tensor, dones: th.Tensor, discounts: th.Tensor | float
) -> th.Tensor:
    """y = r + gamma (1 - d) max_a' Q(s', a') (Alg. 1-2); all ``[batch, 1]`` except ``next_q_values``
    ``[batch, n_actions]``. ``discounts`` may be a float or a ``[batch, 1]`` tensor (n-step returns)."""
    return rewards + (1 - dones) * discounts * next_q_values.max(dim=-1, keepdim=True).values


def td_loss(prediction: th.Tensor, targets: th.Tensor, loss: str = "mse") -> th.Tensor:
    """The training loss with a stop-gradient on the targets, averaged over the batch: a scalar for
    ``[batch, 1]`` inputs, one loss per member for stacked ``[M, batch, 1]`` inputs.

    ``"mse"``: the mean squared Bellman error of Alg. 1-2, ``mean_B (Q_omega,theta(s,a) - sg[y])^2``;
    ``"huber"``: SB3's DQN loss (``smooth_l1_loss``), for comparisons with SB3's ``DQN``.
    """
    if loss == "mse":
        return ((prediction - targets.detach()) ** 2).mean(dim=(-2, -1))
    if loss == "huber":
        return F.smooth_l1_loss(prediction, targets.detach(), reduction="none").mean(dim=(-2, -1))
    raise ValueError(f"Invalid loss={loss!r}: expected one of {TD_LOSSES}")


def hyperobjective_loss(prediction: th.Tensor, targets: th.Tensor, residual: bool | th.Tensor = True) -> th.Tensor:
    """The learning rate's hyperobjective L~ on a minibatch: ``mean_B (Q_omega,theta(s, a) - y)^2`` with the
    gradient through the targets ``y`` (the residual gradient L_RG, §12 Eq. 9) when ``residual``, else with
    ``sg[y]`` (L_SG, Eq. 8, which equals :func:`td_loss`). ``residual`` may be a bool tensor broadcasting
    against ``[M, batch, 1]`` (one choice per population member). A scalar, or one loss per member.

    Used by the "same-batch" reading of Alg. 2 (``HANQ(hyper_batch="same")``): after the weight step on a
    minibatch B, alpha moves by ``d/dalpha L~(theta_i - alpha u_i; B) = -grad L~(theta_{i+1}; B) . u_i``.
    """
    if isinstance(residual, th.Tensor):
        targets = th.where(residual, targets, targets.detach())
    elif not residual:
        targets = targets.detach()
    return ((prediction - targets) ** 2).mean(dim=(-2, -1))


def rg_directional_correction(td_errors: th.Tensor, target_tangents: th.Tensor) -> th.Tensor:
    """The part of grad L_RG . u that flows through the bootstrap target (§12, Eq. 9), from tangents.

    L_RG = mean_B (Q_omega,theta(s,a) - y(theta))^2 differs from the training loss L_SG only by the
    gradient through y, so grad L_RG . u = grad L_SG . u + this term, with
    ``this = -2/|B| sum_j (Q_omega,theta(s_j, a_j) - y_j) (dy_j . u)``; ``target_tangents`` are the
    directional derivatives ``dy . u``, e.g. from :func:`target_jvp` (forward mode).

    :param td_errors: ``Q_omega,theta(s, a) - y`` (no gradient needed), ``[batch, 1]``
    :param target_tangents: ``dy . u``, same shape
    :return: a scalar tensor
    """
    return -2.0 * (td_errors * target_tangents).mean(dim=(-2, -1))


def rg_target_gradient(targets: th.Tensor, td_errors: th.Tensor, params: list[th.Tensor]) -> list[th.Tensor | None]:
    """The residual gradient's term through the targets, ``grad_theta(-2/|B| sum_j err_j y_j)``, one entry per
    parameter (``None`` where the targets do not depend on it): ``grad L_RG = grad L_SG + this`` (§12, Eq. 9).

    :param targets: y(theta) with its graph (``[batch, 1]``)
    :param td_errors: ``Q_omega,theta(s, a) - y`` without gradient, same shape
    """
    return list(th.autograd.grad(targets, params, grad_outputs=-2.0 * td_errors / td_errors.numel(), allow_unused=True))


def rg_directional_correction_reverse(
    targets: th.Tensor, td_errors: th.Tensor, params: list[th.Tensor], directions: list[th.Tensor]
) -> th.Tensor:
    """The same quantity as :func:`rg_directional_correction`, by one backward pass through the targets:
    ``grad_theta(-2/|B| sum_j err_j y_j) . u``. Reverse mode: measured 2.4x faster than
    :func:`torch.func.jvp` for HANQ's [128] network on CPU (README, "HANQ speed"), so the SB3 class uses it.

    :param targets: y(theta) with its graph (``[batch, 1]``)
    :param td_errors: ``Q_omega,theta(s, a) - y`` without gradient, same shape
    :param params: the parameters theta (those ``directions`` belong to)
    :param directions: u, one tensor per parameter
    """
    through_target = rg_target_gradient(targets, td_errors, params)
    products = [(g * u).sum() for g, u in zip(through_target, directions) if g is not None]
    return th.stack(products).sum() if products else targets.new_zeros(())


def target_jvp(
    target_fn: Callable[[dict[str, th.Tensor]], th.Tensor],
    params: dict[str, th.Tensor],
    directions: dict[str, th.Tensor],
) -> tuple[th.Tensor, th.Tensor]:
    """(y(theta), dy(theta) . u) in one forward-mode pass (:func:`torch.func.jvp`); ``target_fn`` maps a
    parameter dict to the targets. Works unchanged under :func:`torch.func.vmap` and on stacked parameters."""
    return th.func.jvp(target_fn, (params,), (directions,))  # type: ignore[return-value]


class ModuleFunction(nn.Module):
    """Wraps ``fn(module, *args)`` as a module whose parameters are ``module``'s, so that
    :func:`torch.func.functional_call` can run any of the functions above with substituted
    (e.g. stacked, vmapped) parameters: ``functional_call(ModuleFunction(q_net, fn), {"module." + k: v}, args)``."""

    def __init__(self, module: nn.Module, fn: Callable[..., Any]) -> None:
        super().__init__()
        self.module = module
        self.fn = fn

    def forward(self, *args: Any) -> Any:
        return self.fn(self.module, *args)
