"""leaky_vtrace against independent computations: a naive double loop of Eq. (5), IMPALA's recursive V-trace,
per-decision importance sampling, n-step returns, trace cutting at episode ends, finite differences; bad input."""

import numpy as np
import pytest
import torch as th

from sb3_hanq.common.vtrace import _backward_recursion, leaky_vtrace

T, B = 7, 3


def _inputs(seed=0, log_rho_scale=0.6, with_episode_end=True):
    rng = np.random.default_rng(seed)
    discounts = np.full((T, B), 0.9)
    if with_episode_end:
        discounts[2, 0] = 0.0
        discounts[5, 1] = 0.0
    return dict(
        log_rhos=rng.normal(scale=log_rho_scale, size=(T, B)),
        discounts=discounts,
        rewards=rng.normal(size=(T, B)),
        values=rng.normal(size=(T, B)),
        bootstrap_value=rng.normal(size=B),
    )


def _torch(inputs):
    return {k: th.as_tensor(v, dtype=th.float64) for k, v in inputs.items()}


def _naive_eq5(log_rhos, discounts, rewards, values, bootstrap_value, alpha_rho, alpha_c, lam, rho_bar, c_bar):
    """Eq. (5) term by term: v_s = V(x_s) + sum_{t>=s} (prod_{i=s}^{t-1} gamma_i c_i) delta_t, and the
    advantage rho_s (r_s + gamma_s v_{s+1} - V(x_s)) (Alg. 1 line 20), one (s, b) at a time."""
    n, m = rewards.shape
    is_ = np.exp(log_rhos)
    vs, adv = np.zeros((n, m)), np.zeros((n, m))
    for b in range(m):
        v = [*values[:, b], bootstrap_value[b]]
        rho = [alpha_rho * min(rho_bar, is_[t, b]) + (1 - alpha_rho) * is_[t, b] for t in range(n)]
        c = [lam * (alpha_c * min(c_bar, is_[t, b]) + (1 - alpha_c) * is_[t, b]) for t in range(n)]
        delta = [rho[t] * (rewards[t, b] + discounts[t, b] * v[t + 1] - v[t]) for t in range(n)]
        for s in range(n):
            total = 0.0
            for t in range(s, n):
                weight = 1.0
                for i in range(s, t):
                    weight *= discounts[i, b] * c[i]
                total += weight * delta[t]
            vs[s, b] = v[s] + total
        for s in range(n):
            v_next = vs[s + 1, b] if s + 1 < n else bootstrap_value[b]
            adv[s, b] = rho[s] * (rewards[s, b] + discounts[s, b] * v_next - v[s])
    return vs, adv


def test_matches_naive_eq5_on_random_inputs():
    for seed in range(3):
        inputs = _inputs(seed)
        coefs = dict(alpha_rho=0.7, alpha_c=0.4, lam=0.9, rho_bar=1.3, c_bar=0.8)
        expected_vs, expected_adv = _naive_eq5(**inputs, **coefs)
        out = leaky_vtrace(
            **_torch(inputs),
            alpha_rho=0.7,
            alpha_c=0.4,
            lambda_=0.9,
            clip_rho_threshold=1.3,
            clip_c_threshold=0.8,
        )
        np.testing.assert_allclose(out.vs.numpy(), expected_vs, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(out.pg_advantages.numpy(), expected_adv, rtol=1e-10, atol=1e-10)


def test_tensor_coefficients_per_column_match_scalar_calls():
    inputs = _torch(_inputs(1))
    alpha = th.tensor([[0.2, 0.6, 1.0]], dtype=th.float64)
    lam = th.tensor([[0.5, 0.9, 1.0]], dtype=th.float64)
    out = leaky_vtrace(**inputs, alpha_rho=alpha, alpha_c=alpha, lambda_=lam)
    for b in range(B):
        column = {k: (v[:, b : b + 1] if v.dim() == 2 else v[b : b + 1]) for k, v in inputs.items()}
        ref = leaky_vtrace(**column, alpha_rho=alpha[0, b].item(), alpha_c=alpha[0, b].item(), lambda_=lam[0, b].item())
        th.testing.assert_close(out.vs[:, b : b + 1], ref.vs)
        th.testing.assert_close(out.pg_advantages[:, b : b + 1], ref.pg_advantages)


def _impala_vtrace(log_rhos, discounts, rewards, values, bootstrap_value, lam=1.0):
    """V-trace (Espeholt et al., 2018, Eq. (1) and its recursive form v_s = V(x_s) + delta_s + gamma_s c_s
    (v_{s+1} - V(x_{s+1}))) with rho = min(1, IS), c = lambda min(1, IS)."""
    is_ = np.exp(log_rhos)
    rho, c = np.minimum(1.0, is_), lam * np.minimum(1.0, is_)
    vs = np.zeros_like(values)
    next_vs, next_value = bootstrap_value, bootstrap_value
    for t in reversed(range(len(rewards))):
        delta = rho[t] * (rewards[t] + discounts[t] * next_value - values[t])
        vs[t] = values[t] + delta + discounts[t] * c[t] * (next_vs - next_value)
        next_vs, next_value = vs[t], values[t]
    vs_next = np.concatenate([vs[1:], bootstrap_value[None]])
    return vs, rho * (rewards + discounts * vs_next - values)


def test_alpha_one_is_vtrace():
    for lam in (1.0, 0.8):
        inputs = _inputs(2)
        expected_vs, expected_adv = _impala_vtrace(**inputs, lam=lam)
        out = leaky_vtrace(**_torch(inputs), alpha_rho=1.0, alpha_c=1.0, lambda_=lam)
        np.testing.assert_allclose(out.vs.numpy(), expected_vs, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(out.pg_advantages.numpy(), expected_adv, rtol=1e-10, atol=1e-10)


def test_alpha_zero_is_importance_sampling():
    inputs = _inputs(3, log_rho_scale=0.8)
    assert inputs["log_rhos"].max() > 0.5  # some ratios well above the clipping threshold
    out = leaky_vtrace(**_torch(inputs), alpha_rho=0.0, alpha_c=0.0)

    # Per-decision importance sampling with the value as control variate (Sutton & Barto, 2018, Eq. (7.13)):
    # G_s = IS_s (r_s + gamma_s G_{s+1}) + (1 - IS_s) V(x_s), G_T = V(x_T).
    is_ = np.exp(inputs["log_rhos"])
    expected = np.zeros((T, B))
    g = inputs["bootstrap_value"]
    for s in reversed(range(T)):
        g = is_[s] * (inputs["rewards"][s] + inputs["discounts"][s] * g) + (1 - is_[s]) * inputs["values"][s]
        expected[s] = g
    np.testing.assert_allclose(out.vs.numpy(), expected, rtol=1e-10, atol=1e-10)

    # With zero values: the per-decision importance-sampled n-step return sum_t gamma^{t-s} (prod_{i<=t} IS_i) r_t.
    zero = dict(inputs, values=np.zeros((T, B)), bootstrap_value=np.zeros(B), discounts=np.full((T, B), 0.9))
    out = leaky_vtrace(**_torch(zero), alpha_rho=0.0, alpha_c=0.0)
    for s in range(T):
        expected_s = sum(0.9 ** (t - s) * np.prod(is_[s : t + 1], axis=0) * zero["rewards"][t] for t in range(s, T))
        np.testing.assert_allclose(out.vs[s].numpy(), expected_s, rtol=1e-10, atol=1e-10)


def test_unit_ratios_give_n_step_returns():
    inputs = _inputs(4, with_episode_end=False)
    inputs["log_rhos"] = np.zeros((T, B))
    r, v_boot, gamma = inputs["rewards"], inputs["bootstrap_value"], 0.9
    expected = np.stack(
        [sum(gamma ** (j - s) * r[j] for j in range(s, T)) + gamma ** (T - s) * v_boot for s in range(T)]
    )
    for alpha in (1.0, 0.3, 0.0):  # alpha does not matter on-policy
        out = leaky_vtrace(**_torch(inputs), alpha_rho=alpha, alpha_c=alpha)
        np.testing.assert_allclose(out.vs.numpy(), expected, rtol=1e-10, atol=1e-10)
        # On-policy advantage: r_s + gamma v_{s+1} - V(x_s), with v_{s+1} the (s+1)-step return.
        next_returns = np.concatenate([expected[1:], v_boot[None]])
        np.testing.assert_allclose(out.pg_advantages.numpy(), r + gamma * next_returns - inputs["values"], atol=1e-10)


def test_episode_end_cuts_the_traces():
    inputs = _inputs(5, with_episode_end=False)
    inputs["discounts"][3, :] = 0.0  # every episode ends at step 3
    out = leaky_vtrace(**_torch(inputs), alpha_rho=0.5, alpha_c=0.5, lambda_=0.9)

    # Nothing after the end reaches the targets before it ...
    changed = dict(inputs)
    changed["rewards"] = inputs["rewards"].copy()
    changed["rewards"][4:] += 10.0
    changed["values"] = inputs["values"].copy()
    changed["values"][4:] -= 5.0
    changed["bootstrap_value"] = inputs["bootstrap_value"] + 3.0
    out2 = leaky_vtrace(**_torch(changed), alpha_rho=0.5, alpha_c=0.5, lambda_=0.9)
    th.testing.assert_close(out.vs[:4], out2.vs[:4])
    th.testing.assert_close(out.pg_advantages[:4], out2.pg_advantages[:4])
    assert not th.allclose(out.vs[4:], out2.vs[4:])

    # ... and on-policy the targets before it are the discounted returns up to the end.
    inputs["log_rhos"] = np.zeros((T, B))
    out = leaky_vtrace(**_torch(inputs))
    r = inputs["rewards"]
    for s in range(4):
        np.testing.assert_allclose(out.vs[s].numpy(), sum(0.9 ** (j - s) * r[j] for j in range(s, 4)), atol=1e-10)


def test_gradients_match_finite_differences():
    inputs = _torch(_inputs(6))
    rng = np.random.default_rng(0)
    w_vs = th.as_tensor(rng.normal(size=(T, B)))
    w_adv = th.as_tensor(rng.normal(size=(T, B)))

    def objective(discounts, lam, alpha_rho, alpha_c):
        kw = dict(inputs, discounts=discounts)
        out = leaky_vtrace(**kw, alpha_rho=alpha_rho, alpha_c=alpha_c, lambda_=lam, clip_c_threshold=0.9)
        return (w_vs * out.vs).sum() + (w_adv * out.pg_advantages).sum()

    discounts = inputs["discounts"].clone().requires_grad_(True)
    scalars = [th.tensor(x, dtype=th.float64, requires_grad=True) for x in (0.8, 0.7, 0.4)]
    grads = th.autograd.grad(objective(discounts, *scalars), [discounts, *scalars])

    h = 1e-6
    with th.no_grad():
        fd = th.zeros(T, B, dtype=th.float64)
        for t in range(T):
            for b in range(B):
                plus, minus = inputs["discounts"].clone(), inputs["discounts"].clone()
                plus[t, b] += h
                minus[t, b] -= h
                fd[t, b] = (objective(plus, *scalars) - objective(minus, *scalars)) / (2 * h)
        th.testing.assert_close(grads[0], fd, rtol=1e-6, atol=1e-7)
        for k in range(3):
            plus = [s.detach() + (h if j == k else 0.0) for j, s in enumerate(scalars)]
            minus = [s.detach() - (h if j == k else 0.0) for j, s in enumerate(scalars)]
            fd_k = (objective(inputs["discounts"], *plus) - objective(inputs["discounts"], *minus)) / (2 * h)
            th.testing.assert_close(grads[k + 1], fd_k, rtol=1e-6, atol=1e-7)
    assert grads[0].abs().sum() > 0 and all(g.abs() > 0 for g in grads[1:])


def test_chunked_recursion_matches_the_step_by_step_recursion():
    # leaky_vtrace solves e_t = delta_t + decay_t e_{t+1} (Alg. 1 lines 9-12) in chunks of time steps; every chunk
    # size, with zeros (episode ends) inside and at chunk borders, gives the recursion's values and gradients.
    rng = np.random.default_rng(9)
    n_steps, n_batch = 10, 3
    delta = th.as_tensor(rng.normal(size=(n_steps, n_batch)), dtype=th.float64).requires_grad_(True)
    decay_np = rng.uniform(0.5, 1.0, size=(n_steps, n_batch))
    decay_np[[2, 6, 9], [0, 1, 2]] = 0.0
    decay = th.as_tensor(decay_np).requires_grad_(True)
    weights = th.as_tensor(rng.normal(size=(n_steps, n_batch)))

    errors, acc = [], th.zeros(n_batch, dtype=th.float64)
    for t in reversed(range(n_steps)):
        acc = delta[t] + decay[t] * acc
        errors.insert(0, acc)
    expected = th.stack(errors)
    expected_grads = th.autograd.grad((weights * expected).sum(), [delta, decay])
    for chunk in (1, 3, 4, 10, 32):
        got = _backward_recursion(delta, decay, chunk=chunk)
        th.testing.assert_close(got, expected, msg=f"chunk={chunk}")
        for g, e in zip(th.autograd.grad((weights * got).sum(), [delta, decay]), expected_grads):
            th.testing.assert_close(g, e, msg=f"chunk={chunk}")


def test_no_gradient_through_values_or_ratios():
    inputs = {k: v.requires_grad_(True) for k, v in _torch(_inputs(7)).items()}
    out = leaky_vtrace(**inputs, alpha_rho=0.5, alpha_c=0.5)
    grads = th.autograd.grad(
        (out.vs.sum() + out.pg_advantages.sum()),
        [inputs["values"], inputs["bootstrap_value"], inputs["log_rhos"], inputs["rewards"]],
        allow_unused=True,
    )
    assert grads[0] is None and grads[1] is None and grads[2] is None  # Alg. 1 lines 4 and 7
    assert grads[3] is not None


def test_bad_input():
    inputs = _torch(_inputs(8))
    with pytest.raises(ValueError, match="alpha_rho >= alpha_c"):
        leaky_vtrace(**inputs, alpha_rho=0.3, alpha_c=0.5)
    with pytest.raises(ValueError, match="alpha_rho >= alpha_c"):
        leaky_vtrace(**inputs, alpha_rho=th.tensor([[1.0, 0.2, 1.0]]), alpha_c=th.tensor([[1.0, 0.5, 1.0]]))
    for name in ("discounts", "rewards", "values"):
        with pytest.raises(ValueError, match=name):
            leaky_vtrace(**dict(inputs, **{name: inputs[name][:-1]}))
    with pytest.raises(ValueError, match="bootstrap_value"):
        leaky_vtrace(**dict(inputs, bootstrap_value=inputs["bootstrap_value"][:-1]))
    with pytest.raises(ValueError, match="log_rhos"):
        leaky_vtrace(**dict(inputs, log_rhos=inputs["log_rhos"][0]))
    with pytest.raises(ValueError, match="lambda_"):
        leaky_vtrace(**inputs, lambda_=th.ones(T + 1, B))
    with pytest.raises(ValueError, match="clip_rho_threshold >= clip_c_threshold"):
        leaky_vtrace(**inputs, clip_rho_threshold=0.5, clip_c_threshold=1.0)
