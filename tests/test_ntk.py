"""NTK math (PreQN paper §3-5) against independent computations: per-sample gradient loops, torch.func
Jacobians, numpy pseudo-inverses, first-order Taylor expansions; and the NTK diagnostics callback."""

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3 import DDPG, DQN, SAC, TD3
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from sb3_hanq.common.callbacks_ntk import NTKDiagnosticsCallback, bootstrap_targets
from sb3_hanq.common.ntk import (
    QFunction,
    backtracking_linesearch,
    batch_ntk,
    cosine_alignment,
    jacobian_ntk,
    largest_eigenvalue,
    mlp_ntk,
    mlp_weighted_gradient,
    ntk_diagonal,
    ntk_lstsq,
    ntk_row_ratio,
    plain_mlp_layers,
    preconditioned_direction,
)
from sb3_hanq.preqn import PreQN, Sin

ACTIVATIONS = {"sin": Sin, "relu": nn.ReLU, "tanh": nn.Tanh}


def _mlp(activation, sizes=(5, 16, 16, 1), dtype=th.float32, seed=0, bias=True):
    th.manual_seed(seed)
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers).to(dtype)


def _per_sample_gradients(q, params):
    """Phi^T: row i is grad_theta Q_i, by a Python loop over samples (the naive reference)."""
    rows = []
    for i in range(q.shape[0]):
        grads = th.autograd.grad(q[i], params, retain_graph=True, allow_unused=True)
        rows.append(th.cat([(th.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]))
    return th.stack(rows)


def _func_ntk(net, x):
    params = dict(net.named_parameters())
    return jacobian_ntk(lambda p, xi: th.func.functional_call(net, p, (xi[None],))[0, 0], params, x)


@pytest.mark.parametrize("activation", ["sin", "relu", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_layerwise_ntk_equals_jacobian_gram(activation, bias):
    x = th.randn(24, 5, generator=th.Generator().manual_seed(1))
    net = _mlp(activation, bias=bias)
    layerwise = mlp_ntk(net, x).kernel
    reference = _func_ntk(net, x)
    scale = reference.abs().max()
    assert th.allclose(layerwise, reference, rtol=0, atol=1e-5 * scale)  # float32: 1e-5 relative to max |K|
    # symmetric up to float32 rounding: a BLAS may accumulate K_ij and K_ji in different orders, and the default
    # rtol=1e-5 of a small off-diagonal entry is below its rounding error (|K32 - K64| reaches 1.7x it here)
    assert th.allclose(layerwise, layerwise.T, rtol=0, atol=1e-5 * scale)
    net64 = _mlp(activation, dtype=th.float64, bias=bias)
    x64 = x.double()
    assert th.allclose(mlp_ntk(net64, x64).kernel, _func_ntk(net64, x64), rtol=1e-12, atol=1e-12)
    # and both equal Phi^T Phi from a per-sample loop
    q = net64(x64)[:, 0]
    phi_t = _per_sample_gradients(q, list(net64.parameters()))
    assert th.allclose(mlp_ntk(net64, x64).kernel, phi_t @ phi_t.T, rtol=1e-12, atol=1e-12)


def test_layerwise_ntk_with_cotangents_selects_q_of_the_action():
    """DQN-style network with 3 outputs: Q_i = net(x_i)[a_i] through one-hot cotangents."""
    net = _mlp("relu", sizes=(4, 8, 3), dtype=th.float64)
    x = th.randn(10, 4, dtype=th.float64)
    actions = th.randint(0, 3, (10,))
    onehot = nn.functional.one_hot(actions, 3).double()
    result = mlp_ntk(net, x, onehot)
    q = net(x).gather(1, actions[:, None])[:, 0]
    assert th.allclose(result.output, q)
    phi_t = _per_sample_gradients(q, list(net.parameters()))
    assert th.allclose(result.kernel, phi_t @ phi_t.T, atol=1e-12)


def test_plain_mlp_detection():
    assert plain_mlp_layers(_mlp("sin")) is not None
    assert plain_mlp_layers(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 1))) is None
    assert plain_mlp_layers(nn.Linear(3, 1)) is None
    with pytest.raises(ValueError, match="plain MLP"):
        mlp_ntk(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)), th.randn(5, 3))
    with pytest.raises(ValueError, match="shape"):
        mlp_ntk(_mlp("sin"), th.randn(5, 3))
    with pytest.raises(ValueError, match="cotangents"):
        mlp_ntk(_mlp("relu", sizes=(5, 4, 2)), th.randn(5, 5))


def test_mlp_weighted_gradient_is_the_gradient_of_the_weighted_sum():
    net = _mlp("sin", dtype=th.float64)
    x = th.randn(12, 5, dtype=th.float64)
    w = th.randn(12, dtype=th.float64)
    result = mlp_ntk(net, x)
    manual = mlp_weighted_gradient(result.layers, result.layer_inputs, result.backward_signals, w)
    autograd = th.autograd.grad(net(x)[:, 0] @ w, list(net.parameters()))
    for a, b in zip(manual, autograd):
        assert th.allclose(a, b, atol=1e-12)


def _np_pinv_solve(kernel, delta):
    return np.linalg.pinv(kernel.double().numpy(), rcond=1e-10, hermitian=True) @ delta.double().numpy()


def test_lstsq_full_rank_and_rank_deficient():
    rng = th.Generator().manual_seed(0)
    # full rank: the exact solution
    a = th.randn(8, 20, generator=rng, dtype=th.float64)
    kernel, delta = a @ a.T, th.randn(8, generator=rng, dtype=th.float64)
    assert th.allclose(ntk_lstsq(kernel, delta), th.linalg.solve(kernel, delta), atol=1e-10)
    # rank 3 < n = 8 (more samples than parameters, §4): the minimum-norm least-squares solution
    a = th.randn(8, 3, generator=rng, dtype=th.float64)
    kernel = a @ a.T
    z = ntk_lstsq(kernel, delta)
    assert np.allclose(z.numpy(), _np_pinv_solve(kernel, delta), atol=1e-8)
    projection = a @ th.linalg.pinv(a)  # onto range(K)
    assert th.allclose(kernel @ z, projection @ delta, atol=1e-10)
    # float32, rank deficient: the round-off eigenvalues are cut, no blow-up
    z32 = ntk_lstsq(kernel.float(), delta.float())
    assert th.isfinite(z32).all()
    assert np.allclose(z32.double().numpy(), _np_pinv_solve(kernel, delta), rtol=1e-3, atol=1e-3 * z.abs().max().item())
    # duplicated samples make K exactly singular
    a = th.randn(4, 10, generator=rng)
    a = th.cat([a, a[:2]])
    z = ntk_lstsq(a @ a.T, th.randn(6, generator=rng))
    assert th.isfinite(z).all()
    with pytest.raises(ValueError, match="square"):
        ntk_lstsq(th.randn(3, 4), th.randn(3))
    with pytest.raises(ValueError, match="delta"):
        ntk_lstsq(th.eye(3), th.randn(4))


def test_lstsq_cholesky_is_the_ridge_solution_and_falls_back_to_eigh():
    rng = th.Generator().manual_seed(1)
    a = th.randn(8, 20, generator=rng, dtype=th.float64)
    kernel, delta = a @ a.T, th.randn(8, generator=rng, dtype=th.float64)
    lambda_max = np.linalg.eigvalsh(kernel.numpy())[-1]
    scale = largest_eigenvalue(kernel).item()  # power iteration: a lower bound, close to the top eigenvalue
    assert lambda_max * (1 - 1e-3) < scale <= lambda_max * (1 + 1e-12)
    # the ridge-regularised solution (K + rtol lambda_max I)^-1 Delta, against numpy's dense solve; rtol=None on a
    # full-rank K: the first ridge, eps * lambda_max, leaves the plain solve K^-1 Delta
    for rtol, ridge in ((None, 0.0), (1e-3, 1e-3 * scale), (1e-1, 1e-1 * scale)):
        expected = np.linalg.solve(kernel.numpy() + ridge * np.eye(8), delta.numpy())
        z = ntk_lstsq(kernel, delta, rtol=rtol, method="cholesky")
        assert np.allclose(z.numpy(), expected, rtol=1e-6, atol=1e-9)
    # duplicated samples (equal rows of K and equal TD errors): the same parameter step Phi Z and the same change
    # of Q, K Z, as the minimum-norm solution K^+ Delta, up to the ridge (Z itself may split differently between
    # duplicates: Phi cannot tell them apart)
    phi = th.randn(5, 12, generator=rng, dtype=th.float64)  # rows: per-sample gradients
    phi, delta = th.cat([phi, phi[:3]]), th.randn(5, generator=rng, dtype=th.float64)
    delta = th.cat([delta, delta[:3]])
    kernel = phi @ phi.T
    z = ntk_lstsq(kernel, delta, rtol=1e-12, method="cholesky")
    z_pinv = th.as_tensor(_np_pinv_solve(kernel, delta))
    assert th.allclose(phi.T @ z, phi.T @ z_pinv, atol=1e-6)
    assert th.allclose(kernel @ z, delta, atol=1e-6)  # Delta lies in K's range: Q moves by Delta
    # a numerically indefinite K cannot be factorised: the eigh solution instead
    indefinite = th.diag(th.tensor([2.0, 1.0, -0.5], dtype=th.float64))
    delta = th.tensor([1.0, 2.0, 3.0], dtype=th.float64)
    assert th.equal(ntk_lstsq(indefinite, delta, method="cholesky"), ntk_lstsq(indefinite, delta))
    assert th.allclose(ntk_lstsq(indefinite, delta), th.tensor([0.5, 2.0, 0.0], dtype=th.float64))
    with pytest.raises(ValueError, match=r"method='qr': expected one of \('eigh', 'cholesky'\)"):
        ntk_lstsq(kernel, delta[:3].repeat(3)[:8], method="qr")


def test_lstsq_cholesky_ridge_ladder(monkeypatch):
    """rtol=None: ridge eps * lambda_max first; when that factorisation fails, n eps * lambda_max; then eigh."""
    rng = th.Generator().manual_seed(2)
    a = th.randn(6, 9, generator=rng, dtype=th.float64)
    kernel, delta = a @ a.T, th.randn(6, generator=rng, dtype=th.float64)
    scale, eps = largest_eigenvalue(kernel).item(), th.finfo(th.float64).eps
    real_cholesky, ridges = th.linalg.cholesky_ex, []

    def failing_cholesky(matrix, fail_calls):
        ridges.append((th.diagonal(matrix) - th.diagonal(kernel)).mean().item())
        factor, info = real_cholesky(matrix)
        return factor, th.ones_like(info) if len(ridges) <= fail_calls else info

    monkeypatch.setattr(th.linalg, "cholesky_ex", lambda m: failing_cholesky(m, 1))
    z = ntk_lstsq(kernel, delta, method="cholesky")
    assert ridges == pytest.approx([eps * scale, 6 * eps * scale], rel=1e-9)
    expected = np.linalg.solve(kernel.numpy() + 6 * eps * scale * np.eye(6), delta.numpy())
    assert np.allclose(z.numpy(), expected, rtol=1e-9)
    ridges.clear()
    monkeypatch.setattr(th.linalg, "cholesky_ex", lambda m: failing_cholesky(m, 2))
    assert th.equal(ntk_lstsq(kernel, delta, method="cholesky"), ntk_lstsq(kernel, delta))
    assert len(ridges) == 2
    ridges.clear()  # a given rtol: one attempt only
    monkeypatch.setattr(th.linalg, "cholesky_ex", lambda m: failing_cholesky(m, 1))
    assert th.equal(ntk_lstsq(kernel, delta, rtol=1e-3, method="cholesky"), ntk_lstsq(kernel, delta))
    assert ridges == pytest.approx([1e-3 * scale], rel=1e-9)


@pytest.mark.skipif(not th.cuda.is_available(), reason="needs CUDA")
def test_lstsq_rank_deficient_on_cuda():
    a = th.randn(8, 3, dtype=th.float64)
    kernel, delta = a @ a.T, th.randn(8, dtype=th.float64)
    z = ntk_lstsq(kernel.cuda(), delta.cuda()).cpu()
    assert np.allclose(z.numpy(), _np_pinv_solve(kernel, delta), atol=1e-8)


@pytest.mark.parametrize("layerwise", [True, False])
@pytest.mark.parametrize("n", [6, 40])  # 40 > P = 5*4+4+4+1 = 29: K is rank deficient
def test_proposed_step_equals_phi_pinv_k_delta(layerwise, n):
    """Eqs. 22-23: sum_i Z_i grad Q_i with Z = K^+ Delta equals Phi K^+ Delta from a per-sample loop."""
    net = _mlp("sin", sizes=(5, 4, 1), dtype=th.float64, seed=3)
    params = list(net.parameters())
    x = th.randn(n, 5, dtype=th.float64, generator=th.Generator().manual_seed(4))
    delta = th.randn(n, dtype=th.float64, generator=th.Generator().manual_seed(5))
    if layerwise:
        ntk = mlp_ntk(net, x)
    else:  # the generic path: torch.func kernel, backward pass of sum_i Z_i Q_i
        q = net(x)[:, 0]
        ntk = mlp_ntk(net, x)._replace(kernel=_func_ntk(net, x), output=q, layers=None)
    direction, z = preconditioned_direction(ntk, params, delta, rtol=1e-10)
    phi_t = _per_sample_gradients(net(x)[:, 0], params).numpy()
    expected = phi_t.T @ _np_pinv_solve(th.as_tensor(phi_t @ phi_t.T), delta)
    assert np.allclose(th.cat([d.reshape(-1) for d in direction]).numpy(), expected, atol=1e-8)


def test_tiny_step_moves_q_by_step_size_times_delta():
    """Eq. 20: with K of full rank (n=16 < P), theta + alpha Phi K^+ Delta gives Q' - Q = alpha Delta + O(alpha^2)."""
    net = _mlp("sin", sizes=(5, 64, 64, 1), dtype=th.float64, seed=1)
    params = dict(net.named_parameters())
    x = th.randn(16, 5, dtype=th.float64, generator=th.Generator().manual_seed(2))
    delta = th.randn(16, dtype=th.float64, generator=th.Generator().manual_seed(3))
    ntk = mlp_ntk(net, x)
    direction, _ = preconditioned_direction(ntk, list(params.values()), delta)
    errors = []
    for alpha in (1e-4, 1e-6):
        moved = {k: p + alpha * d for (k, p), d in zip(params.items(), direction)}
        with th.no_grad():
            change = th.func.functional_call(net, moved, (x,))[:, 0] - ntk.output
        errors.append(((change - alpha * delta).norm() / (alpha * delta).norm()).item())
    # relative error of the linear model: measured 4.3e-4 at alpha=1e-4 and 4.3e-6 at alpha=1e-6
    assert errors[0] < 1e-3 and errors[1] < 1e-5
    assert errors[0] / errors[1] == pytest.approx(100, rel=0.05)  # the remainder is O(alpha^2)


def test_row_ratio_and_diagonal_match_naive_loops():
    kernel = th.randn(7, 7, dtype=th.float64)
    kernel = kernel @ kernel.T
    n = kernel.shape[0]
    naive = [sum(abs(kernel[i, j].item()) for j in range(n) if j != i) / n / kernel[i, i].item() for i in range(n)]
    assert np.allclose(ntk_row_ratio(kernel).numpy(), naive)
    assert np.allclose(ntk_diagonal(kernel).numpy(), [kernel[i, i].item() for i in range(n)])
    assert np.allclose(ntk_row_ratio(th.eye(4) * 3.0).numpy(), 0.0)  # tabular: no generalisation
    with pytest.raises(ValueError, match="square"):
        ntk_row_ratio(th.randn(2, 3))


def test_cosine_alignment():
    q = th.tensor([1.0, 2.0, 3.0])
    y = th.tensor([2.0, 2.0, 5.0])
    assert cosine_alignment(q, q + 0.1 * (y - q), y).item() == pytest.approx(1.0)
    assert cosine_alignment(q, q - (y - q), y).item() == pytest.approx(-1.0)
    change, wanted = np.array([0.5, -1.0, 2.0]), (y - q).numpy()
    expected = change @ wanted / np.linalg.norm(change) / np.linalg.norm(wanted)
    assert cosine_alignment(q, q + th.as_tensor(change, dtype=th.float32), y).item() == pytest.approx(expected)
    assert cosine_alignment(q, q, y).item() == 0.0  # no change
    with pytest.raises(ValueError, match="targets"):
        cosine_alignment(q, q, th.zeros(2))


def test_backtracking_linesearch():
    q, delta = th.zeros(3), th.tensor([1.0, 0.0, 0.0])
    calls = []

    def evaluate(alpha):  # aligned only for small steps (a curved model)
        calls.append(alpha)
        return th.tensor([alpha, alpha**2 * 100, 0.0])

    result = backtracking_linesearch(evaluate, q, delta, step_size=1.0, eta=0.99, factor=0.5, max_backtracks=10)
    # cos = 1 / sqrt(1 + (100 alpha)^2) >= 0.99 needs alpha <= 1.425e-3: 2^-10 = 9.8e-4 is the first
    assert result.accepted and result.backtracks == 10 and result.step_size == 2.0**-10
    assert result.alignment >= 0.99 and calls == [2.0**-k for k in range(11)]
    calls.clear()
    result = backtracking_linesearch(evaluate, q, delta, step_size=1.0, eta=0.99, factor=0.5, max_backtracks=3)
    assert not result.accepted and result.backtracks == 3 and result.step_size == 0.0 and result.q_after is None
    assert len(calls) == 4


def _features_extractor_with_parameters():
    class LinearExtractor(BaseFeaturesExtractor):
        def __init__(self, observation_space: gym.spaces.Box, features_dim: int = 4) -> None:
            super().__init__(observation_space, features_dim)
            self.linear = nn.Linear(int(np.prod(observation_space.shape)), features_dim)

        def forward(self, obs):
            return th.tanh(self.linear(obs))

    return LinearExtractor


@pytest.mark.parametrize("share", [False, True])
def test_sb3_critic_ntk_layerwise_jacobian_and_naive_agree(share):
    model = TD3("MlpPolicy", "Pendulum-v1", policy_kwargs=dict(net_arch=[8, 8], share_features_extractor=share))
    obs, actions = th.randn(10, 3), th.rand(10, 1) * 2 - 1
    q_fn = QFunction(model.critic, critic_index=1)
    assert q_fn.layerwise
    layerwise, jacobian = q_fn.ntk(obs, actions, "layerwise"), q_fn.ntk(obs, actions, "jacobian")
    q = model.critic(obs, actions)[1][:, 0]
    phi_t = _per_sample_gradients(q, list(model.critic.qf1.parameters()))
    assert th.allclose(layerwise, phi_t @ phi_t.T, atol=1e-5 * layerwise.abs().max())
    assert th.allclose(jacobian, layerwise, atol=1e-5 * layerwise.abs().max())
    assert th.allclose(batch_ntk(model, obs, actions, critic_index=1), layerwise)
    assert th.allclose(q_fn(obs, actions), q)


def test_sb3_critic_with_trainable_features_uses_the_jacobian_path():
    """A critic with its own trained features extractor: not a plain MLP, the generic torch.func path."""
    model = SAC(
        "MlpPolicy",
        "Pendulum-v1",
        policy_kwargs=dict(net_arch=[8], features_extractor_class=_features_extractor_with_parameters()),
    )
    obs, actions = th.randn(9, 3), th.rand(9, 1) * 2 - 1
    q_fn = QFunction(model.critic)
    assert not q_fn.layerwise and any("features_extractor" in name for name in q_fn.params)
    with pytest.raises(ValueError, match="layerwise"):
        q_fn.ntk(obs, actions, "layerwise")
    kernel = q_fn.ntk(obs, actions)
    q = model.critic(obs, actions)[0][:, 0]
    phi_t = _per_sample_gradients(q, list(q_fn.params.values()))
    assert th.allclose(kernel, phi_t @ phi_t.T, atol=1e-5 * kernel.abs().max())


def test_dqn_q_network_ntk():
    model = DQN("MlpPolicy", "CartPole-v1", policy_kwargs=dict(net_arch=[8]))
    obs, actions = th.randn(10, 4), th.randint(0, 2, (10, 1))
    kernel = batch_ntk(model, obs, actions)
    q = model.q_net(obs).gather(1, actions)[:, 0]
    phi_t = _per_sample_gradients(q, list(model.q_net.parameters()))
    assert th.allclose(kernel, phi_t @ phi_t.T, atol=1e-5 * kernel.abs().max())
    assert th.allclose(batch_ntk(model, obs, actions, method="jacobian"), kernel, atol=1e-5 * kernel.abs().max())
    with pytest.raises(ValueError, match="actions"):
        batch_ntk(model, obs)


def test_bootstrap_targets_by_hand():
    model = TD3("MlpPolicy", "Pendulum-v1", learning_starts=10, policy_kwargs=dict(net_arch=[8]), seed=0)
    model.learn(20)
    data = model.replay_buffer.sample(5)
    with th.no_grad():
        next_q = th.minimum(*model.critic_target(data.next_observations, model.actor_target(data.next_observations)))
    expected = data.rewards + 0.99 * (1 - data.dones) * next_q
    assert th.allclose(bootstrap_targets(model, data), expected[:, 0])
    dqn = DQN("MlpPolicy", "CartPole-v1", learning_starts=10, policy_kwargs=dict(net_arch=[8]), seed=0)
    dqn.learn(20)
    data = dqn.replay_buffer.sample(5)
    with th.no_grad():
        next_q = dqn.q_net_target(data.next_observations).max(dim=1).values
    assert th.allclose(bootstrap_targets(dqn, data), data.rewards[:, 0] + 0.99 * (1 - data.dones[:, 0]) * next_q)


def _params(model):
    return th.nn.utils.parameters_to_vector(model.policy.parameters())


@pytest.mark.parametrize(
    "cls, env",
    [(TD3, "Pendulum-v1"), (DDPG, "Pendulum-v1"), (SAC, "Pendulum-v1"), (DQN, "CartPole-v1"), (PreQN, "Pendulum-v1")],
)
def test_callback_logs_and_does_not_change_training(cls, env):
    def run(callback):
        kwargs = dict(train_freq=10) if cls is PreQN else {}
        model = cls(
            "MlpPolicy", env, learning_starts=50, batch_size=16, policy_kwargs=dict(net_arch=[16]), seed=0, **kwargs
        )
        model.learn(150, callback=callback)
        return model

    callback = NTKDiagnosticsCallback(n_samples=32, measure_freq=40)
    model = run(callback)
    assert th.equal(_params(model), _params(run(None)))  # same random streams: same training
    assert len(callback.row_ratios) >= 3 and len(callback.alignments) >= 2
    assert all(-1 <= a <= 1 for a in callback.alignments)
    assert all(r > 0 for r in callback.row_ratios) and all(d > 0 for d in callback.diagonals)


def test_callback_bad_input():
    with pytest.raises(ValueError, match="n_samples"):
        NTKDiagnosticsCallback(n_samples=1)
    with pytest.raises(ValueError, match="method"):
        NTKDiagnosticsCallback(method="exact")
    from stable_baselines3 import PPO

    with pytest.raises(ValueError, match="supports"):
        PPO("MlpPolicy", "CartPole-v1", n_steps=16, batch_size=16).learn(16, callback=NTKDiagnosticsCallback())
