"""Hypergradient Adam: Adam whose learning rate is itself optimised by Adam.

HANQ paper §3.3 and §12 (Eqs. 5-9), after Chandra et al. (2019), "Gradient Descent: The Ultimate
Optimizer": at step ``i`` the learning rate takes one hyper-optimiser step on

    dL~(theta_i)/d alpha  =  grad L~(theta_i) . (-u_{i-1})                     (Eq. 7 for Adam)

where ``u_{i-1}`` is the previous Adam update direction (``theta_i = theta_{i-1} - alpha u_{i-1}``),
and then ``theta`` takes an ordinary Adam step with the new learning rate (Eq. 6).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Union

import torch as th
from torch.optim import Optimizer

LR_PARAMETERIZATIONS = ("log", "linear")

#: A float (one param group) or a tensor with one entry per population member.
Scalar = Union[float, th.Tensor]  # noqa: UP007 (a runtime alias)


#: Largest learning rate the hyper-optimiser may reach: beyond it an Adam step overflows float32.
_MAX_LR = 1e30


def _bias_corrections(steps: list[int], beta1: float, beta2: float) -> tuple[Any, Any]:
    """Adam's bias corrections 1 - beta1^t and sqrt(1 - beta2^t): plain floats when every parameter is at the
    same step (the usual case; the foreach kernels then take one scalar instead of a list), else lists."""
    if all(t == steps[0] for t in steps):
        return 1 - beta1 ** steps[0], math.sqrt(1 - beta2 ** steps[0])
    return [1 - beta1**t for t in steps], [math.sqrt(1 - beta2**t) for t in steps]


def _adam_denominators(exp_avg_sqs: list[th.Tensor], bias_correction2: Any, eps: float) -> list[th.Tensor]:
    denoms = th._foreach_sqrt(exp_avg_sqs)
    th._foreach_div_(denoms, bias_correction2)
    th._foreach_add_(denoms, eps)
    return list(denoms)


def adam_directions(
    exp_avgs: list[th.Tensor], exp_avg_sqs: list[th.Tensor], steps: list[int], beta1: float, beta2: float, eps: float
) -> list[th.Tensor]:
    """Adam's bias-corrected update directions ``u = m_hat / (sqrt(v_hat) + eps)``, one per parameter.

    Same operations as ``torch.optim.Adam``, so ``p -= lr * u`` reproduces it to float precision.
    """
    bias_correction1, bias_correction2 = _bias_corrections(steps, beta1, beta2)
    updates = th._foreach_div(exp_avgs, _adam_denominators(exp_avg_sqs, bias_correction2, eps))
    th._foreach_div_(updates, bias_correction1)
    return list(updates)


def adam_moments_(
    exp_avgs: list[th.Tensor], exp_avg_sqs: list[th.Tensor], grads: list[th.Tensor], beta1: float, beta2: float
) -> None:
    """Adam's moment updates in place, ``m <- beta1 m + (1 - beta1) g`` and ``v <- beta2 v + (1 - beta2) g^2``,
    with the same operations as ``torch.optim.Adam``. The tensors may carry a leading population dimension."""
    th._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    th._foreach_mul_(exp_avg_sqs, beta2)
    th._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)


def learning_rate(
    base_lr: Scalar, log_lr_scale: Scalar, lr_offset: Scalar, lr_parameterization: str, min_lr: float
) -> Scalar:
    """The adapted alpha: ``base_lr * exp(log_lr_scale)`` ("log") or ``max(base_lr + lr_offset, min_lr)`` ("linear").

    Floats in, float out (:class:`HyperAdam`); tensors in, tensor out (one alpha per population member).
    """
    if lr_parameterization == "log":
        return base_lr * (th.exp(log_lr_scale) if isinstance(log_lr_scale, th.Tensor) else math.exp(log_lr_scale))
    offset_lr = base_lr + lr_offset
    return offset_lr.clamp_min(min_lr) if isinstance(offset_lr, th.Tensor) else max(offset_lr, min_lr)


def adam_delta(
    grad: Scalar,
    exp_avg: Scalar,
    exp_avg_sq: Scalar,
    step: int,
    step_size: Scalar,
    betas: tuple[float, float],
    eps: float,
) -> tuple[Scalar, Scalar, Scalar]:
    """One Adam step on a scalar (float, or a tensor of independent scalars): ``(delta, exp_avg, exp_avg_sq)``,
    the parameter moving by ``-delta``. The hyper-optimiser's arithmetic, for alpha and (``tune_betas``) Adam's betas.

    :param step: the step count *after* this step (1 on the first), for the bias corrections
    """
    beta1, beta2 = betas
    exp_avg = beta1 * exp_avg + (1 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    m_hat = exp_avg / (1 - beta1**step)
    v_hat = exp_avg_sq / (1 - beta2**step)
    return step_size * m_hat / (v_hat**0.5 + eps), exp_avg, exp_avg_sq


#: Bound on the betas' logits (``tune_betas``): beta stays within 1.1e-7 of 0 and 1, where float32 still tells beta
#: from 1. The hypergradient can push beta2 up step after step (measured: from 0.999 to exactly 1.0 in float64 within
#: 30k steps of HANQ on Pendulum at kappa = 0.1), and at beta2 = 1 Adam's bias correction 1 - beta2^t is 0: the step
#: is 0 or NaN. Chandra et al.'s tanh clamp reaches 1.0 in float32 at a logit of about 8.7.
BETA_LOGIT_BOUND = 8.0


def beta_from_logit(logit: Scalar) -> Scalar:
    """Adam's beta from the unconstrained value the hyper-optimiser moves: ``(tanh(x) + 1) / 2``, in (0, 1)
    (Chandra et al. 2019, whose hyperoptimisable Adam clamps its betas this way)."""
    return (th.tanh(logit) + 1) / 2 if isinstance(logit, th.Tensor) else (math.tanh(logit) + 1) / 2


def beta_logit(beta: Scalar) -> Scalar:
    """The inverse of :func:`beta_from_logit`: ``atanh(2 beta - 1)``, for ``0 < beta < 1``."""
    return th.atanh(2 * beta - 1) if isinstance(beta, th.Tensor) else math.atanh(2 * beta - 1)


def beta_logit_update(
    hypergrad: Scalar,
    logit: Scalar,
    exp_avg: Scalar,
    exp_avg_sq: Scalar,
    step: int,
    hyper_lr: Scalar,
    hyper_betas: tuple[float, float],
    hyper_eps: float,
) -> tuple[Scalar, Scalar, Scalar]:
    """One hyper-Adam step on a beta's logit (``tune_betas``) from ``hypergrad = dL~/dbeta``, the logit kept within
    +-:data:`BETA_LOGIT_BOUND`: ``(logit, exp_avg, exp_avg_sq)``. Floats (:class:`HyperAdam`) or tensors (one entry per
    population member), so both paths run this code."""
    beta = beta_from_logit(logit)
    # dL~/dlogit = dL~/dbeta * dbeta/dlogit, dbeta/dlogit = 2 beta (1 - beta)
    delta, exp_avg, exp_avg_sq = adam_delta(
        hypergrad * 2 * beta * (1 - beta), exp_avg, exp_avg_sq, step, hyper_lr, hyper_betas, hyper_eps
    )
    logit = logit - delta
    if isinstance(logit, th.Tensor):
        return logit.clamp(-BETA_LOGIT_BOUND, BETA_LOGIT_BOUND), exp_avg, exp_avg_sq
    return min(max(logit, -BETA_LOGIT_BOUND), BETA_LOGIT_BOUND), exp_avg, exp_avg_sq


def adam_step_with_beta_derivatives(
    exp_avg: th.Tensor, exp_avg_sq: th.Tensor, grad: th.Tensor, step: int, beta1: Scalar, beta2: Scalar, eps: float
) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
    """Adam's moment update (in place) and its direction ``u = m_hat / (sqrt(v_hat) + eps)``, with ``du/dbeta1`` and
    ``du/dbeta2``: what hyperoptimising "Adam via Adam" (HANQ paper §11, after Chandra et al. 2019) differentiates
    for the betas, as Eq. (7) does for alpha (``theta_i = theta_{i-1} - alpha u_{i-1}``, so
    ``dtheta_i/dbeta = -alpha du_{i-1}/dbeta``). As in Chandra et al., the previous moments are constants: the
    derivatives go through this step's moment update and bias corrections only.

    With ``m = beta m' + (1 - beta) g`` and ``m_hat = m / (1 - beta^t)``,
    ``dm_hat/dbeta = (A m' - B g) / (1 - beta^t)^2``, ``A = 1 + (t - 1) beta^t``, ``B = A - t beta^(t-1)``
    (the same for ``v`` with ``g^2``). The textbook form, ``(m' - g) / (1 - beta^t) + m t beta^(t-1) / (1 - beta^t)^2``,
    cancels two large terms (at t = 1 it is exactly 0 as a difference of two ``g / (1 - beta)``), and its rounding
    noise would set the hyper-step's sign; so A, B and the bias corrections are computed in float64.

    ``beta1``/``beta2`` are floats or tensors broadcasting against ``grad`` (one per population member).
    :return: ``(u, du/dbeta1, du/dbeta2)``
    """

    def coefficients(beta: Scalar) -> tuple[Scalar, Scalar, Scalar]:  # 1 - beta^t, A / bc^2, B / bc^2 (float64)
        # of beta as the moment update below uses it (rounded to the gradient's dtype: near 1 that rounding moves
        # 1 - beta by several percent in float32), in float64
        if isinstance(beta, th.Tensor):
            beta = beta.to(grad.dtype).double()
        else:
            beta = th.tensor(beta, dtype=grad.dtype).item()
        bc = 1 - beta**step
        a = 1 + (step - 1) * beta**step
        b = a - step * beta ** (step - 1)
        out = (bc, a / bc**2, b / bc**2)
        return tuple(x.to(grad.dtype) if isinstance(x, th.Tensor) else x for x in out)  # type: ignore[return-value]

    bc1, a1, b1 = coefficients(beta1)
    bc2, a2, b2 = coefficients(beta2)
    dm_hat = a1 * exp_avg - b1 * grad  # from the moments before this step's update
    dv_hat = a2 * exp_avg_sq - b2 * grad * grad
    beta1 = beta1.to(grad.dtype) if isinstance(beta1, th.Tensor) else beta1
    beta2 = beta2.to(grad.dtype) if isinstance(beta2, th.Tensor) else beta2
    exp_avg.mul_(beta1).add_((1 - beta1) * grad)
    exp_avg_sq.mul_(beta2).add_((1 - beta2) * grad * grad)
    m_hat, v_hat = exp_avg / bc1, exp_avg_sq / bc2
    root = v_hat.sqrt()
    denom = root + eps
    update = m_hat / denom
    d_beta1 = dm_hat / denom
    # d sqrt(v_hat) = dv_hat / (2 sqrt(v_hat)); where v_hat = 0 (a gradient that was always 0) m_hat is 0 too
    d_beta2 = th.where(root > 0, -update / denom * dv_hat / (2 * root.clamp_min(1e-30)), 0.0)
    return update, d_beta1, d_beta2


def hyper_adam_update(
    hypergrad: Scalar,
    lr: Scalar,
    *,
    base_lr: Scalar,
    log_lr_scale: Scalar,
    lr_offset: Scalar,
    exp_avg: Scalar,
    exp_avg_sq: Scalar,
    step: int,
    hyper_lr: Scalar,
    hyper_betas: tuple[float, float],
    hyper_eps: float,
    lr_parameterization: str,
    min_lr: float,
) -> tuple[Scalar, Scalar, Scalar, Scalar]:
    """One Adam step of the hyper-optimiser on log(alpha) or alpha (HANQ paper Eq. 5, Adam via Adam, §11).

    ``hypergrad`` is dL~/dalpha (Eq. 7); on the log scale the hyper-Adam sees ``alpha * dL~/dalpha``.
    Pure arithmetic on floats (one param group of :class:`HyperAdam`) or on tensors with one entry per
    population member (:mod:`sb3_hanq.population`), so both paths run exactly this code.

    :param step: the hyper-step count *after* this step (1 on the first), for the bias corrections
    :return: the new ``(log_lr_scale, lr_offset, exp_avg, exp_avg_sq)``
    """
    grad = hypergrad * lr if lr_parameterization == "log" else hypergrad
    delta, exp_avg, exp_avg_sq = adam_delta(grad, exp_avg, exp_avg_sq, step, hyper_lr, hyper_betas, hyper_eps)
    if lr_parameterization == "log":
        return log_lr_scale - delta, lr_offset, exp_avg, exp_avg_sq
    # keep alpha >= min_lr: the offset cannot go below what that allows
    offset = lr_offset - delta
    floor = min_lr - base_lr
    offset = th.maximum(offset, th.as_tensor(floor)) if isinstance(offset, th.Tensor) else max(offset, floor)  # type: ignore[call-overload]
    return log_lr_scale, offset, exp_avg, exp_avg_sq


class HyperAdam(Optimizer):
    r"""Adam with hypergradient descent on its learning rate (HANQ paper §3.3, §12; Chandra et al. 2019).

    Every group's learning rate ``alpha`` is adapted online. With ``hyper_lr=0`` this is exactly
    :class:`torch.optim.Adam` (tested to float precision over 50 steps).

    **Parameterisation of alpha** (``lr_parameterization``). The paper hyperoptimises "Adam via
    Adam" and tunes the hyper-learning rate kappa over 10^0 ... 10^-5 with 10^-1 best (Table 1).
    Adam's steps have magnitude ~kappa whatever the gradient scale, so with learning rates around
    10^-2.5 that range only makes sense for a *relative* update of alpha. The default ``"log"``
    therefore runs the hyper-Adam on ``log alpha`` (its gradient is ``alpha * dL~/dalpha``), which keeps
    alpha positive and makes kappa the per-step relative change. ``"linear"`` is the literal reading
    (Adam on alpha itself, Eq. 5), with alpha clipped at ``min_lr`` to stay positive.

    **Interaction with SB3 learning-rate schedules.** SB3's ``train()`` writes the schedule's value
    into ``param_groups[g]["lr"]`` on every call. The optimiser keeps the learned correction separately
    (``log_lr_scale`` for "log": alpha = schedule * exp(log_lr_scale); ``lr_offset`` for "linear":
    alpha = schedule + lr_offset) and, whenever it finds ``"lr"`` changed from the value it wrote
    itself, takes that value as the new schedule value. So a constant schedule leaves the adapted
    alpha untouched, and a decaying schedule multiplies (or shifts) it. ``param_groups[g]["lr"]``
    always reads the alpha in use. All of it, with the hyper-Adam moments, lives in the param
    groups, hence in ``state_dict()`` and SB3's ``save``/``load``.

    **Hyperobjective.** By default the hypergradient uses the training gradient (``p.grad``), i.e.
    L~ = L (Eq. 8), so any SB3 algorithm can use this optimiser through
    ``policy_kwargs=dict(optimizer_class=HyperAdam, optimizer_kwargs=dict(hyper_lr=...))``.
    A different hyperobjective gradient (HANQ's residual gradient, Eq. 9) is passed as
    ``step(hyper_grads=...)``, one tensor (or ``None``) per parameter in ``param_groups`` order.

    **Which hyperparameters** (``tune_betas``). §3.3 and §12 derive the hypergradient for alpha only, while §11
    says "we hyperoptimize Adam via Adam (Chandra et al., 2019)", whose hyperoptimisable Adam also learns beta1 and
    beta2. ``tune_betas=True`` is that reading: each beta takes a hyper-Adam step of size ``hyper_lr`` on
    ``atanh(2 beta - 1)`` along ``dL~(theta_i)/dbeta = grad L~(theta_i) . (-alpha du_{i-1}/dbeta)``
    (:func:`adam_step_with_beta_derivatives`), that logit kept within +-:data:`BETA_LOGIT_BOUND` (so beta2 never
    reaches 1, where Adam's step is undefined). ``param_groups[g]["betas"]`` reads the betas in use. With it,
    ``step(hyper_correction=...)`` is refused: pass the hyperobjective's whole gradient as ``hyper_grads``.

    :param params: parameters or parameter groups
    :param lr: initial learning rate alpha_0
    :param betas: Adam coefficients for the parameters
    :param eps: Adam epsilon for the parameters
    :param weight_decay: L2 penalty added to the gradient, as in ``torch.optim.Adam``
    :param hyper_lr: hyper-learning rate kappa (0 disables adaptation: plain Adam)
    :param hyper_betas: Adam coefficients of the hyper-optimiser
    :param hyper_eps: Adam epsilon of the hyper-optimiser
    :param lr_parameterization: ``"log"`` (default) or ``"linear"``, see above
    :param min_lr: lower bound on alpha for ``"linear"``
    :param tune_betas: also hyperoptimise Adam's betas (see above; needs ``hyper_lr > 0`` to have an effect)
    """

    def __init__(
        self,
        params: Iterable[th.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        hyper_lr: float = 0.0,
        hyper_betas: tuple[float, float] = (0.9, 0.999),
        hyper_eps: float = 1e-8,
        lr_parameterization: str = "log",
        min_lr: float = 1e-8,
        tune_betas: bool = False,
    ) -> None:
        # lr = 0 is allowed: SB3's BasePolicy.load rebuilds a saved policy with a learning rate of 0
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"Invalid learning rate lr={lr!r}: must be a float >= 0")
        if not (isinstance(hyper_lr, (int, float)) and hyper_lr >= 0):
            raise ValueError(f"Invalid hyper_lr={hyper_lr!r}: must be a float >= 0 (0 disables adaptation)")
        for name, b in (("betas", betas), ("hyper_betas", hyper_betas)):
            if not (len(b) == 2 and all(0.0 <= x < 1.0 for x in b)):
                raise ValueError(f"Invalid {name}={b!r}: expected two floats in [0, 1)")
        if eps < 0 or hyper_eps < 0 or weight_decay < 0:
            raise ValueError("eps, hyper_eps and weight_decay must be >= 0")
        if lr_parameterization not in LR_PARAMETERIZATIONS:
            raise ValueError(
                f"Invalid lr_parameterization={lr_parameterization!r}: expected one of {LR_PARAMETERIZATIONS}"
            )
        if min_lr <= 0:
            raise ValueError(f"Invalid min_lr={min_lr!r}: must be > 0")
        if not isinstance(tune_betas, bool):
            raise TypeError(f"Invalid tune_betas={tune_betas!r}: expected a bool")
        if tune_betas and not all(0.0 < x for x in betas):
            raise ValueError(f"Invalid betas={betas!r} with tune_betas=True: each must be in (0, 1)")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            hyper_lr=hyper_lr,
            hyper_betas=hyper_betas,
            hyper_eps=hyper_eps,
            lr_parameterization=lr_parameterization,
            min_lr=min_lr,
            tune_betas=tune_betas,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            self._init_hyper_state(group)

    @staticmethod
    def _init_hyper_state(group: dict[str, Any]) -> None:
        """Hyper-optimiser state, kept as plain floats in the group so ``state_dict()`` carries it."""
        group.setdefault("base_lr", float(group["lr"]))  # last value written by a schedule (SB3)
        group.setdefault("written_lr", float(group["lr"]))  # last alpha this optimiser wrote
        group.setdefault("log_lr_scale", 0.0)  # "log": alpha = base_lr * exp(log_lr_scale)
        group.setdefault("lr_offset", 0.0)  # "linear": alpha = base_lr + lr_offset
        group.setdefault("hyper_step", 0)
        group.setdefault("hyper_exp_avg", 0.0)
        group.setdefault("hyper_exp_avg_sq", 0.0)
        group.setdefault("hypergradient", 0.0)  # last dL~/dalpha, for logging and tests
        group.setdefault("tune_betas", False)  # (state dicts written before the option existed)
        if group["tune_betas"]:  # the betas' hyper-state: [beta1's, beta2's]
            group.setdefault("beta_logits", [float(beta_logit(b)) for b in group["betas"]])
            group.setdefault("hyper_beta_exp_avg", [0.0, 0.0])
            group.setdefault("hyper_beta_exp_avg_sq", [0.0, 0.0])
            group.setdefault("beta_hypergradients", [0.0, 0.0])  # last dL~/dbeta, for logging and tests

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._init_hyper_state(self.param_groups[-1])

    def _current_lr(self, group: dict[str, Any]) -> float:
        if group["lr"] != group["written_lr"]:  # a schedule (SB3's _update_learning_rate) wrote a new value
            group["base_lr"] = float(group["lr"])
        return float(
            learning_rate(
                group["base_lr"],
                group["log_lr_scale"],
                group["lr_offset"],
                group["lr_parameterization"],
                group["min_lr"],
            )
        )

    def _hyper_step(self, group: dict[str, Any], lr: float, hypergrad: float) -> float:
        """One Adam step of the hyper-optimiser on log(alpha) or alpha (Eq. 5); returns the new alpha."""
        group["hyper_step"] += 1
        (group["log_lr_scale"], group["lr_offset"], group["hyper_exp_avg"], group["hyper_exp_avg_sq"]) = (
            hyper_adam_update(
                hypergrad,
                lr,
                base_lr=group["base_lr"],
                log_lr_scale=group["log_lr_scale"],
                lr_offset=group["lr_offset"],
                exp_avg=group["hyper_exp_avg"],
                exp_avg_sq=group["hyper_exp_avg_sq"],
                step=group["hyper_step"],
                hyper_lr=group["hyper_lr"],
                hyper_betas=group["hyper_betas"],
                hyper_eps=group["hyper_eps"],
                lr_parameterization=group["lr_parameterization"],
                min_lr=group["min_lr"],
            )
        )
        try:
            lr = self._current_lr(group)
        except OverflowError:
            lr = math.inf
        if lr >= _MAX_LR:  # (a NaN hypergradient comes from non-finite gradients, which the caller reports)
            raise OverflowError(
                f"HyperAdam: the adapted learning rate overflowed ({lr:.3g} after hyper-step {group['hyper_step']}); "
                f"the gradients kept the same direction step after step. Lower hyper_lr (now {group['hyper_lr']:g})."
            )
        return lr

    @staticmethod
    def _beta_hyper_step(group: dict[str, Any], hypergrads: list[float]) -> None:
        """One hyper-Adam step on each beta's logit (``tune_betas``), after :meth:`_hyper_step` counted the step."""
        for k, hypergrad in enumerate(hypergrads):
            group["beta_logits"][k], group["hyper_beta_exp_avg"][k], group["hyper_beta_exp_avg_sq"][k] = (
                beta_logit_update(
                    hypergrad,
                    group["beta_logits"][k],
                    group["hyper_beta_exp_avg"][k],
                    group["hyper_beta_exp_avg_sq"][k],
                    group["hyper_step"],
                    group["hyper_lr"],
                    group["hyper_betas"],
                    group["hyper_eps"],
                )
            )
            group["beta_hypergradients"][k] = hypergrad
        group["betas"] = tuple(float(beta_from_logit(x)) for x in group["beta_logits"])

    def previous_updates(self) -> list[th.Tensor] | None:
        """u_{i-1}, the last Adam directions (one per parameter of the first group), or ``None`` before the
        first step with ``hyper_lr > 0``: the direction along which Eq. (7) differentiates."""
        updates = [self.state[p].get("prev_update") for p in self.param_groups[0]["params"]]
        return None if any(u is None for u in updates) else updates  # type: ignore[return-value]

    @th.no_grad()
    def step(  # type: ignore[override]
        self,
        closure: Callable[[], float] | None = None,
        hyper_grads: Sequence[th.Tensor | None] | None = None,
        hyper_correction: th.Tensor | float | None = None,
    ) -> float | None:
        """Update alpha by its hypergradient (Eqs. 5, 7), then take an Adam step with it (Eq. 6).

        :param closure: re-evaluates the model and returns the loss (as in ``torch.optim``)
        :param hyper_grads: gradient of the hyperobjective L~ at the current parameters, one entry per
            parameter in ``param_groups`` order; ``None`` uses the training gradient ``p.grad``.
        :param hyper_correction: added to ``grad L~ . u_{i-1}`` before the hyper-step: the part of the
            hyperobjective's directional derivative the caller computed itself (HANQ's residual-gradient term,
            from one forward-mode pass, :func:`sb3_hanq.common.q_learning.rg_directional_correction`). Only
            for a single param group.
        """
        loss = None
        if closure is not None:
            with th.enable_grad():
                loss = closure()
        all_params = [p for group in self.param_groups for p in group["params"]]
        if hyper_grads is not None and len(hyper_grads) != len(all_params):
            raise ValueError(
                f"hyper_grads has {len(hyper_grads)} entries, the optimiser has {len(all_params)} parameters"
            )
        if hyper_correction is not None and len(self.param_groups) != 1:
            raise ValueError("hyper_correction needs a single param group")
        if hyper_correction is not None and any(g["tune_betas"] for g in self.param_groups):
            raise ValueError(
                "tune_betas=True needs the hyperobjective's whole gradient as hyper_grads, not hyper_correction"
            )
        index = 0
        for group in self.param_groups:
            lr = self._current_lr(group)
            tune_betas = group["tune_betas"] and group["hyper_lr"] > 0
            hgs = hyper_grads[index : index + len(group["params"])] if hyper_grads is not None else None
            index += len(group["params"])
            # parameters taking a step, with their training and hyperobjective gradients
            active = [i for i, p in enumerate(group["params"]) if p.grad is not None]
            params = [group["params"][i] for i in active]
            if not params:
                continue
            grads = [p.grad for p in params]
            states = [self.state[p] for p in params]

            if group["hyper_lr"] > 0:
                # Eq. (7): dL~(theta_i)/dalpha = grad L~(theta_i) . (-u_{i-1}); no hyper-step before u_0 exists
                pairs: list[tuple[th.Tensor, th.Tensor]] = []
                for k, i in enumerate(active):
                    hyper_grad = hgs[i] if hgs is not None else None
                    if "prev_update" in states[k]:
                        pairs.append((grads[k] if hyper_grad is None else hyper_grad, states[k]["prev_update"]))
                if pairs:
                    products = th._foreach_mul([g for g, _ in pairs], [u for _, u in pairs])
                    directional = th.cat([t.reshape(-1) for t in products]).sum()
                    if hyper_correction is not None:
                        directional = directional + hyper_correction
                    group["hypergradient"] = -float(directional)
                    lr = self._hyper_step(group, lr, group["hypergradient"])
                    if tune_betas and all("prev_d_betas" in states[k] for k in range(len(active))):
                        # dL~/dbeta = grad L~(theta_i) . (-alpha du_{i-1}/dbeta), the alpha already in prev_d_betas
                        hyper_gradients = [g for g, _ in pairs]
                        hypergrads = []
                        for d in range(2):
                            products = th._foreach_mul(hyper_gradients, [st["prev_d_betas"][d] for st in states])
                            hypergrads.append(-float(th.cat([t.reshape(-1) for t in products]).sum()))
                        self._beta_hyper_step(group, hypergrads)
            group["lr"] = group["written_lr"] = lr
            beta1, beta2 = group["betas"]

            for state, p in zip(states, params):
                if "exp_avg" not in state:
                    state["step"] = 0  # a Python int: no device sync, no tensor shared through state_dict()
                    state["exp_avg"] = th.zeros_like(p, memory_format=th.preserve_format)
                    state["exp_avg_sq"] = th.zeros_like(p, memory_format=th.preserve_format)
                state["step"] += 1
            if group["weight_decay"] != 0:
                grads = list(th._foreach_add(grads, params, alpha=group["weight_decay"]))
            if tune_betas:  # the betas' derivatives too, parameter by parameter
                for state, p, grad in zip(states, params, grads):
                    update, d_beta1, d_beta2 = adam_step_with_beta_derivatives(
                        state["exp_avg"], state["exp_avg_sq"], grad, state["step"], beta1, beta2, group["eps"]
                    )
                    p.add_(update, alpha=-lr)
                    state["prev_update"] = update
                    state["prev_d_betas"] = (d_beta1.mul_(lr), d_beta2.mul_(lr))
                continue
            exp_avgs = [state["exp_avg"] for state in states]
            exp_avg_sqs = [state["exp_avg_sq"] for state in states]
            # Adam (Kingma & Ba 2014), same operations as torch.optim.Adam, batched over parameters
            adam_moments_(exp_avgs, exp_avg_sqs, grads, beta1, beta2)
            steps = [state["step"] for state in states]
            if group["hyper_lr"] > 0:
                updates = adam_directions(exp_avgs, exp_avg_sqs, steps, beta1, beta2, group["eps"])
                th._foreach_add_(params, updates, alpha=-lr)
                for state, update in zip(states, updates):
                    state["prev_update"] = update  # u_i, needed by the next hypergradient
            else:
                # kappa = 0: torch.optim.Adam's own arithmetic, p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
                bias_correction1, bias_correction2 = _bias_corrections(steps, beta1, beta2)
                denoms = _adam_denominators(exp_avg_sqs, bias_correction2, group["eps"])
                if isinstance(bias_correction1, float):
                    th._foreach_addcdiv_(params, exp_avgs, denoms, value=-lr / bias_correction1)
                else:
                    th._foreach_addcdiv_(params, exp_avgs, denoms, [-lr / bc for bc in bias_correction1])
        return loss
