"""HANQ / SSAQ against hand computations, invariants and error messages."""

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.type_aliases import ReplayBufferSamples

from sb3_hanq import HANQ, SSAQ
from sb3_hanq.common.optimizers import HyperAdam
from sb3_hanq.common.torch_layers import L2Norm
from sb3_hanq.common.utils import NonFiniteLossError

ENV = "CartPole-v1"


def _fixed_batch(model, n=16, seed=0, reward_scale=1.0):
    """A fixed replay batch, so one gradient step can be recomputed by hand."""
    rng = np.random.default_rng(seed)
    obs_dim = model.observation_space.shape[0]
    t = lambda a: th.as_tensor(a, dtype=th.float32, device=model.device)  # noqa: E731
    return ReplayBufferSamples(
        observations=t(rng.normal(size=(n, obs_dim))),
        actions=th.as_tensor(rng.integers(0, model.action_space.n, size=(n, 1)), device=model.device),
        next_observations=t(rng.normal(size=(n, obs_dim))),
        dones=t(rng.integers(0, 2, size=(n, 1))),
        rewards=t(reward_scale * rng.normal(size=(n, 1))),
    )


def _use_batch(model, batch):
    model.replay_buffer.sample = lambda *args, **kwargs: batch  # type: ignore[method-assign]
    if not hasattr(model, "_logger"):
        model.set_logger(Logger(folder=None, output_formats=[]))


def _hand_q(net, obs):
    """Q_theta and omega from the weights (a network or a state dict), with numpy, following Fig. 6a / §10."""
    state = net if isinstance(net, dict) else net.state_dict()
    w = {k: v.detach().double().numpy() for k, v in state.items()}
    x = obs.double().numpy()
    f = np.maximum(x @ w["torso.0.weight"].T + w["torso.0.bias"], 0.0)
    mu, var = f.mean(1, keepdims=True), f.var(1, keepdims=True)
    ln = (f - mu) / np.sqrt(var + 1e-5) * w["main_norm.weight"] + w["main_norm.bias"]
    q = ln @ w["q_head.weight"].T + w["q_head.bias"]
    l2 = f / np.linalg.norm(f, axis=1, keepdims=True)
    omega = l2 @ w["meta_head.weight"].T + w["meta_head.bias"]
    n, k = q.shape[1], omega.shape[1] // 2  # k = |A| (per (s, a)) or 1 (per state, broadcast over actions)
    scale, bias = omega[:, :k], omega[:, k:]
    return q, np.broadcast_to(scale, (len(q), n)).copy(), np.broadcast_to(bias, (len(q), n)).copy()


def test_forward_matches_hand_computation():
    model = HANQ("MlpPolicy", ENV, seed=1)
    with th.no_grad():  # move the predictor away from its near-identity initialisation
        model.q_net.meta_head.weight.normal_(0, 0.5)
        model.q_net.main_norm.weight.uniform_(0.5, 1.5)
    obs = th.randn(7, 4)
    q, scale, bias = _hand_q(model.q_net, obs)
    actions = th.randint(0, 2, (7, 1))
    with th.no_grad():
        latent = model.q_net.latent(obs)
        q_t = model.q_net(obs)
        pred, _, mult, _ = model.q_net.predict_q(latent, q_t, actions)
    a = actions.numpy()
    expected = np.exp(np.take_along_axis(scale, a, 1)) * np.take_along_axis(q, a, 1) + np.take_along_axis(bias, a, 1)
    np.testing.assert_allclose(q_t.numpy(), q, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pred.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mult.numpy(), np.exp(np.take_along_axis(scale, a, 1)), rtol=1e-5)


@pytest.mark.parametrize("symmetric", [False, True])
def test_loss_and_step_match_hand_written_msbe(symmetric):
    """train() = one Adam step on the plain MSBE with a stop-gradient target (no Huber, no clipping)."""
    model = HANQ("MlpPolicy", ENV, hyper_lr=0.0, learning_rate=1e-2, seed=2, policy_kwargs=dict(symmetric=symmetric))
    batch = _fixed_batch(model, reward_scale=50.0)  # large errors: Huber or clipping would show
    _use_batch(model, batch)
    reference = copy.deepcopy(model.q_net)
    ref_opt = th.optim.Adam(reference.parameters(), lr=1e-2, foreach=False)

    q, scale, bias = (th.as_tensor(v) for v in _hand_q(reference, batch.observations))
    q_next, scale_next, bias_next = (th.as_tensor(v) for v in _hand_q(reference, batch.next_observations))
    if symmetric:
        q_next = th.exp(scale_next) * q_next + bias_next
    y = batch.rewards.double() + 0.99 * (1 - batch.dones.double()) * q_next.max(1, keepdim=True).values
    a = batch.actions
    pred = th.exp(scale.gather(1, a)) * q.gather(1, a) + bias.gather(1, a)
    hand_loss = ((pred - y) ** 2).mean().item()

    model.train(gradient_steps=1, batch_size=16)
    assert model.logger.name_to_value["train/loss"] == pytest.approx(hand_loss, rel=1e-5)

    # the same step with torch.optim.Adam on a loss written here
    latent = reference.latent(batch.observations)
    pred_t = reference.predict_q(latent, reference(batch.observations), a)[0]
    with th.no_grad():
        nl = reference.latent(batch.next_observations)
        nq = reference.q_from_latent(nl)
        if symmetric:
            nq = reference.predict_q(nl, nq)[0]
        y_t = batch.rewards + 0.99 * (1 - batch.dones) * nq.max(1, keepdim=True).values
    ref_opt.zero_grad()
    ((pred_t - y_t) ** 2).mean().backward()
    ref_opt.step()
    for p, q_ in zip(model.q_net.parameters(), reference.parameters()):
        assert th.allclose(p, q_, atol=1e-6)


def test_rg_hypergradient_matches_finite_differences():
    """HANQ's hypergradient is d/dalpha of the residual-gradient MSBE along the last Adam update (§12 Eq. 9)."""
    model = HANQ("MlpPolicy", ENV, hyper_lr=1e-3, learning_rate=1e-2, seed=3)
    batch = _fixed_batch(model)
    _use_batch(model, batch)
    model.train(gradient_steps=3, batch_size=16)
    opt = model.policy.optimizer
    alpha = opt.param_groups[0]["lr"]
    named = dict(model.q_net.named_parameters())
    u_prev = {k: opt.state[p]["prev_update"].double() for k, p in named.items()}
    theta_prev = {k: p.detach().double() + alpha * u_prev[k] for k, p in named.items()}

    def rg_loss(a):  # in float64, from theta_{i-1} - a u_{i-1}
        weights = {k: theta_prev[k] - a * u_prev[k] for k in named}
        q, scale, bias = (th.as_tensor(v) for v in _hand_q(weights, batch.observations))
        q_next = th.as_tensor(_hand_q(weights, batch.next_observations)[0])
        rewards, dones = batch.rewards.double(), batch.dones.double()
        y = rewards + 0.99 * (1 - dones) * q_next.max(1, keepdim=True).values  # no stop-gradient
        ac = batch.actions
        pred = th.exp(scale.gather(1, ac)) * q.gather(1, ac) + bias.gather(1, ac)
        return ((pred - y) ** 2).mean().item()

    eps = 1e-6
    fd = (rg_loss(alpha + eps) - rg_loss(alpha - eps)) / (2 * eps)
    model.train(gradient_steps=1, batch_size=16)
    assert opt.param_groups[0]["hypergradient"] == pytest.approx(fd, rel=1e-4)


@pytest.mark.parametrize("objective", ["rg", "sg"])
def test_same_batch_hypergradient_matches_finite_differences(objective):
    """hyper_batch="same" (Alg. 2 literally): after the step on B_i, d/dalpha of L~(theta_i - alpha u_i; B_i),
    i.e. on the minibatch just used and at the weights it produced; not the next minibatch's."""
    model = HANQ("MlpPolicy", ENV, hyper_lr=1e-3, learning_rate=1e-2, seed=3, hyper_batch="same",
                 hyper_objective=objective)  # fmt: skip
    batches = [_fixed_batch(model, seed=s) for s in range(5)]
    _use_batch(model, batches[0])
    calls = iter(batches)
    model.replay_buffer.sample = lambda *args, **kwargs: next(calls)  # type: ignore[method-assign]
    model.train(gradient_steps=3, batch_size=16)
    opt = model.policy.optimizer
    named = dict(model.q_net.named_parameters())
    u_last = {k: opt.state[p]["prev_update"].double() for k, p in named.items()}
    theta = {k: p.detach().double() for k, p in named.items()}

    def loss_along(h, batch):  # L~(theta_{i+1} - h u_i; batch) in float64; sg keeps y at theta_{i+1}
        weights = {k: theta[k] - h * u_last[k] for k in named}
        q, scale, bias = (th.as_tensor(v) for v in _hand_q(weights, batch.observations))
        y_weights = weights if objective == "rg" else theta
        q_next = th.as_tensor(_hand_q(y_weights, batch.next_observations)[0])
        y = batch.rewards.double() + 0.99 * (1 - batch.dones.double()) * q_next.max(1, keepdim=True).values
        ac = batch.actions
        pred = th.exp(scale.gather(1, ac)) * q.gather(1, ac) + bias.gather(1, ac)
        return ((pred - y) ** 2).mean().item()

    eps = 1e-6
    fd = {k: (loss_along(eps, batches[k]) - loss_along(-eps, batches[k])) / (2 * eps) for k in (2, 3)}
    model.train(gradient_steps=1, batch_size=16)  # step 4 samples batches[3]; alpha moves by B_3 = batches[2]
    assert opt.param_groups[0]["hypergradient"] == pytest.approx(fd[2], rel=1e-4)
    assert opt.param_groups[0]["hypergradient"] != pytest.approx(fd[3], rel=1e-2)
    # the kept minibatch is transient state: not part of what save() writes
    assert "_hyper_data" in model._excluded_save_params()


def test_no_target_network_by_default_and_polyak_with_tau():
    model = HANQ("MlpPolicy", ENV, seed=0)
    assert model.q_net_target is None and model.policy.q_net_target is None
    assert not any("target" in name for name in model.policy.state_dict())
    assert isinstance(model.policy.optimizer, HyperAdam)

    model = HANQ("MlpPolicy", ENV, tau=0.1, seed=0, hyper_lr=0.0)
    assert model.q_net_target is not None
    _use_batch(model, _fixed_batch(model))
    before = [p.detach().clone() for p in model.q_net_target.parameters()]
    model.train(1, 16)
    model._on_step()  # target_update_interval=1
    for t_old, t_new, p in zip(before, model.q_net_target.parameters(), model.q_net.parameters()):
        assert th.allclose(t_new, 0.9 * t_old + 0.1 * p, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, check",
    [
        (dict(predictor="none"), lambda n: not hasattr(n, "meta_head") and not hasattr(n, "omega_scale")),
        (dict(predictor="scalar"), lambda n: n.omega_scale.shape == () and n.omega_bias.shape == ()),
        (dict(predictor_bias=False), lambda n: n.meta_head.out_features == 1),  # per state (the default)
        (dict(predictor_bias=True), lambda n: n.meta_head.out_features == 2),
        (dict(predictor_bias=False, metapredictor_outputs="state_action"), lambda n: n.meta_head.out_features == 2),
        (dict(predictor_bias=True, metapredictor_outputs="state_action"), lambda n: n.meta_head.out_features == 4),
        (dict(main_norm="l2"), lambda n: isinstance(n.main_norm, L2Norm)),
        (dict(main_norm="none"), lambda n: isinstance(n.main_norm, th.nn.Identity)),
        (dict(meta_norm="layer"), lambda n: isinstance(n.meta_norm, th.nn.LayerNorm)),
        (dict(net_arch=[32, 16]), lambda n: n.q_head.in_features == 16 and len(n.torso) == 4),
    ],
)
def test_ablation_flags_change_the_network(kwargs, check):
    assert check(HANQ("MlpPolicy", ENV, policy_kwargs=kwargs).q_net)


def test_positive_scale_flag_changes_the_prediction():
    obs = th.randn(5, 4)
    actions = th.zeros(5, 1, dtype=th.long)
    for positive in (True, False):
        net = HANQ("MlpPolicy", ENV, seed=0, policy_kwargs=dict(predictor="scalar", positive_scale=positive)).q_net
        with th.no_grad():
            net.omega_scale.fill_(0.5)
            net.omega_bias.fill_(0.25)
            latent, q = net.latent(obs), net(obs)
            pred = net.predict_q(latent, q, actions)[0]
        factor = np.exp(0.5) if positive else 0.5
        assert th.allclose(pred, factor * q[:, :1] + 0.25, atol=1e-6)


def test_ssaq_is_alg1():
    model = SSAQ("MlpPolicy", ENV, seed=0)
    net = model.q_net
    assert model.hyper_lr == 0.0 and model.policy.optimizer.param_groups[0]["hyper_lr"] == 0.0
    assert net.predictor == "scalar" and not net.positive_scale and not hasattr(net, "omega_bias")
    assert net.omega_scale.item() == 1.0  # Alg. 1: omega initialised to 1
    assert isinstance(net.main_norm, th.nn.Identity) and model.q_net_target is None
    obs = th.randn(3, 4)
    with th.no_grad():
        assert th.equal(net.predict_q(net.latent(obs), net(obs))[0], net(obs))  # identity at init
    assert SSAQ("MlpPolicy", ENV, hyper_lr=1e-4).policy.optimizer.param_groups[0]["hyper_lr"] == 1e-4  # HSSAQ


@pytest.mark.parametrize("tune_betas", [False, True])
def test_save_load_round_trip_and_training_continues(tmp_path, tune_betas):
    """Through SB3's save/load the hyper-optimiser's state (and, with tune_betas, Adam's learned betas) survives."""
    kwargs = dict(policy_kwargs=dict(optimizer_kwargs=dict(tune_betas=True))) if tune_betas else {}
    model = HANQ("MlpPolicy", ENV, learning_starts=50, seed=4, **kwargs)
    model.learn(300)
    batch = _fixed_batch(model)
    _use_batch(model, batch)
    model.train(5, 16)
    lr = model.current_learning_rate
    assert lr != 10**-2.5  # alpha was adapted
    model.save(tmp_path / "hanq.zip")
    loaded = HANQ.load(tmp_path / "hanq.zip", env=gym.make(ENV))
    obs = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    assert np.array_equal(model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0])
    with th.no_grad():
        assert th.equal(model.q_net(th.as_tensor(obs)), loaded.q_net(th.as_tensor(obs)))
    assert loaded.current_learning_rate == lr
    g0, g1 = model.policy.optimizer.param_groups[0], loaded.policy.optimizer.param_groups[0]
    for key in ("log_lr_scale", "hyper_exp_avg", "hyper_exp_avg_sq", "hyper_step", "base_lr", "betas", "tune_betas"):
        assert g0[key] == g1[key]
    assert (g0["betas"] != (0.9, 0.999)) == tune_betas
    # both continue on the same batches and stay identical: optimiser and hyper-optimiser state survived
    _use_batch(loaded, batch)
    model.train(5, 16)
    loaded.train(5, 16)
    assert loaded.current_learning_rate == model.current_learning_rate != lr
    assert loaded.policy.optimizer.param_groups[0]["betas"] == model.policy.optimizer.param_groups[0]["betas"]
    for p, q in zip(model.q_net.parameters(), loaded.q_net.parameters()):
        assert th.equal(p, q)
    loaded.learn(100)  # and online learning resumes


def test_two_seeded_runs_agree():
    def run():
        model = HANQ("MlpPolicy", ENV, learning_starts=100, seed=7)
        model.learn(400)
        return th.cat([p.detach().flatten() for p in model.q_net.parameters()]), model.current_learning_rate

    (a, lr_a), (b, lr_b) = run(), run()
    assert th.equal(a, b) and lr_a == lr_b


def test_logged_keys():
    model = HANQ("MlpPolicy", ENV, seed=0)
    _use_batch(model, _fixed_batch(model))
    model.train(2, 16)
    logged = model.logger.name_to_value
    for key in ("train/loss", "train/learning_rate", "train/omega_scale", "train/omega_bias", "train/q_values"):
        assert key in logged
    assert logged["train/learning_rate"] == model.current_learning_rate


def test_bad_input():
    with pytest.raises(ValueError, match="Discrete"):
        HANQ("MlpPolicy", "Pendulum-v1")
    with pytest.raises(ValueError, match=r"predictor.*'meta', 'scalar', 'none'"):
        HANQ("MlpPolicy", ENV, policy_kwargs=dict(predictor="big"))
    with pytest.raises(ValueError, match=r"main_norm.*'layer', 'l2', 'none'"):
        HANQ("MlpPolicy", ENV, policy_kwargs=dict(main_norm="batch"))
    with pytest.raises(ValueError, match="meta_norm"):
        HANQ("MlpPolicy", ENV, policy_kwargs=dict(meta_norm="batch"))
    with pytest.raises(ValueError, match="learning_rate"):
        HANQ("MlpPolicy", ENV, learning_rate=-1e-3)
    with pytest.raises(ValueError, match="hyper_lr"):
        HANQ("MlpPolicy", ENV, hyper_lr=-0.1)
    with pytest.raises(ValueError, match="hyper_objective"):
        HANQ("MlpPolicy", ENV, hyper_objective="td")
    with pytest.raises(ValueError, match=r"hyper_batch.*'next', 'same'"):
        HANQ("MlpPolicy", ENV, hyper_batch="previous")
    with pytest.raises(ValueError, match="tau"):
        HANQ("MlpPolicy", ENV, tau=0.0)


def test_non_finite_loss_names_the_gradient_step():
    model = HANQ("MlpPolicy", ENV, seed=0)
    batch = _fixed_batch(model)
    _use_batch(model, batch)
    model.train(3, 16)
    _use_batch(model, batch._replace(rewards=batch.rewards * float("inf")))
    with pytest.raises(NonFiniteLossError, match="gradient step 4"):
        model.train(1, 16)


def test_non_finite_loss_inside_a_multi_step_call_names_that_step():
    model = HANQ("MlpPolicy", ENV, seed=0)
    batch = _fixed_batch(model)
    bad = batch._replace(rewards=batch.rewards * float("nan"))
    batches = iter([batch, batch, bad, batch, batch])
    _use_batch(model, batch)
    model.replay_buffer.sample = lambda *args, **kwargs: next(batches)
    with pytest.raises(NonFiniteLossError, match="gradient step 3 "):
        model.train(5, 16)


class _ImageEnv(gym.Env):
    """Tiny image-observation env for the CnnPolicy check."""

    observation_space = gym.spaces.Box(0, 255, (40, 40, 3), np.uint8)
    action_space = gym.spaces.Discrete(4)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), float(action == 0), False, self.np_random.random() < 0.05, {}


def test_cnn_policy_layout():
    """§11 Atari: Nature-CNN features; LayerNorm before the Q head; metapredictor fed the pre-LayerNorm features."""
    from stable_baselines3.common.torch_layers import NatureCNN

    model = HANQ("CnnPolicy", _ImageEnv(), buffer_size=200, learning_starts=50, batch_size=8, seed=0)
    net = model.q_net
    assert isinstance(net.features_extractor, NatureCNN) and len(net.torso) == 0
    assert isinstance(net.main_norm, th.nn.LayerNorm) and net.main_norm.normalized_shape == (512,)
    assert net.meta_head.in_features == 512 and isinstance(net.meta_norm, L2Norm)
    obs = th.as_tensor(np.stack([_ImageEnv.observation_space.sample() for _ in range(3)])).permute(0, 3, 1, 2)
    with th.no_grad():
        features = net.latent(obs)
        expected_omega = net.meta_head(th.nn.functional.normalize(features, dim=1))
        assert th.allclose(net.predictor_params(features)[0], expected_omega[:, :1])  # per state (the default)
        assert th.allclose(net(obs), net.q_head(net.main_norm(features)))
    model.learn(100)
    assert model._n_updates > 0


def test_multi_input_policy_trains():
    from stable_baselines3.common.envs import SimpleMultiObsEnv

    model = HANQ("MultiInputPolicy", SimpleMultiObsEnv(random_start=True), learning_starts=20, batch_size=8, seed=0)
    assert model.q_net_target is None
    model.learn(60)
    assert model._n_updates > 0


def test_per_state_metapredictor():
    """metapredictor_outputs="state": a 2-output head whose (omega_scale, omega_bias) is the same for every action
    of a state, so Q_omega,theta(s, a) - omega_bias(s) is exp(omega_scale(s)) times Q_theta(s, a) for all a."""
    per_state = HANQ("MlpPolicy", "CartPole-v1", policy_kwargs=dict(metapredictor_outputs="state"), seed=0)
    per_pair = HANQ("MlpPolicy", "CartPole-v1", policy_kwargs=dict(metapredictor_outputs="state_action"), seed=0)
    assert per_state.q_net.meta_head.out_features == 2 and per_pair.q_net.meta_head.out_features == 4
    net = per_state.q_net
    obs = th.randn(7, 4)
    latent = net.latent(obs)
    q_all = net.q_from_latent(latent)
    full, _, scale, bias = net.predict_q(latent, q_all)
    assert scale.shape == (7, 1) and bias.shape == (7, 1)
    th.testing.assert_close(full, scale * q_all + bias)
    for action in range(2):
        actions = th.full((7, 1), action)
        chosen, q_sa, *_ = net.predict_q(latent, q_all, actions)
        th.testing.assert_close(chosen, full[:, action : action + 1])
        th.testing.assert_close(q_sa, q_all[:, action : action + 1])
    with pytest.raises(ValueError, match="metapredictor_outputs"):
        HANQ("MlpPolicy", "CartPole-v1", policy_kwargs=dict(metapredictor_outputs="action"))
    assert HANQ("MlpPolicy", "CartPole-v1").policy_kwargs["metapredictor_outputs"] == "state"  # the default


def test_policy_saved_before_metapredictor_outputs_loads_as_trained(tmp_path):
    """``HANQPolicy.load`` of a policy file without metapredictor_outputs (saved before the option existed)
    rebuilds the per-(s, a) head and its weights; a file that has the key keeps it."""
    from sb3_hanq.hanq.policies import HANQPolicy

    model = HANQ("MlpPolicy", "CartPole-v1", policy_kwargs=dict(metapredictor_outputs="state_action"), seed=0)
    model.policy.save(tmp_path / "policy.pth")
    saved = th.load(tmp_path / "policy.pth", weights_only=False)
    del saved["data"]["metapredictor_outputs"]  # what the older code stored
    th.save(saved, tmp_path / "old_policy.pth")
    loaded = HANQPolicy.load(tmp_path / "old_policy.pth", device="cpu")
    assert loaded.q_net.meta_head.out_features == 4 and loaded.q_net.metapredictor_outputs == "state_action"
    obs = th.randn(5, 4)
    with th.no_grad():
        th.testing.assert_close(loaded.q_net(obs), model.policy.q_net(obs))
    HANQ("MlpPolicy", "CartPole-v1", seed=0).policy.save(tmp_path / "new_policy.pth")
    assert HANQPolicy.load(tmp_path / "new_policy.pth", device="cpu").q_net.meta_head.out_features == 2


def test_file_saved_before_metapredictor_outputs_loads_as_trained(tmp_path):
    """A file whose policy_kwargs lack metapredictor_outputs (saved before the option, when the head was per
    (s, a)) loads with the per-(s, a) head and its weights, not with today's per-state default."""
    old = HANQ("MlpPolicy", "CartPole-v1", policy_kwargs=dict(metapredictor_outputs="state_action"), seed=0)
    del old.policy_kwargs["metapredictor_outputs"]  # what the older code stored
    old.save(tmp_path / "old.zip")
    loaded = HANQ.load(tmp_path / "old.zip")
    assert loaded.q_net.meta_head.out_features == 4
    obs = th.randn(5, 4)
    with th.no_grad():
        th.testing.assert_close(loaded.q_net.predictor_params(loaded.q_net.latent(obs))[0],
                                old.q_net.predictor_params(old.q_net.latent(obs))[0])  # fmt: skip
