"""STAC / STACX against hand computations (an A2C/V-trace RMSProp step, finite-difference metagradients,
the squashed Gaussian), invariants (on-policy ratios, time limits), save/load, determinism, learning, bad input."""

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.distributions import SquashedDiagGaussianDistribution
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import FakeImageEnv, SimpleMultiObsEnv
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.logger import Logger, configure
from stable_baselines3.common.sb2_compat.rmsprop_tf_like import RMSpropTFLike

from sb3_hanq.stac import META_NAMES, STAC, STACX

ENV = "CartPole-v1"
SMALL = dict(net_arch=[8], head_arch=[8])


def _small(cls=STAC, env=ENV, n_envs=2, **kwargs):
    kwargs.setdefault("policy_kwargs", SMALL)
    kwargs.setdefault("n_steps", 5)
    kwargs.setdefault("seed", 0)
    model = cls("MlpPolicy", make_vec_env(env, n_envs=n_envs, seed=0), **kwargs)
    model.set_logger(Logger(folder=None, output_formats=[]))
    return model


def _head1(policy, obs):
    """Logits and values of head 1, from the modules themselves (not through STACPolicy.heads)."""
    net = policy.net
    latent = net.torso(obs)
    return net.policy_heads[0](latent), net.value_heads[0](latent).squeeze(-1)


def _fixed_rollout(model, seed=0, with_timeout=True):
    """Fill the rollout buffer with a fixed off-policy rollout: random observations, actions and rewards, an
    episode end inside it, one time-limit truncation (recorded as SB3 + STAC record it) and behaviour
    log-probabilities that differ from the current policy's, so that importance ratios are not 1."""
    rng = np.random.default_rng(seed)
    buf = model.rollout_buffer
    n_steps, n_envs = buf.buffer_size, buf.n_envs
    buf.reset()
    model._reset_timeouts()
    buf.observations[:] = rng.normal(size=buf.observations.shape)
    buf.actions[:] = rng.integers(0, 2, size=buf.actions.shape)
    buf.rewards[:] = rng.normal(size=(n_steps, n_envs))
    buf.episode_starts[:] = 0.0
    buf.episode_starts[2, 0] = 1.0  # env 0: the episode terminates at step 1
    obs = th.as_tensor(buf.observations.reshape(n_steps * n_envs, -1))
    with th.no_grad():
        logits, _ = _head1(model.policy, obs)
    log_pi = th.log_softmax(logits, -1).gather(1, th.as_tensor(buf.actions.reshape(-1, 1)).long()).squeeze(1)
    buf.log_probs[:] = log_pi.numpy().reshape(n_steps, n_envs) + rng.normal(scale=0.3, size=(n_steps, n_envs))
    buf.pos, buf.full = n_steps, True
    model._last_obs = rng.normal(size=(n_envs, 4)).astype(np.float32)
    model._last_episode_starts = np.array([True] + [False] * (n_envs - 1))  # env 0 also ends at the last step
    terminal = None
    if with_timeout:  # env 1 is truncated at step 3: SB3 added gamma^outer V(x_terminal) to its reward
        terminal = rng.normal(size=4).astype(np.float32)
        buf.episode_starts[4, 1] = 1.0
        with th.no_grad():
            v_terminal = _head1(model.policy, th.as_tensor(terminal[None]))[1].item()
        model._timeout_index.append(3 * n_envs + 1)
        model._timeout_obs.append(terminal)
        model._timeout_bonus[3, 1] = model.gamma * v_terminal
        buf.rewards[3, 1] += model._timeout_bonus[3, 1]
    return terminal


def _vtrace_numpy(log_rhos, discounts, rewards, values, bootstrap):
    """IMPALA's V-trace (rho = c = min(1, IS), lambda = 1) by its recursion, and the advantages."""
    is_ = np.exp(log_rhos)
    rho = np.minimum(1.0, is_)
    vs = np.zeros_like(values)
    next_vs, next_value = bootstrap, bootstrap
    for t in reversed(range(len(rewards))):
        vs[t] = values[t] + rho[t] * (rewards[t] + discounts[t] * next_value - values[t])
        vs[t] += discounts[t] * rho[t] * (next_vs - next_value)
        next_vs, next_value = vs[t], values[t]
    vs_next = np.concatenate([vs[1:], bootstrap[None]])
    return vs, rho * (rewards + discounts * vs_next - values)


def test_theta_update_without_self_tuning_is_a_hand_computed_vtrace_rmsprop_step():
    model = _small(self_tune=(), learning_rate=0.05, n_steps=6, n_envs=3)
    terminal = _fixed_rollout(model)
    hand = copy.deepcopy(model.policy)
    initial = [p.detach().clone() for p in model.policy.parameters()]
    buf = model.rollout_buffer
    n_steps, n_envs = buf.buffer_size, buf.n_envs
    model.train()

    # By hand: raw rewards, V-trace targets on [T, N] data, IMPALA's summed loss (Eq. (1) with the outer
    # coefficients 0.25 / 1 / 0.01), one RMSProp step (decay 0.99, eps 0.1 inside the root, second moment from 0).
    obs = th.as_tensor(buf.observations.reshape(n_steps * n_envs, -1))
    actions = th.as_tensor(buf.actions.reshape(-1)).long()
    logits, values = _head1(hand, obs)
    log_pi = th.log_softmax(logits, -1).gather(1, actions[:, None]).squeeze(1)
    entropy = -(th.softmax(logits, -1) * th.log_softmax(logits, -1)).sum(-1)
    with th.no_grad():
        v = values.reshape(n_steps, n_envs).double().numpy()
        bootstrap = _head1(hand, th.as_tensor(model._last_obs))[1].double().numpy()
        v_terminal = _head1(hand, th.as_tensor(terminal[None]))[1].item()
    rewards = buf.rewards.astype(np.float64)
    rewards[3, 1] += -model._timeout_bonus[3, 1] + 0.99 * v_terminal  # the same here: theta did not change
    dones = np.zeros((n_steps, n_envs))
    dones[1, 0] = dones[3, 1] = dones[n_steps - 1, 0] = 1.0
    log_rhos = log_pi.detach().reshape(n_steps, n_envs).double().numpy() - buf.log_probs
    vs, adv = _vtrace_numpy(log_rhos, 0.99 * (1 - dones), rewards, v, bootstrap)
    loss = (
        0.25 * ((th.as_tensor(vs).float().reshape(-1) - values) ** 2).sum()
        - (th.as_tensor(adv).float().reshape(-1) * log_pi).sum()
        - 0.01 * entropy.sum()
    )
    optimizer = RMSpropTFLike(hand.parameters(), lr=0.05, alpha=0.99, eps=0.1)
    for p in hand.parameters():
        optimizer.state[p] = {"step": 0, "square_avg": th.zeros_like(p)}
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    for (name, expected), actual in zip(hand.named_parameters(), model.policy.parameters()):
        th.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=name)
    assert all(not th.allclose(p, p0) for p, p0 in zip(model.policy.parameters(), initial))  # every tensor moved
    th.testing.assert_close(
        model.policy.optimizer.state[next(model.policy.parameters())]["square_avg"],
        optimizer.state[next(hand.parameters())]["square_avg"],
    )


def test_theta_takes_the_inner_step_with_the_pre_update_metaparameters():
    model = _small(cls=STACX, learning_rate=0.05)
    _fixed_rollout(model)
    batch = model._rollout_batch()
    params = dict(model.policy.net.named_parameters())
    expected = {
        k: v.detach().clone() for k, v in model.inner_step(params, batch, create_graph=False).new_params.items()
    }
    eta = model.eta.detach().clone()
    model.train()
    assert not th.equal(model.eta, eta)  # the metaparameters moved ...
    for name, param in model.policy.net.named_parameters():  # ... after theta took the step computed with eta_t
        th.testing.assert_close(param, expected[name], msg=name)


def test_metagradient_matches_finite_differences(monkeypatch):
    # Double precision throughout; CartPole's preprocessing is a cast to float32, replaced by the identity.
    monkeypatch.setattr("sb3_hanq.stac.policies.preprocess_obs", lambda obs, *args, **kwargs: obs)
    model = _small(cls=STACX, n_heads=2, learning_rate=0.1, kl_coef=0.7, max_grad_norm=50.0)
    _fixed_rollout(model)
    batch = model._rollout_batch()
    batch = batch._replace(
        **{k: getattr(batch, k).double() for k in ("observations", "rewards", "not_done", "behaviour_log_probs")}
    )
    model.policy.double()
    rng = np.random.default_rng(0)
    for p in model.policy.parameters():  # a non-trivial RMSProp state
        model.policy.optimizer.state[p]["square_avg"] = th.as_tensor(rng.uniform(0.0, 0.5, size=p.shape))
    model.eta.data = th.as_tensor(rng.uniform(-1.0, 2.0, size=model.eta.shape))  # away from saturation
    params = dict(model.policy.net.named_parameters())

    # The metagradient is (d theta'/d eta)^T u, with u the gradient of the outer pseudo-loss (Alg. 1 with its
    # stop-gradients) at theta'. Finite differences of the outer loss *value* would also differentiate through the
    # stopped targets, so we difference <u, theta'(eta)> with u held fixed: that checks the differentiation through
    # the inner RMSProp step (Alg. 2 lines 10-13), the part STAC builds itself.
    eta0 = model.eta.detach().clone()
    inner = model.inner_step(params, batch, create_graph=True)
    (grad,) = th.autograd.grad(model.outer_loss(inner.new_params, batch, inner.outputs)[0], [model.eta])
    theta_prime = {k: v.detach().requires_grad_(True) for k, v in inner.new_params.items()}
    u = th.autograd.grad(
        model.outer_loss(theta_prime, batch, inner.outputs)[0], list(theta_prime.values()), allow_unused=True
    )
    u = [th.zeros_like(v) if u_k is None else u_k for u_k, v in zip(u, theta_prime.values())]  # heads 2.. unused

    def projected_step(eta_value):
        model.eta.data = eta_value
        new_params = model.inner_step(params, batch, create_graph=False).new_params
        return sum((u_k * v).sum() for u_k, v in zip(u, new_params.values())).item()

    h = 1e-6
    fd = th.zeros_like(eta0)
    for idx in np.ndindex(*eta0.shape):
        plus, minus = eta0.clone(), eta0.clone()
        plus[idx] += h
        minus[idx] -= h
        fd[idx] = (projected_step(plus) - projected_step(minus)) / (2 * h)
    # central differences of a float64 value f lose about eps * |f| / h to rounding (1.7e-9 here): the tolerance
    rounding = 4 * np.finfo(np.float64).eps * abs(projected_step(eta0)) / h
    th.testing.assert_close(grad, fd, rtol=1e-6, atol=rounding)
    assert (grad.abs() > 1e-6).sum() >= 10  # gamma, lambda, alpha, g_v, g_p, g_e of both heads all move it


def test_on_policy_importance_ratios_are_one():
    for env in (ENV, "Pendulum-v1"):
        model = _small(env=env, n_steps=8)
        _, callback = model._setup_learn(16)
        model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
        batch = model._rollout_batch()
        out = model.head_outputs(dict(model.policy.net.named_parameters()), batch)
        th.testing.assert_close(out.log_probs[0], batch.behaviour_log_probs, rtol=1e-5, atol=1e-5)


def test_squashed_gaussian_log_prob_and_kl_to_standard_gaussian():
    model = _small(env="Pendulum-v1")
    policy = model.policy
    rng = np.random.default_rng(0)
    policy_out = th.as_tensor(rng.normal(size=(5, 2)), dtype=th.float32)
    dist = policy.distribution(policy_out)
    s_min, s_max = policy.log_std_bounds
    y_mu, y_sigma = policy_out[:, :1], policy_out[:, 1:]
    mean, log_std = th.tanh(y_mu), s_min + 0.5 * (s_max - s_min) * (th.tanh(y_sigma) + 1)  # §9.3
    th.testing.assert_close(dist.loc, mean)
    th.testing.assert_close(dist.scale, log_std.exp())
    actions = th.as_tensor(rng.uniform(-0.99, 0.99, size=(5, 1)), dtype=th.float32)
    sb3 = SquashedDiagGaussianDistribution(1).proba_distribution(mean, log_std)
    th.testing.assert_close(policy.log_prob(policy_out, actions), sb3.log_prob(actions))
    std = log_std.exp()
    kl_standard = (-log_std + (std**2 + mean**2) / 2 - 0.5).sum(-1)
    th.testing.assert_close(policy.regulariser(policy_out), -kl_standard)
    actions = policy.sample(policy_out)
    assert actions.shape == (5, 1) and bool((actions.abs() <= 1).all())


def test_time_limit_bootstrap_is_removed_from_rewards():
    env = make_vec_env(ENV, n_envs=2, seed=0, env_kwargs=dict(max_episode_steps=3))
    model = STAC("MlpPolicy", env, n_steps=8, seed=0, policy_kwargs=SMALL)
    model.set_logger(Logger(folder=None, output_formats=[]))
    _, callback = model._setup_learn(16)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    assert len(model._timeout_index) >= 4
    assert not np.allclose(model.rollout_buffer.rewards, 1.0)  # SB3's bootstrap is in the stored rewards ...
    batch = model._rollout_batch()
    th.testing.assert_close(batch.rewards, th.ones_like(batch.rewards))  # ... STAC removes it (CartPole: r = 1)
    flat_not_done = batch.not_done.reshape(-1)
    assert bool((flat_not_done[batch.timeout_index] == 0).all())
    model.train()


def test_stacx_logs_and_metaparameters():
    model = _small(cls=STACX, n_epochs=2)
    model.set_logger(configure(None, ["csv"]))
    model.learn(30)
    logged = model.logger.name_to_value
    for key in ("train/outer_loss", "train/kl", "train/loss", "train/policy_loss", "train/value_loss"):
        assert key in logged
    for prefix in ("meta/", "meta/head2/", "meta/head3/"):
        for name in META_NAMES:
            assert prefix + name in logged
    assert logged["meta/g_v"] == pytest.approx(model.metaparameters["g_v"][0])
    assert model.eta.shape == (3, 6)
    assert model.n_heads == 3 and len(model.policy.net.policy_heads) == 3


def test_self_tune_subset_keeps_other_values_at_outer():
    model = _small(self_tune=("gamma", "g_e"), gamma=0.95, gae_lambda=0.9)
    _fixed_rollout(model)
    model.train()
    meta = model.metaparameters
    assert meta["lambda"] == [pytest.approx(0.9)] and meta["alpha"] == [1.0]
    assert meta["g_v"] == [0.25] and meta["g_p"] == [1.0]
    assert meta["gamma"][0] != pytest.approx(1 / (1 + np.exp(-4.6)), abs=1e-7)  # tuned, moved by Adam
    assert model.eta.shape == (1, 2)


def test_save_load_keeps_metaparameters_and_training_continues(tmp_path):
    model = _small(cls=STACX)
    model.learn(60)
    model.save(tmp_path / "stacx")
    loaded = STACX.load(tmp_path / "stacx", env=make_vec_env(ENV, n_envs=2, seed=1))
    th.testing.assert_close(loaded.eta, model.eta)
    assert loaded.n_heads == 3 and loaded.self_tune == META_NAMES
    state, loaded_state = model.meta_optimizer.state[model.eta], loaded.meta_optimizer.state[loaded.eta]
    th.testing.assert_close(loaded_state["exp_avg"], state["exp_avg"])
    th.testing.assert_close(loaded_state["exp_avg_sq"], state["exp_avg_sq"])
    for p, q in zip(model.policy.parameters(), loaded.policy.parameters()):
        th.testing.assert_close(p, q)
        th.testing.assert_close(
            model.policy.optimizer.state[p]["square_avg"], loaded.policy.optimizer.state[q]["square_avg"]
        )
    obs = np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)
    np.testing.assert_array_equal(model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0])
    eta = loaded.eta.detach().clone()
    loaded.set_logger(Logger(folder=None, output_formats=[]))
    loaded.learn(30, reset_num_timesteps=False)
    assert loaded.num_timesteps > model.num_timesteps
    assert not th.equal(loaded.eta, eta)


def test_two_seeded_runs_agree():
    runs = []
    for _ in range(2):
        model = _small(cls=STACX, env="Pendulum-v1", n_epochs=2)
        model.learn(40)
        runs.append(model)
    th.testing.assert_close(runs[0].eta, runs[1].eta, rtol=0, atol=0)
    for p, q in zip(runs[0].policy.parameters(), runs[1].policy.parameters()):
        th.testing.assert_close(p, q, rtol=0, atol=0)


# Measured once (seed 0, exactly this config, 20k steps, one thread, ~11 s on the shared 2-core machine): a
# deterministic evaluation of 10 episodes scored 147.7 +- 7.4 (training ep_rew_mean over the last 100 episodes
# 153.8); random play scores ~22. The threshold is about half the measured score.
CARTPOLE_THRESHOLD = 75.0


def test_short_run_learns_cartpole():
    model = _small(n_envs=8, learning_rate=3e-3, policy_kwargs=dict(net_arch=[64], head_arch=[64]))
    model.learn(20_000)
    mean_reward, _ = evaluate_policy(model, make_vec_env(ENV, n_envs=1, seed=123), n_eval_episodes=10)
    assert mean_reward > CARTPOLE_THRESHOLD


def test_image_and_dict_observations():
    image_env = make_vec_env(lambda: FakeImageEnv(screen_height=36, screen_width=36, n_channels=1), n_envs=2)
    model = STACX("CnnPolicy", image_env, n_steps=4, seed=0, policy_kwargs=dict(head_arch=[8]))
    model.learn(8)
    assert model.policy.net_arch == [] and model._n_updates == 1
    dict_env = make_vec_env(lambda: SimpleMultiObsEnv(random_start=True), n_envs=2)
    model = STAC("MultiInputPolicy", dict_env, n_steps=4, seed=0, policy_kwargs=SMALL)
    model.learn(8)
    assert model._n_updates == 1


class _MultiBinaryEnv(gym.Env):
    observation_space = gym.spaces.Box(-1, 1, (2,))
    action_space = gym.spaces.MultiBinary(2)


class _UnboundedBoxEnv(gym.Env):
    observation_space = gym.spaces.Box(-1, 1, (2,))
    action_space = gym.spaces.Box(-np.inf, np.inf, (2,))


def test_bad_input():
    with pytest.raises(ValueError, match="gamma.*lambda.*alpha.*g_v.*g_p.*g_e") as info:
        STAC("MlpPolicy", ENV, self_tune=("gamma", "beta"))
    assert "beta" in str(info.value)
    with pytest.raises(ValueError, match="repeat"):
        STAC("MlpPolicy", ENV, self_tune=("gamma", "gamma"))
    with pytest.raises(ValueError, match="MultiBinary.*Discrete, Box"):
        STAC("MlpPolicy", _MultiBinaryEnv())
    with pytest.raises(ValueError, match="bounded 1-D Box"):
        STAC("MlpPolicy", _UnboundedBoxEnv())
    with pytest.raises(ValueError, match="n_heads"):
        STAC("MlpPolicy", ENV, n_heads=0)
    with pytest.raises(ValueError, match="rho_bar >= c_bar"):
        STAC("MlpPolicy", ENV, clip_rho_threshold=0.5, clip_c_threshold=1.0)
    with pytest.raises(ValueError, match="gamma"):
        STAC("MlpPolicy", ENV, gamma=1.5)
    with pytest.raises(ValueError, match="RMSpropTFLike"):
        STAC("MlpPolicy", ENV, policy_kwargs=dict(optimizer_class=th.optim.Adam))
    with pytest.raises(ValueError, match="momentum"):
        STAC("MlpPolicy", ENV, policy_kwargs=dict(optimizer_kwargs=dict(momentum=0.9)))
