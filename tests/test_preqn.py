"""PreQN (PreQN paper §4, Alg. 1) against independent computations: the proposed step against Phi K^+ Delta
from a per-sample loop, the line search's acceptance criterion recomputed from the networks before and after
each step, Eq. 20 for tiny steps; Appendix B defaults, save/load, determinism, bad input, and learning."""

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.noise import NormalActionNoise
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from sb3_hanq.common.utils import NonFiniteLossError
from sb3_hanq.preqn import PreQN, PreQNPolicy, Sin

ENV = "Pendulum-v1"


def _small(**kwargs):
    policy_kwargs = dict(net_arch=[16, 16])
    policy_kwargs.update(kwargs.pop("policy_kwargs", {}))
    kwargs.setdefault("learning_starts", 100)
    kwargs.setdefault("batch_size", 32)
    kwargs.setdefault("seed", 0)
    return PreQN("MlpPolicy", ENV, policy_kwargs=policy_kwargs, **kwargs)


def _filled(model, steps=100):
    """Collect ``steps`` transitions (no gradient step before ``learning_starts``) and set a silent logger."""
    model.learn(steps)
    model.set_logger(Logger(folder=None, output_formats=[]))
    return model


def _record_batches(model):
    batches = []
    sample = model.replay_buffer.sample

    def recording_sample(*args, **kwargs):
        batches.append(sample(*args, **kwargs))
        return batches[-1]

    model.replay_buffer.sample = recording_sample  # type: ignore[method-assign]
    return batches


def _critic_vector(model):
    return th.nn.utils.parameters_to_vector(model.critic.parameters()).detach().clone()


def _per_sample_gradients(q, params):
    rows = [th.cat([g.reshape(-1) for g in th.autograd.grad(q[i], params, retain_graph=True)]) for i in range(len(q))]
    return th.stack(rows).double()


def _td_errors(critic, actor, batch, gamma=0.99):
    with th.no_grad():
        q = critic(batch.observations, batch.actions)[0][:, 0]
        next_q = critic(batch.next_observations, actor(batch.next_observations))[0][:, 0]
        targets = batch.rewards[:, 0] + gamma * (1 - batch.dones[:, 0]) * next_q
    return q, targets - q


def test_appendix_b_defaults_and_no_target_networks():
    model = PreQN("MlpPolicy", ENV)
    assert model.gamma == 0.99 and model.batch_size == 256 and model.learning_starts == 5000
    assert model.learning_rate == 1e-3 and model.critic_step_size == 0.1 and model.eta == 0.97
    assert model.train_freq.frequency == 50 and model.gradient_steps == -1  # every 50 steps, 1:1 updates
    assert model.max_backtracks == 10 and model.backtrack_factor == 0.5
    assert isinstance(model.action_noise, NormalActionNoise)
    assert np.allclose(model.action_noise._sigma, 0.1) and np.allclose(model.action_noise._mu, 0.0)
    assert type(model.actor.optimizer) is th.optim.Adam and model.actor.optimizer.param_groups[0]["lr"] == 1e-3
    assert not hasattr(model.critic, "optimizer")  # plain preconditioned steps, no optimiser
    # [256, 256] with sin in the one critic; no target networks anywhere
    assert model.critic.n_critics == 1
    linears = [m for m in model.critic.qf0 if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [256, 256, 1]
    assert sum(isinstance(m, Sin) for m in model.critic.qf0) == 2
    assert model.actor_target is None and model.critic_target is None
    assert model.policy.actor_target is None and model.policy.critic_target is None
    assert not any("target" in name for name, _ in model.policy.named_modules())
    n_params = sum(p.numel() for p in model.policy.parameters())
    assert n_params == sum(p.numel() for p in model.actor.parameters()) + sum(
        p.numel() for p in model.critic.parameters()
    )
    assert PreQN("MlpPolicy", ENV, action_noise=None).action_noise is None


@pytest.mark.parametrize("activation, module", [("relu", nn.ReLU), ("tanh", nn.Tanh), ("sin", Sin)])
def test_critic_activation(activation, module):
    model = _small(policy_kwargs=dict(critic_activation=activation))
    assert sum(isinstance(m, module) for m in model.critic.qf0) == 2
    assert sum(isinstance(m, nn.ReLU) for m in model.actor.mu) == 2  # the actor keeps activation_fn


def test_proposed_step_equals_phi_pinv_k_delta():
    """With max_backtracks=0 and a tiny eta, the step taken is exactly alpha_q Phi K^+ Delta (Eqs. 22-23)."""
    alpha = 1e-3
    model = _filled(_small(critic_step_size=alpha, eta=1e-6, max_backtracks=0, batch_size=16))
    batches = _record_batches(model)
    critic, actor = copy.deepcopy(model.critic), copy.deepcopy(model.actor)
    before = _critic_vector(model)
    model.train(1, 16)
    assert model.rejected_steps == 0
    batch = batches[-1]
    q = critic(batch.observations, batch.actions)[0][:, 0]
    phi_t = _per_sample_gradients(q, list(critic.parameters())).numpy()  # [n, P], by a loop over samples
    delta = _td_errors(critic, actor, batch)[1].double().numpy()
    # The batch (16 draws from 100 transitions) holds a duplicate, so K is singular: the pseudo-inverse, with
    # ntk_lstsq's default cutoff n * eps(float32) (the other eigenvalues are > 1e-4 lambda_max).
    k_pinv = np.linalg.pinv(phi_t @ phi_t.T, rcond=16 * np.finfo(np.float32).eps, hermitian=True)
    expected = alpha * phi_t.T @ k_pinv @ delta
    step = (_critic_vector(model) - before).double().numpy()
    # float32 network and kernel against float64: measured 1.4e-4
    assert np.linalg.norm(step - expected) / np.linalg.norm(expected) < 2e-3


def test_tiny_step_moves_q_by_step_size_times_delta():
    """Eq. 20: Q' - Q = alpha_q Delta to first order, on the training batch (n = 16 < P: K has full rank)."""
    alpha = 1e-4
    model = _filled(_small(critic_step_size=alpha, eta=0.5, policy_kwargs=dict(net_arch=[64, 64]), batch_size=16))
    batches = _record_batches(model)
    critic, actor = copy.deepcopy(model.critic), copy.deepcopy(model.actor)
    model.train(1, 16)
    batch = batches[-1]
    q_before, delta = _td_errors(critic, actor, batch)
    with th.no_grad():
        change = model.critic(batch.observations, batch.actions)[0][:, 0] - q_before
    # relative error of the linear model plus float32 round-off: measured 2.5e-4
    assert ((change - alpha * delta).norm() / (alpha * delta).norm()).item() < 5e-3


@pytest.mark.parametrize("lstsq_method", ["eigh", "cholesky"])
def test_every_accepted_step_is_aligned_and_rejected_steps_keep_the_critic(lstsq_method):
    """Recompute cos(Q_theta'(B) - Q_theta(B), Delta) from copies of the networks before and after each step."""
    eta = 0.999
    model = _filled(_small(eta=eta, max_backtracks=5, lstsq_method=lstsq_method))  # strict: rejects some steps
    batches = _record_batches(model)
    accepted = rejected = 0
    for _ in range(30):
        critic, actor = copy.deepcopy(model.critic), copy.deepcopy(model.actor)
        before, n_rejected = _critic_vector(model), model.rejected_steps
        model.train(1, 32)
        batch = batches[-1]
        q_before, delta = _td_errors(critic, actor, batch)
        if model.rejected_steps == n_rejected + 1:
            assert th.equal(_critic_vector(model), before)  # rejected: parameters unchanged
            rejected += 1
        else:
            assert model.rejected_steps == n_rejected and not th.equal(_critic_vector(model), before)
            with th.no_grad():
                change = (model.critic(batch.observations, batch.actions)[0][:, 0] - q_before).double()
            cos = (change @ delta.double()) / (change.norm() * delta.double().norm())
            assert cos.item() >= eta - 1e-6
            accepted += 1
    assert accepted > 0 and rejected > 0  # both branches exercised (measured: 26 accepted, 4 rejected)
    assert model.logger.name_to_value["train/rejected_steps"] == model.rejected_steps


def test_logged_keys():
    model = _filled(_small())
    model.train(3, 32)
    logged = model.logger.name_to_value
    for key in (
        "train/critic_alignment",
        "train/linesearch_backtracks",
        "train/rejected_steps",
        "train/ntk_row_ratio",
        "train/ntk_diag",
        "train/critic_loss",
        "train/actor_loss",
        "train/n_updates",
    ):
        assert key in logged, key
    assert 0.97 <= logged["train/critic_alignment"] <= 1.0 + 1e-6
    assert logged["train/ntk_row_ratio"] > 0 and logged["train/ntk_diag"] > 0


def test_critic_with_trainable_features_uses_the_jacobian_path():
    class LinearExtractor(BaseFeaturesExtractor):
        def __init__(self, observation_space: gym.spaces.Box) -> None:
            super().__init__(observation_space, 4)
            self.linear = nn.Linear(3, 4)

        def forward(self, obs):
            return th.tanh(self.linear(obs))

    model = _filled(_small(policy_kwargs=dict(features_extractor_class=LinearExtractor)))
    assert not model._q_function.layerwise
    assert any("features_extractor" in name for name in model._q_function.params)
    before = th.nn.utils.parameters_to_vector(model.critic.features_extractor.parameters()).detach().clone()
    model.train(3, 16)
    assert model.logger.name_to_value["train/critic_alignment"] >= 0.97
    after = th.nn.utils.parameters_to_vector(model.critic.features_extractor.parameters())
    assert not th.equal(before, after)  # the critic's own features are part of theta


def test_dict_observations():
    class DictObservation(gym.ObservationWrapper):
        def __init__(self, env):
            super().__init__(env)
            self.observation_space = gym.spaces.Dict(
                {"xy": gym.spaces.Box(-1, 1, (2,)), "speed": gym.spaces.Box(-8, 8, (1,))}
            )

        def observation(self, obs):
            return {"xy": obs[:2], "speed": obs[2:]}

    model = PreQN(
        "MultiInputPolicy",
        DictObservation(gym.make(ENV)),
        learning_starts=100,
        batch_size=16,
        policy_kwargs=dict(net_arch=[16, 16]),
        seed=0,
    )
    _filled(model)
    batch = model.replay_buffer.sample(8)
    q_function = model._q_function
    layerwise = q_function.ntk(batch.observations, batch.actions, "layerwise")
    jacobian = q_function.ntk(batch.observations, batch.actions, "jacobian")
    assert th.allclose(layerwise, jacobian, atol=1e-5 * layerwise.abs().max())
    model.train(3, 16)
    assert model.logger.name_to_value["train/critic_alignment"] >= 0.97


def test_save_load_keeps_everything_and_training_continues(tmp_path):
    model = _small(
        eta=0.99,
        max_backtracks=3,
        backtrack_factor=0.7,
        critic_step_size=0.05,
        lstsq_rtol=1e-6,
        lstsq_method="cholesky",
    )
    model.learn(300)
    model.rejected_steps = 7  # make sure the counter is saved, not recomputed
    model.save(tmp_path / "preqn.zip")
    loaded = PreQN.load(tmp_path / "preqn.zip", env=gym.make(ENV))
    obs = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    assert np.array_equal(model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0])
    obs_t, actions = th.as_tensor(obs), th.rand(8, 1) * 2 - 1
    with th.no_grad():
        assert th.equal(model.critic(obs_t, actions)[0], loaded.critic(obs_t, actions)[0])
    names = ("eta", "critic_step_size", "max_backtracks", "backtrack_factor", "lstsq_rtol", "lstsq_method")
    for name in (*names, "rejected_steps"):
        assert getattr(loaded, name) == getattr(model, name), name
    assert loaded._n_updates == model._n_updates and loaded.num_timesteps == model.num_timesteps
    assert np.allclose(loaded.action_noise._sigma, 0.1)
    assert loaded.critic_target is None and loaded.actor_target is None
    assert loaded.policy.critic_activation == "sin"
    saved_state, loaded_state = model.actor.optimizer.state_dict(), loaded.actor.optimizer.state_dict()
    for key, state in saved_state["state"].items():
        for name, value in state.items():
            assert th.equal(th.as_tensor(value), th.as_tensor(loaded_state["state"][key][name]))
    # training continues from the loaded state
    critic_before = _critic_vector(loaded)
    loaded.learn(100, reset_num_timesteps=False)
    assert loaded._n_updates > model._n_updates and not th.equal(_critic_vector(loaded), critic_before)
    assert loaded._q_function.params["net.qf0.0.weight"] is loaded.critic.qf0[0].weight


def test_two_seeded_runs_agree():
    runs = []
    for _ in range(2):  # one after the other: SB3 seeds the global random state at construction
        runs.append(_small(seed=3).learn(300))
    a, b = (th.nn.utils.parameters_to_vector(m.policy.parameters()) for m in runs)
    assert th.equal(a, b) and runs[0].rejected_steps == runs[1].rejected_steps
    assert runs[0]._n_updates == 200  # updates at steps 150, 200, 250, 300 of 50 gradient steps each


def test_bad_input():
    with pytest.raises(ValueError, match="does not support action space"):
        PreQN("MlpPolicy", "CartPole-v1")
    for eta in (0.0, -0.5, 1.01, float("nan")):
        with pytest.raises(ValueError, match="eta"):
            _small(eta=eta)
    _small(eta=1.0)  # the interval is (0, 1]
    for step in (0.0, -0.1):
        with pytest.raises(ValueError, match="critic_step_size"):
            _small(critic_step_size=step)
    with pytest.raises(ValueError, match="max_backtracks"):
        _small(max_backtracks=-1)
    with pytest.raises(ValueError, match=r"lstsq_method='lu': expected one of \('eigh', 'cholesky'\)"):
        _small(lstsq_method="lu")
    with pytest.raises(ValueError, match="backtrack_factor"):
        _small(backtrack_factor=1.0)
    with pytest.raises(ValueError, match="action_noise"):
        _small(action_noise="ou")
    with pytest.raises(ValueError, match="critic_activation"):
        _small(policy_kwargs=dict(critic_activation="gelu"))
    with pytest.raises(ValueError, match="n_critics"):
        _small(policy_kwargs=dict(n_critics=2))
    assert issubclass(PreQNPolicy, nn.Module)


def test_non_finite_td_errors_name_the_gradient_step():
    model = _filled(_small())
    model.train(2, 16)
    model.replay_buffer.rewards[:] = np.nan
    with pytest.raises(NonFiniteLossError, match="gradient step 3 "):
        model.train(2, 16)


@pytest.mark.slow
def test_learns_pendulum():
    """8000 steps (1000 random, then 7000 PreQN updates) with [64, 64] networks and batch 64, one seed.

    Measured once (seed 0, 1 thread, ~31 s): mean return -178 +- 101 over 10 deterministic episodes, no
    rejected step; a uniformly random policy scores -1246 +- 270 (20 episodes). The threshold -500 leaves a wide margin.
    """
    model = PreQN("MlpPolicy", ENV, learning_starts=1000, batch_size=64, policy_kwargs=dict(net_arch=[64, 64]), seed=0)
    model.learn(8000)
    mean_return, _ = evaluate_policy(model, model.get_env(), n_eval_episodes=10, deterministic=True)
    assert mean_return > -500
