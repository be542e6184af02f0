"""Leaky V-trace (STAC paper, Zahavy et al. 2020, §3.1 Eq. (5); supplementary §9.2 Algorithm 1, §10).

One pure function in the style of IMPALA's ``vtrace_from_importance_weights`` and rlax's ``vtrace``:
time-major ``[T, B]`` tensors in, a NamedTuple out.
"""

from __future__ import annotations

from typing import NamedTuple

import torch as th


class LeakyVTraceReturns(NamedTuple):
    """Output of :func:`leaky_vtrace`, both ``[T, B]``.

    :param vs: the leaky V-trace targets v_s of Eq. (5) (Alg. 1 line 14)
    :param pg_advantages: rho_s (r_s + gamma_s v_{s+1} - V(x_s)) (Alg. 1 line 20), with v_{T} = ``bootstrap_value``
    """

    vs: th.Tensor
    pg_advantages: th.Tensor


def _as_coefficient(name: str, value: float | th.Tensor, like: th.Tensor) -> th.Tensor:
    """A scalar or a tensor broadcastable to ``like`` ([T, B]); ``ValueError`` naming the argument otherwise."""
    if not isinstance(value, th.Tensor):
        return like.new_tensor(float(value))
    # Right-aligned broadcasting, checked by hand (th.broadcast_shapes is slow for a per-update check).
    shape, target = tuple(value.shape), tuple(like.shape)
    if len(shape) > len(target) or any(s not in (1, t) for s, t in zip(shape[::-1], target[::-1])):
        raise ValueError(f"{name} has shape {shape}, which does not broadcast to [T, B] = {target}")
    return value


#: Time steps solved at once by :func:`_backward_recursion` (its work and memory grow as chunk^2 * B).
_TIME_CHUNK = 32


def _backward_recursion(delta_t: th.Tensor, decay_t: th.Tensor, chunk: int = _TIME_CHUNK) -> th.Tensor:
    """e_t = delta_t + decay_t e_{t+1} with e_T = 0, for all t of ``[T, B]`` inputs (Alg. 1 lines 9-12).

    The same sums as the recursion, without a Python step per time step (each one is several autograd nodes):
    inside a chunk of K steps [a, b), e_s = sum_{k=s}^{b-1} (prod_{i=s}^{k-1} decay_i) delta_k
    + (prod_{i=s}^{b-1} decay_i) e_b, where all the products come from one cumulative product over a
    ``[K, K, B]`` tensor; chunks are visited backwards in time, e_b carried from one to the next.
    """
    n_steps = delta_t.shape[0]
    chunks: list[th.Tensor] = []
    carry: th.Tensor | None = None  # e_b: the first error of the chunk after the current one
    for end in range(n_steps, 0, -chunk):
        start = max(0, end - chunk)
        delta, decay = delta_t[start:end], decay_t[start:end]
        upper = th.ones(end - start, end - start, dtype=th.bool, device=delta.device).triu().unsqueeze(-1)
        # prods[s, k] = prod_{i=s}^{k} decay_i for k >= s (the factors i < s replaced by 1)
        prods = th.where(upper, decay.unsqueeze(0), th.ones_like(decay).unsqueeze(0)).cumprod(dim=1)
        # weights[s, k] = prod_{i=s}^{k-1} decay_i for k >= s (1 at k = s), 0 for k < s
        weights = th.where(upper, th.cat([th.ones_like(prods[:, :1]), prods[:, :-1]], dim=1), 0.0)
        errors = (weights * delta.unsqueeze(0)).sum(dim=1)
        if carry is not None:
            errors = errors + prods[:, -1] * carry
        carry = errors[0]
        chunks.append(errors)
    return chunks[0] if len(chunks) == 1 else th.cat(chunks[::-1], dim=0)


def leaky_vtrace(
    log_rhos: th.Tensor,
    discounts: th.Tensor,
    rewards: th.Tensor,
    values: th.Tensor,
    bootstrap_value: th.Tensor,
    alpha_rho: float | th.Tensor = 1.0,
    alpha_c: float | th.Tensor = 1.0,
    lambda_: float | th.Tensor = 1.0,
    clip_rho_threshold: float = 1.0,
    clip_c_threshold: float = 1.0,
) -> LeakyVTraceReturns:
    r"""Leaky V-trace targets and policy-gradient advantages (STAC paper Eq. (5), Alg. 1 lines 4-20).

    With IS_t = pi(a_t|x_t) / mu(a_t|x_t) (Alg. 1 line 4) and time indices as in rlax
    (``v_tm1`` = V(x_t), ``v_t`` = V(x_{t+1}), ``r_t``, ``discount_t`` = gamma_t)::

        rho_t   = alpha_rho min(rho_bar, IS_t) + (1 - alpha_rho) IS_t                  (Eq. 5; Alg. 1 line 6)
        c_t     = lambda (alpha_c min(c_bar, IS_t) + (1 - alpha_c) IS_t)                (Eq. 5; Alg. 1 line 5)
        delta_t = rho_t (r_t + gamma_t V(x_{t+1}) - V(x_t))                             (Alg. 1 line 7)
        e_t     = delta_t + gamma_t c_t e_{t+1},  e_T = 0                               (Alg. 1 lines 9-12)
        v_t     = V(x_t) + e_t                                                           (Alg. 1 line 14)
        A_t     = rho_t (r_t + gamma_t v_{t+1} - V(x_t)),  v_T = V(x_T) (bootstrap)      (Alg. 1 line 20)

    which unrolls to Eq. (5), v_s = V(x_s) + sum_t gamma^{t-s} (prod_{i=s}^{t-1} c_i) delta_t. alpha_rho =
    alpha_c = 1 gives V-trace (Espeholt et al., 2018, Eq. (1)); alpha = 0 gives per-decision importance
    sampling with the value as control variate. Theorem 1 (§10) needs alpha_rho >= alpha_c and
    rho_bar >= c_bar.

    Gradients. ``log_rhos`` (Alg. 1 line 4, sg(pi/mu)), ``values`` and ``bootstrap_value`` (line 7,
    sg(V)) are detached here. Gradients flow to ``discounts``, ``rewards``, ``lambda_``, ``alpha_rho`` and
    ``alpha_c``: in STAC these carry the metaparameters, and the inner policy loss (line 20) does *not*
    stop the gradient through v_{s+1}. Callers that need a constant advantage (the outer loss, line 22)
    detach ``pg_advantages``.

    :param log_rhos: log IS_t = log pi(a_t|x_t) - log mu(a_t|x_t), ``[T, B]``
    :param discounts: gamma_t, zero where the episode ends at step t, ``[T, B]``
    :param rewards: r_t, ``[T, B]``
    :param values: V(x_t), ``[T, B]``
    :param bootstrap_value: V(x_T), the value after the last step, ``[B]``
    :param alpha_rho: leaky coefficient of rho (1 = V-trace), a float or a tensor broadcastable to ``[T, B]``
    :param alpha_c: leaky coefficient of c (1 = V-trace); must be <= ``alpha_rho``
    :param lambda_: trace coefficient lambda, a float or a tensor broadcastable to ``[T, B]``
    :param clip_rho_threshold: rho_bar (1 in Alg. 2 line 3)
    :param clip_c_threshold: c_bar (1 in Alg. 2 line 3)
    :return: :class:`LeakyVTraceReturns` ``(vs, pg_advantages)``, both ``[T, B]``
    """
    if log_rhos.dim() != 2:
        raise ValueError(f"log_rhos must be time-major [T, B], got shape {tuple(log_rhos.shape)}")
    for name, tensor in (("discounts", discounts), ("rewards", rewards), ("values", values)):
        if tensor.shape != log_rhos.shape:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected [T, B] = {tuple(log_rhos.shape)} like log_rhos"
            )
    if bootstrap_value.shape != log_rhos.shape[1:]:
        raise ValueError(
            f"bootstrap_value has shape {tuple(bootstrap_value.shape)}, expected [B] = {tuple(log_rhos.shape[1:])}"
        )
    alpha_rho = _as_coefficient("alpha_rho", alpha_rho, log_rhos)
    alpha_c = _as_coefficient("alpha_c", alpha_c, log_rhos)
    lambda_ = _as_coefficient("lambda_", lambda_, log_rhos)
    if bool((alpha_rho < alpha_c).any()):
        raise ValueError(
            f"leaky V-trace needs alpha_rho >= alpha_c (Theorem 1), got alpha_rho={alpha_rho.tolist()}, "
            f"alpha_c={alpha_c.tolist()}"
        )
    if clip_rho_threshold < clip_c_threshold:
        raise ValueError(
            f"leaky V-trace needs clip_rho_threshold >= clip_c_threshold (Theorem 1), got "
            f"{clip_rho_threshold} < {clip_c_threshold}"
        )

    is_t = th.exp(log_rhos.detach())  # Alg. 1 line 4: sg(pi / mu)
    rho_t = alpha_rho * th.clamp(is_t, max=clip_rho_threshold) + (1 - alpha_rho) * is_t
    c_t = lambda_ * (alpha_c * th.clamp(is_t, max=clip_c_threshold) + (1 - alpha_c) * is_t)

    v_tm1 = values.detach()  # Alg. 1 line 7: sg(V(x_t)) ...
    v_t = th.cat([v_tm1[1:], bootstrap_value.detach().unsqueeze(0)], dim=0)  # ... and sg(V(x_{t+1}))
    delta_t = rho_t * (rewards + discounts * v_t - v_tm1)

    errors = _backward_recursion(delta_t, discounts * c_t)  # Alg. 1 lines 9-12
    vs = errors + v_tm1  # Alg. 1 line 14

    vs_t = th.cat([vs[1:], bootstrap_value.detach().unsqueeze(0)], dim=0)  # v_{s+1}, with v_T = V(x_T)
    pg_advantages = rho_t * (rewards + discounts * vs_t - v_tm1)  # Alg. 1 line 20
    return LeakyVTraceReturns(vs=vs, pg_advantages=pg_advantages)
