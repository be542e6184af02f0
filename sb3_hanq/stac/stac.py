"""STAC and STACX: Self-Tuning Actor-Critic with leaky V-trace and metagradients.

Paper: "A Self-Tuning Actor-Critic Algorithm", Zahavy et al. (NeurIPS 2020), §2-3 and supplementary §9.2
(Algorithms 1 and 2), §9.3 (Tables 2-3), §10 (leaky V-trace).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar, NamedTuple, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, PyTorchObs, Schedule
from stable_baselines3.common.utils import LinearSchedule, explained_variance
from stable_baselines3.common.vec_env import VecEnv

from sb3_hanq.common.utils import (
    NonFiniteLossError,
    SupportedActionSpacesMixin,
    check_non_negative,
    check_positive_int,
    check_positive_lr,
    divergence_hint,
    load_with_completed_policy_kwargs,
)
from sb3_hanq.common.vtrace import leaky_vtrace
from sb3_hanq.stac.policies import CnnPolicy, MlpPolicy, MultiInputPolicy, STACPolicy

SelfSTAC = TypeVar("SelfSTAC", bound="STAC")

#: The metaparameters eta of one head (Alg. 2 line 4), in the order of :meth:`STAC.inner_hyperparameters`.
META_NAMES = ("gamma", "lambda", "alpha", "g_v", "g_p", "g_e")

#: Table 3, control: the inner RMSProp learning rate decays linearly from 1e-3 to 1e-4 over training.
DEFAULT_LEARNING_RATE = LinearSchedule(1e-3, 1e-4, 1.0)


class RolloutBatch(NamedTuple):
    """One rollout, time-major (``RolloutBuffer.get()`` would flatten and shuffle it).

    :param observations: the ``T * N`` rollout observations (row ``t * N + n``), then the ``N`` observations
        x_T after the last step (bootstrap), then the ``K`` terminal observations of time-limit truncations
    :param actions: ``[T, N]`` (Discrete) or ``[T, N, D]`` (Box, squashed into [-1, 1])
    :param rewards: ``[T, N]``, without the value bootstrap SB3 adds to the reward at a time limit
    :param not_done: ``[T, N]``, 0 where the episode ends (terminates or is truncated) at step t
    :param behaviour_log_probs: log mu(a_t|x_t) stored at collection, ``[T, N]``
    :param timeout_index: flat indices ``t * N + n`` of the ``K`` steps ended by a time limit
    """

    observations: PyTorchObs
    actions: th.Tensor
    rewards: th.Tensor
    not_done: th.Tensor
    behaviour_log_probs: th.Tensor
    timeout_index: th.Tensor


class HeadOutputs(NamedTuple):
    """The network at one parameter vector on a :class:`RolloutBatch`, for heads ``p = 1 .. P``."""

    policy_out: th.Tensor  # raw policy-head outputs, [P, T, N, k]
    log_probs: th.Tensor  # log pi^p(a_t|x_t), [P, T, N]
    regulariser: th.Tensor  # entropy (or minus the KL to N(0, 1)), [P, T, N]
    values: th.Tensor  # V^p(x_t), [P, T, N]
    bootstrap_values: th.Tensor  # V^p(x_T), [P, N]
    timeout_values: th.Tensor  # V^p(terminal observation) at time-limit truncations, [P, K]


class InnerStep(NamedTuple):
    """Alg. 2 lines 10-12: the inner loss at theta and the differentiable RMSProp step theta'(eta)."""

    loss: th.Tensor  # (1/P) sum_p L(theta^p; zeta(eta^p)), Alg. 2 line 11
    new_params: dict[str, th.Tensor]  # theta'(eta)
    new_square_avgs: list[th.Tensor]  # RMSProp's second-moment estimates after the step
    outputs: HeadOutputs  # the network at theta (all heads)
    stats: dict[str, th.Tensor]  # head-1 statistics for logging


class STAC(SupportedActionSpacesMixin, OnPolicyAlgorithm):
    """Self-Tuning Actor-Critic (STAC paper §3, Alg. 2): A2C-style n-step rollouts from ``n_envs`` environments,
    an IMPALA loss with leaky V-trace whose hyperparameters are self-tuned online by metagradients.

    Each update (Alg. 2, on the time-ordered ``[n_steps, n_envs]`` rollout):

    1. Inner hyperparameters (line 10): zeta(eta) = sigma(gamma), sigma(lambda), sigma(alpha), sigma(g_v) g_v^outer,
       sigma(g_p) g_p^outer, sigma(g_e) g_e^outer per head; names not in ``self_tune`` keep their outer value
       (alpha: 1, V-trace). The logits eta start at ``eta_init`` = 4.6 (sigma = 0.99, §3).
    2. Inner loss (line 11, Alg. 1 with the inner flag), averaged over heads: leaky V-trace targets with
       rho = c = the leaky weights of alpha, g_v sum (v_s - V(x_s))^2 - g_p sum rho_s log pi(a_s|x_s)
       (r_s + gamma v_{s+1} - sg(V(x_s))) - g_e sum H(pi(.|x_s)). Sums over the rollout, as Alg. 1.
    3. One RMSProp step (line 12; Table 3: decay 0.99, epsilon 0.1 inside the square root as Optax, second
       moment starting at 0), taken *differentiably*: the gradient of step 2 is built with ``create_graph``
       and theta'(eta) = theta - lr g / sqrt(nu' + eps) is an expression in eta. The network is evaluated at
       theta' with ``torch.func.functional_call``; autograd gives d theta'/d eta (no hand-derived RMSProp
       derivative, no meta-learning library).
    4. Outer loss (lines 13-14, Eq. (3)) at theta', head 1 only: Alg. 1 with the outer flag (V-trace with
       alpha = 1, lambda^outer, gamma^outer, g_v^outer, g_p^outer, g_e^outer and a stopped advantage) plus
       g_kl KL(pi_theta' || pi_theta). One Adam step on eta (line 15; lr 1e-3, betas 0.9/0.999, eps 1e-4).
    5. theta <- theta'(eta_t) (line 12 computed it with the pre-update eta): no second inner pass.

    With ``self_tune=()`` steps 4-5's metagradient is skipped and STAC is A2C with (leaky) V-trace targets,
    IMPALA's loss and RMSProp: the paper's baseline and the ``{}`` bar of its ablations (Fig. 2b).

    Importance ratios IS_t = pi^p(a_t|x_t) / mu(a_t|x_t) use the behaviour log-probabilities stored in the rollout
    buffer: they are 1 for head 1 on the first pass over a fresh rollout and differ from 1 for STACX's auxiliary
    heads (§3.2) and on later passes (``n_epochs > 1``); the outer loss uses pi^1_theta' / mu.

    Time limits: SB3 adds gamma^outer V^1(x_terminal) to the reward when an episode is truncated. STAC removes it
    and adds gamma^p sg(V^p(x_terminal)) per head instead, so that each head bootstraps with its own discount
    and value (and the self-tuned gamma receives that gradient).

    STACX (§3.2) is ``n_heads=3`` (or :class:`STACX`): one metaparameter set per head, head 1 acts, the outer loss
    uses head 1 only, the auxiliary heads shape the shared torso.

    Logged once per ``train()`` call (the last pass when ``n_epochs > 1``):

    - ``meta/gamma``, ``meta/lambda``, ``meta/alpha``, ``meta/g_v``, ``meta/g_p``, ``meta/g_e``: head 1's inner
      hyperparameters zeta(eta) as used in the inner loss (the loss coefficients *include* the outer factor: the
      paper's Fig. 5 plots sigma(eta) alone, i.e. ``meta/g_v`` / g_v^outer); ``meta/head<p>/...`` for STACX's
      auxiliary heads. Names not self-tuned show their fixed (outer) value.
    - ``train/loss``: the inner loss (summed over the rollout, averaged over heads); ``train/outer_loss``: the
      outer loss including g_kl KL (only when something is self-tuned); ``train/kl``: the per-sample mean
      KL(pi_theta' || pi_theta) of head 1.
    - A2C's keys, for head 1 and as per-sample means of the unweighted terms: ``train/value_loss``
      (v_s - V(x_s))^2, ``train/policy_loss`` -A_s log pi(a_s|x_s), ``train/entropy_loss`` -H (continuous: the KL
      to a standard Gaussian), ``train/explained_variance`` (values against the V-trace targets), ``train/std``
      (continuous: mean pre-squash standard deviation), ``train/learning_rate``, ``train/n_updates``.

    Defaults follow Table 3 (the "Control" column where it differs from Atari): inner RMSProp with learning
    rate 1e-3 decaying linearly to 1e-4, decay 0.99, eps 0.1; gamma^outer 0.99, lambda^outer 1, g_v^outer 0.25,
    g_p^outer 1, g_e^outer 0.01, g_kl 1; Adam meta-optimiser lr 1e-3, betas (0.9, 0.999), eps 1e-4; eta_init 4.6;
    rho_bar = c_bar = 1 (Alg. 2 line 3). ``n_steps=20`` is Table 3's Atari trajectory length (the control setting
    uses 40-step trajectories overlapping by 30, which SB3's rollouts cannot express). No gradient clipping
    (Table 3 lists none; A2C clips at 0.5).

    :param policy: ``"MlpPolicy"``, ``"CnnPolicy"``, ``"MultiInputPolicy"`` or a :class:`STACPolicy` subclass
    :param env: the environment (Discrete or bounded Box actions); may be a registered id
    :param learning_rate: inner RMSProp learning rate, a float or SB3 schedule (default: 1e-3 -> 1e-4 linearly)
    :param n_steps: rollout length per environment (trajectory length n)
    :param gamma: gamma^outer, the outer discount (and the inner one when not self-tuned)
    :param gae_lambda: lambda^outer, the trace coefficient of the outer V-trace (and of the inner one when not
        self-tuned); A2C's name is kept
    :param ent_coef: g_e^outer, entropy (continuous: KL to a standard Gaussian) coefficient
    :param vf_coef: g_v^outer, value-loss coefficient
    :param pg_coef: g_p^outer, policy-gradient coefficient
    :param kl_coef: g_kl, coefficient of KL(pi_theta' || pi_theta) in the outer loss
    :param max_grad_norm: clip the inner gradient's global norm (inside the differentiable step); ``None``: no clip
    :param rms_prop_eps: RMSProp epsilon (inside the square root)
    :param n_heads: number of heads: 1 (STAC) or more (STACX, 3 in the paper)
    :param self_tune: names of the self-tuned metaparameters among ``META_NAMES`` (default all); ``()`` for none
    :param eta_init: initial metaparameter logits
    :param meta_learning_rate: Adam learning rate of the meta-optimiser
    :param meta_optimizer_kwargs: other Adam keyword arguments (default betas (0.9, 0.999), eps 1e-4)
    :param n_epochs: passes (each a full inner + meta update) over one rollout
    :param clip_rho_threshold: rho_bar of (leaky) V-trace
    :param clip_c_threshold: c_bar of (leaky) V-trace
    :param rollout_buffer_class: rollout buffer class (``RolloutBuffer`` / ``DictRolloutBuffer``); must keep SB3's
        ``[n_steps, n_envs]`` arrays
    :param rollout_buffer_kwargs: its keyword arguments
    :param stats_window_size: window for rollout logging
    :param tensorboard_log: TensorBoard log directory
    :param policy_kwargs: policy keyword arguments (``net_arch``, ``head_arch``, ``log_std_bounds``...)
    :param verbose: verbosity level
    :param seed: random seed
    :param device: ``"auto"``, ``"cpu"``, ``"cuda"``...
    :param _init_setup_model: build the networks at creation
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {
        "MlpPolicy": MlpPolicy,
        "CnnPolicy": CnnPolicy,
        "MultiInputPolicy": MultiInputPolicy,
    }
    supported_action_spaces: ClassVar[tuple[type[spaces.Space], ...]] = (spaces.Discrete, spaces.Box)
    policy: STACPolicy  # type: ignore[assignment]
    eta: th.nn.Parameter
    meta_optimizer: th.optim.Adam

    def __init__(
        self,
        policy: str | type[STACPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = DEFAULT_LEARNING_RATE,
        n_steps: int = 20,
        gamma: float = 0.99,
        gae_lambda: float = 1.0,
        ent_coef: float = 0.01,
        vf_coef: float = 0.25,
        pg_coef: float = 1.0,
        kl_coef: float = 1.0,
        max_grad_norm: float | None = None,
        rms_prop_eps: float = 0.1,
        n_heads: int = 1,
        self_tune: Iterable[str] = META_NAMES,
        eta_init: float = 4.6,
        meta_learning_rate: float = 1e-3,
        meta_optimizer_kwargs: dict[str, Any] | None = None,
        n_epochs: int = 1,
        clip_rho_threshold: float = 1.0,
        clip_c_threshold: float = 1.0,
        rollout_buffer_class: type[RolloutBuffer] | None = None,
        rollout_buffer_kwargs: dict[str, Any] | None = None,
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
    ) -> None:
        self_tune = (self_tune,) if isinstance(self_tune, str) else tuple(self_tune)
        unknown = [name for name in self_tune if name not in META_NAMES]
        if unknown:
            raise ValueError(f"Invalid self_tune names {unknown}: valid metaparameters are {META_NAMES}")
        if len(set(self_tune)) != len(self_tune):
            raise ValueError(f"Invalid self_tune={self_tune!r}: names repeat")
        check_positive_lr("learning_rate", learning_rate)
        check_positive_lr("meta_learning_rate", meta_learning_rate)
        for name, value in (("gamma", gamma), ("gae_lambda", gae_lambda)):
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ValueError(f"Invalid {name}={value!r}: must be in [0, 1]")
        for name, value in (("ent_coef", ent_coef), ("vf_coef", vf_coef), ("pg_coef", pg_coef), ("kl_coef", kl_coef)):
            check_non_negative(name, value)
        if not (isinstance(n_heads, int) and n_heads >= 1):
            raise ValueError(f"Invalid n_heads={n_heads!r}: must be an int >= 1 (1: STAC, 3: STACX)")
        if not (isinstance(n_epochs, int) and n_epochs >= 1):
            raise ValueError(f"Invalid n_epochs={n_epochs!r}: must be an int >= 1")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"Invalid max_grad_norm={max_grad_norm!r}: must be > 0 or None")
        if not rms_prop_eps > 0:
            raise ValueError(f"Invalid rms_prop_eps={rms_prop_eps!r}: must be > 0")
        if not clip_rho_threshold >= clip_c_threshold > 0:
            raise ValueError(
                f"Invalid clip thresholds rho_bar={clip_rho_threshold!r}, c_bar={clip_c_threshold!r}: "
                "leaky V-trace needs rho_bar >= c_bar > 0 (Theorem 1)"
            )
        check_positive_int("n_steps", n_steps, " (rollout length per environment)")
        if isinstance(eta_init, bool) or not (isinstance(eta_init, (int, float)) and math.isfinite(eta_init)):
            raise ValueError(f"Invalid eta_init={eta_init!r}: must be a finite float (the paper's 4.6 gives 0.99)")
        policy_kwargs = dict(policy_kwargs or {})
        if policy_kwargs.get("n_heads", n_heads) != n_heads:
            raise ValueError(f"policy_kwargs n_heads={policy_kwargs['n_heads']} differs from n_heads={n_heads}")
        policy_kwargs = self._complete_policy_kwargs(policy_kwargs, dict(n_heads=n_heads, rms_prop_eps=rms_prop_eps))
        optimizer_kwargs = policy_kwargs["optimizer_kwargs"]
        for name, off in (("momentum", 0), ("centered", False), ("weight_decay", 0)):
            if optimizer_kwargs.get(name, off) != off:
                raise ValueError(f"STAC's differentiable RMSProp step supports no {name}, got {optimizer_kwargs}")

        self.n_heads = n_heads
        self.self_tune = self_tune
        self.pg_coef = pg_coef
        self.kl_coef = kl_coef
        self.rms_prop_eps = rms_prop_eps
        self.eta_init = eta_init
        self.meta_learning_rate = meta_learning_rate
        self.meta_optimizer_kwargs = dict(meta_optimizer_kwargs or {})
        self.n_epochs = n_epochs
        self.clip_rho_threshold = clip_rho_threshold
        self.clip_c_threshold = clip_c_threshold
        super().__init__(
            policy,  # type: ignore[arg-type]
            env,
            learning_rate=learning_rate,
            n_steps=n_steps,
            gamma=gamma,
            gae_lambda=gae_lambda,
            ent_coef=ent_coef,
            vf_coef=vf_coef,
            max_grad_norm=max_grad_norm,  # type: ignore[arg-type]
            use_sde=False,
            sde_sample_freq=-1,
            rollout_buffer_class=rollout_buffer_class,
            rollout_buffer_kwargs=rollout_buffer_kwargs,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=False,
            supported_action_spaces=self.supported_action_spaces,
        )
        if _init_setup_model:
            self._setup_model()

    @classmethod
    def _complete_policy_kwargs(cls, policy_kwargs: dict[str, Any], hyperparams: dict[str, Any]) -> dict[str, Any]:
        """The ``policy_kwargs`` stored with the model: the user's plus ``n_heads`` and RMSProp's ``alpha`` (Table 3:
        decay 0.99) and ``eps`` (``rms_prop_eps``) in ``optimizer_kwargs``, unless given. ``hyperparams`` holds
        ``n_heads`` and ``rms_prop_eps`` (the constructor's arguments, or a saved file's data in :meth:`load`)."""
        policy_kwargs = dict(policy_kwargs)
        policy_kwargs.setdefault("n_heads", hyperparams["n_heads"])
        optimizer_kwargs = dict(policy_kwargs.get("optimizer_kwargs") or {})
        optimizer_kwargs.setdefault("alpha", 0.99)  # Table 3: RMSProp decay
        optimizer_kwargs.setdefault("eps", hyperparams["rms_prop_eps"])
        policy_kwargs["optimizer_kwargs"] = optimizer_kwargs
        return policy_kwargs

    @classmethod
    def load(cls, path: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """SB3's ``load``, accepting as ``policy_kwargs`` the dict given to the constructor (issue #15, item 3)."""
        load_with_completed_policy_kwargs(cls, path, cls._complete_policy_kwargs, kwargs)
        return super().load(path, *args, **kwargs)

    def _setup_model(self) -> None:
        self.self_tune = tuple(self.self_tune)  # saved as a JSON list
        super()._setup_model()
        # Optax's RMSProp (the paper's, §8) starts its second moment at 0; SB3's RMSpropTFLike (TF's) at 1.
        for group in self.policy.optimizer.param_groups:
            for param in group["params"]:
                self.policy.optimizer.state[param] = {"step": 0, "square_avg": th.zeros_like(param)}
        self.eta = th.nn.Parameter(
            th.full((self.n_heads, len(self.self_tune)), float(self.eta_init), device=self.device)
        )
        meta_kwargs = {"betas": (0.9, 0.999), "eps": 1e-4, **self.meta_optimizer_kwargs}  # Table 3
        self.meta_optimizer = th.optim.Adam([self.eta], lr=self.meta_learning_rate, **meta_kwargs)
        self._reset_timeouts()

    # --- rollouts -----------------------------------------------------------------------------------

    def _reset_timeouts(self) -> None:
        self._timeout_index: list[int] = []
        self._timeout_obs: list[Any] = []
        self._timeout_bonus = np.zeros((self.n_steps, self.n_envs), dtype=np.float32)

    def collect_rollouts(
        self, env: VecEnv, callback: BaseCallback, rollout_buffer: RolloutBuffer, n_rollout_steps: int
    ) -> bool:
        self._reset_timeouts()
        return super().collect_rollouts(env, callback, rollout_buffer, n_rollout_steps)

    def _update_info_buffer(self, infos: list[dict[str, Any]], dones: np.ndarray | None = None) -> None:
        # Called by ``collect_rollouts`` just before SB3 adds gamma^outer V^1(x_terminal) to the reward of a
        # time-limit truncation (same policy, same observation, so the same value): record it to undo it.
        super()._update_info_buffer(infos, dones)
        if dones is None:
            return
        for idx, done in enumerate(dones):
            info = infos[idx]
            if done and info.get("terminal_observation") is not None and info.get("TimeLimit.truncated", False):
                terminal_obs = self.policy.obs_to_tensor(info["terminal_observation"])[0]
                with th.no_grad():
                    terminal_value = self.policy.predict_values(terminal_obs)[0]  # type: ignore[arg-type]
                step = self.rollout_buffer.pos
                self._timeout_bonus[step, idx] = float(self.gamma * terminal_value)
                self._timeout_index.append(step * self.n_envs + idx)
                self._timeout_obs.append(info["terminal_observation"])

    def _rollout_batch(self) -> RolloutBatch:
        """The rollout buffer's ``[n_steps, n_envs]`` arrays as a time-major :class:`RolloutBatch`."""
        buffer = self.rollout_buffer
        if buffer.generator_ready:
            raise RuntimeError("STAC needs the rollout buffer's time-major arrays; RolloutBuffer.get() flattened them")
        n_steps, n_envs = buffer.buffer_size, buffer.n_envs
        assert self._last_obs is not None and self._last_episode_starts is not None

        def stack(rollout: np.ndarray, last: np.ndarray, terminal: list[np.ndarray]) -> th.Tensor:
            shape = rollout.shape[2:]
            parts = [rollout.reshape(n_steps * n_envs, *shape), np.asarray(last).reshape(n_envs, *shape)]
            parts += [np.asarray(obs).reshape(1, *shape) for obs in terminal]
            return th.as_tensor(np.concatenate(parts), device=self.device)

        observations: PyTorchObs
        if isinstance(buffer.observations, dict):
            assert isinstance(self._last_obs, dict)
            observations = {
                key: stack(value, self._last_obs[key], [obs[key] for obs in self._timeout_obs])
                for key, value in buffer.observations.items()
            }
        else:
            observations = stack(buffer.observations, self._last_obs, self._timeout_obs)  # type: ignore[arg-type]

        actions = th.as_tensor(buffer.actions, device=self.device)
        if isinstance(self.action_space, spaces.Discrete):
            actions = actions.long().reshape(n_steps, n_envs)
        # The episode ends at step t when x_{t+1} starts a new one; after the last step, the last dones.
        dones = np.concatenate([buffer.episode_starts[1:], np.asarray(self._last_episode_starts, np.float32)[None]])
        as_float = lambda array: th.as_tensor(array, dtype=th.float32, device=self.device)  # noqa: E731
        return RolloutBatch(
            observations=observations,
            actions=actions,
            rewards=as_float(buffer.rewards - self._timeout_bonus),
            not_done=as_float(1.0 - dones),
            behaviour_log_probs=as_float(buffer.log_probs),
            timeout_index=th.as_tensor(self._timeout_index, dtype=th.long, device=self.device),
        )

    # --- the losses (Alg. 1) -------------------------------------------------------------------------

    def outer_hyperparameters(self) -> th.Tensor:
        """zeta of the outer loss (Alg. 2 line 5), ``[6]`` in ``META_NAMES`` order; alpha^outer = 1 (V-trace)."""
        return self.eta.new_tensor([self.gamma, self.gae_lambda, 1.0, self.vf_coef, self.pg_coef, self.ent_coef])

    def inner_hyperparameters(self) -> th.Tensor:
        """zeta(eta) of the inner losses (Alg. 2 line 10), ``[n_heads, 6]`` in ``META_NAMES`` order.

        sigma(eta) for gamma, lambda, alpha; sigma(eta) times the outer coefficient for g_v, g_p, g_e; the outer
        value for the names that are not self-tuned.
        """
        outer = self.outer_hyperparameters()
        zeta = outer.expand(self.n_heads, len(META_NAMES)).clone()
        if self.self_tune:
            tuned = [META_NAMES.index(name) for name in self.self_tune]  # eta's columns, in self_tune order
            scale = outer.new_tensor([1.0, 1.0, 1.0, self.vf_coef, self.pg_coef, self.ent_coef])[tuned]
            zeta[:, tuned] = th.sigmoid(self.eta) * scale
        return zeta

    def head_outputs(
        self, params: dict[str, th.Tensor], batch: RolloutBatch, n_heads: int | None = None
    ) -> HeadOutputs:
        """The network at ``params`` on ``batch`` (one forward pass over all observations)."""
        policy_out, values = self.policy.heads(batch.observations, params, n_heads)
        n_steps, n_envs = batch.rewards.shape
        n_heads = policy_out.shape[0]
        size = n_steps * n_envs
        rollout_out = policy_out[:, :size]
        actions = batch.actions.reshape(size, *batch.actions.shape[2:])
        log_probs, regulariser = self.policy.log_prob_and_regulariser(rollout_out, actions)
        return HeadOutputs(
            policy_out=rollout_out.reshape(n_heads, n_steps, n_envs, -1),
            log_probs=log_probs.reshape(n_heads, n_steps, n_envs),
            regulariser=regulariser.reshape(n_heads, n_steps, n_envs),
            values=values[:, :size].reshape(n_heads, n_steps, n_envs),
            bootstrap_values=values[:, size : size + n_envs],
            timeout_values=values[:, size + n_envs :],
        )

    def actor_critic_loss(
        self, out: HeadOutputs, batch: RolloutBatch, zeta: th.Tensor, inner: bool
    ) -> tuple[th.Tensor, dict[str, th.Tensor]]:
        """Algorithm 1 for each head p: g_v L_value + g_p L_policy + g_e L_entropy, ``[P]``.

        :param out: the network's outputs for heads 1..P
        :param zeta: hyperparameters ``[P, 6]`` (``META_NAMES`` order)
        :param inner: the inner flag: the policy loss's advantage keeps its gradient (line 20) or is stopped (22)
        :return: the per-head losses and head-1 statistics (per-sample means, as A2C logs them)

        The sums run over all ``n_steps`` steps (Alg. 1 stops at n - 1 so that v_{s+1} exists; here v_T is the
        bootstrap value V(x_T), as IMPALA's implementation).
        """
        n_heads, n_steps, n_envs = out.values.shape
        gamma, lambda_, alpha, g_v, g_p, g_e = zeta.unbind(dim=1)
        rewards = batch.rewards.expand(n_heads, n_steps, n_envs)
        if batch.timeout_index.numel() > 0:  # r + gamma^p sg(V^p(x_terminal)) at time limits
            bonus = gamma[:, None] * out.timeout_values.detach()
            rewards = rewards.reshape(n_heads, -1).index_add(1, batch.timeout_index, bonus)
            rewards = rewards.reshape(n_heads, n_steps, n_envs)
        discounts = gamma[:, None, None] * batch.not_done
        log_rhos = out.log_probs.detach() - batch.behaviour_log_probs  # Alg. 1 line 4

        # All heads in one call: time-major [T, P * N], per-head coefficients as [1, P * N].
        def time_major(x: th.Tensor) -> th.Tensor:
            return x.transpose(0, 1).reshape(n_steps, n_heads * n_envs)

        def per_column(c: th.Tensor) -> th.Tensor:
            return c.repeat_interleave(n_envs).unsqueeze(0)

        vtrace = leaky_vtrace(
            time_major(log_rhos),
            time_major(discounts),
            time_major(rewards),
            time_major(out.values),
            out.bootstrap_values.reshape(n_heads * n_envs),
            alpha_rho=per_column(alpha),
            alpha_c=per_column(alpha),  # one alpha = alpha_rho = alpha_c (§3.1)
            lambda_=per_column(lambda_),
            clip_rho_threshold=self.clip_rho_threshold,
            clip_c_threshold=self.clip_c_threshold,
        )
        vs = vtrace.vs.reshape(n_steps, n_heads, n_envs).transpose(0, 1)
        advantages = vtrace.pg_advantages.reshape(n_steps, n_heads, n_envs).transpose(0, 1)
        if not inner:
            advantages = advantages.detach()  # Alg. 1 line 22

        value_terms = (vs - out.values) ** 2  # line 17
        policy_terms = -advantages * out.log_probs  # lines 20 / 22
        entropy_terms = -out.regulariser  # line 18
        losses = (
            g_v * value_terms.sum(dim=(1, 2)) + g_p * policy_terms.sum(dim=(1, 2)) + g_e * entropy_terms.sum(dim=(1, 2))
        )
        stats = {
            "value_loss": value_terms[0].detach().mean(),
            "policy_loss": policy_terms[0].detach().mean(),
            "entropy_loss": entropy_terms[0].detach().mean(),
            "targets": vs[0].detach(),
        }
        return losses, stats

    # --- the update (Alg. 2) -------------------------------------------------------------------------

    def rmsprop_step(
        self, params: dict[str, th.Tensor], grads: list[th.Tensor]
    ) -> tuple[dict[str, th.Tensor], list[th.Tensor]]:
        """theta' = theta - lr g / sqrt(nu' + eps), nu' = decay nu + (1 - decay) g^2 (SB3's RMSpropTFLike formula,
        whose state it reads), written with differentiable tensor operations: autograd differentiates it."""
        optimizer = self.policy.optimizer
        group = optimizer.param_groups[0]
        lr, decay, eps = group["lr"], group["alpha"], group["eps"]
        if self.max_grad_norm is not None:  # as th.nn.utils.clip_grad_norm_, differentiably
            total_norm = th.linalg.vector_norm(th.stack([th.linalg.vector_norm(g) for g in grads]))
            coef = th.clamp(self.max_grad_norm / (total_norm + 1e-6), max=1.0)
            grads = [g * coef for g in grads]
        # One multi-tensor (torch._foreach) op per line instead of one op per line and parameter; the fused
        # addcmul and rsqrt also leave autograd fewer (and cheaper) nodes to differentiate:
        #   nu' = decay nu + (1 - decay) g g,   theta' = theta - lr g rsqrt(nu' + eps).
        with th.no_grad():
            decayed = th._foreach_mul([optimizer.state[param]["square_avg"] for param in params.values()], decay)
        new_square_avgs = list(th._foreach_addcmul(decayed, grads, grads, value=1 - decay))
        steps = th._foreach_rsqrt(th._foreach_add(new_square_avgs, eps))
        new_values = th._foreach_addcmul(list(params.values()), grads, steps, value=-lr)
        return dict(zip(params.keys(), new_values)), new_square_avgs

    def inner_step(self, params: dict[str, th.Tensor], batch: RolloutBatch, create_graph: bool) -> InnerStep:
        """Alg. 2 lines 10-12: zeta(eta), the inner loss averaged over heads, and theta'(eta) by one RMSProp step.

        :param create_graph: keep the graph of the gradient so that theta' is differentiable w.r.t. eta
        """
        out = self.head_outputs(params, batch)
        losses, stats = self.actor_critic_loss(out, batch, self.inner_hyperparameters(), inner=True)
        loss = losses.mean()  # line 11: (1/P) sum_p
        grads = th.autograd.grad(loss, list(params.values()), create_graph=create_graph, allow_unused=True)
        grads_ = [th.zeros_like(p) if g is None else g for p, g in zip(params.values(), grads)]
        with th.set_grad_enabled(create_graph):
            new_params, new_square_avgs = self.rmsprop_step(params, grads_)
        return InnerStep(loss, new_params, new_square_avgs, out, stats)

    def outer_loss(
        self, new_params: dict[str, th.Tensor], batch: RolloutBatch, old_outputs: HeadOutputs
    ) -> tuple[th.Tensor, th.Tensor]:
        """Alg. 2 lines 13-14 (Eq. (3)): Alg. 1 with the outer flag and fixed zeta at theta', head 1 only, plus
        g_kl sum KL(pi_theta'(.|x) || pi_theta(.|x)). Returns the outer loss and the per-sample mean KL."""
        out = self.head_outputs(new_params, batch, n_heads=1)
        losses, _ = self.actor_critic_loss(out, batch, self.outer_hyperparameters().unsqueeze(0), inner=False)
        kl = self.policy.kl(out.policy_out[0], old_outputs.policy_out[0].detach())
        return losses[0] + self.kl_coef * kl.sum(), kl.detach().mean()

    def _divergence_hint(self, batch: RolloutBatch, values: th.Tensor) -> str:
        """The likely cause of non-finite ``values`` = (inner loss[, outer loss, metagradient sum], updated parameter
        norm) (issue #15, item 12)."""
        finite = th.isfinite(values).tolist()
        hint = divergence_hint(rewards=batch.rewards, observations=batch.observations, where="the rollout")
        if hint.startswith("the rollout holds"):
            return hint
        if not bool(th.isfinite(self.eta).all()) or (finite[0] and not all(finite[:-1])):
            return (
                f"the metaparameters are the likely cause (eta_init={self.eta_init}, meta/gamma = "
                f"{self.metaparameters['gamma'][0]:.6g}): try a lower meta_learning_rate or eta_init, or a smaller "
                "set of self_tune names"
            )
        return "the inner step size is the likely cause: try a lower learning_rate (or set max_grad_norm)"

    def train(self) -> None:
        self.policy.set_training_mode(True)
        optimizer = self.policy.optimizer
        self._update_learning_rate(optimizer)
        batch = self._rollout_batch()
        params: dict[str, th.Tensor] = dict(self.policy.net.named_parameters())
        tuned = len(self.self_tune) > 0
        for epoch in range(self.n_epochs):
            inner = self.inner_step(params, batch, create_graph=tuned)
            checked = [inner.loss.detach()]
            if tuned:
                outer, kl = self.outer_loss(inner.new_params, batch, inner.outputs)
                (meta_grad,) = th.autograd.grad(outer, [self.eta])
                checked += [outer.detach(), meta_grad.sum()]
            new_values = [value.detach() for value in inner.new_params.values()]
            checked.append(th.stack(th._foreach_norm(new_values)).sum())  # the step's update, same sync
            values = th.stack(checked)
            if not bool(th.isfinite(values).all()):
                names = "inner loss, outer loss, metagradient sum" if tuned else "inner loss"
                raise NonFiniteLossError(
                    f"{type(self).__name__}: non-finite ({names}, updated parameter norm) = "
                    f"{values.tolist()} at update {self._n_updates + epoch + 1}; {self._divergence_hint(batch, values)}"
                    ". This update was not applied."
                )
            if tuned:
                self.eta.grad = meta_grad  # the whole gradient: no zero_grad needed
                self.meta_optimizer.step()
            with th.no_grad():  # theta <- theta'(eta_t): the inner step itself
                square_avgs = [optimizer.state[param]["square_avg"] for param in params.values()]
                th._foreach_copy_(list(params.values()), list(inner.new_params.values()))
                th._foreach_copy_(square_avgs, inner.new_square_avgs)
                for param in params.values():
                    optimizer.state[param]["step"] += 1

        self._n_updates += self.n_epochs
        stats = inner.stats
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record(
            "train/explained_variance",
            explained_variance(
                inner.outputs.values[0].detach().cpu().numpy().ravel(), stats["targets"].cpu().numpy().ravel()
            ),
        )
        # All logged scalars leave the device together (one transfer instead of one .item() per key).
        scalars = {
            "train/loss": inner.loss,
            "train/entropy_loss": stats["entropy_loss"],
            "train/policy_loss": stats["policy_loss"],
            "train/value_loss": stats["value_loss"],
        }
        if tuned:
            scalars.update({"train/outer_loss": outer, "train/kl": kl})
        if self.policy.continuous:
            dist = self.policy.distribution(inner.outputs.policy_out[0])
            assert isinstance(dist, th.distributions.Normal)
            scalars["train/std"] = dist.scale.mean()
        with th.no_grad():
            zeta = self.inner_hyperparameters()  # after the meta-update
            flat = th.cat([th.stack([value.detach() for value in scalars.values()]), zeta.flatten()]).cpu().tolist()
        for key, value in zip(scalars, flat):
            self.logger.record(key, value)
        for head in range(self.n_heads):
            prefix = "meta/" if head == 0 else f"meta/head{head + 1}/"
            for k, name in enumerate(META_NAMES):
                self.logger.record(prefix + name, flat[len(scalars) + head * len(META_NAMES) + k])

    def learn(
        self: SelfSTAC,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 100,
        tb_log_name: str | None = None,
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfSTAC:
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name or type(self).__name__,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )

    @property
    def metaparameters(self) -> dict[str, list[float]]:
        """The inner hyperparameters zeta(eta) in use, per name, one value per head (head 1 first)."""
        with th.no_grad():
            zeta = self.inner_hyperparameters().cpu()
        return {name: zeta[:, k].tolist() for k, name in enumerate(META_NAMES)}

    @classmethod
    def _wrap_env(cls, env: GymEnv, verbose: int = 0, monitor_wrapper: bool = True) -> VecEnv:  # type: ignore[override]
        space = env.action_space
        if isinstance(space, spaces.Box) and (
            len(space.shape) != 1 or not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high)))
        ):
            raise ValueError(f"{cls.__name__} needs a bounded 1-D Box action space (squashed Gaussian), got {space}")
        return super()._wrap_env(env, verbose, monitor_wrapper)

    def _excluded_save_params(self) -> list[str]:
        # Per-rollout records of time-limit truncations (rebuilt by the next rollout).
        return [*super()._excluded_save_params(), "_timeout_index", "_timeout_obs", "_timeout_bonus"]

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        # The metaparameter logits and Adam's state on them survive save/load.
        return ["policy", "policy.optimizer", "meta_optimizer"], ["eta"]


class STACX(STAC):
    """STACX (STAC paper §3.2): STAC with ``n_heads=3`` (head 1 acts, heads 2-3 are self-tuned auxiliary tasks).

    Same arguments as :class:`STAC`; only the default of ``n_heads`` differs.
    """

    def __init__(self, policy: str | type[STACPolicy], env: GymEnv | str, n_heads: int = 3, **kwargs: Any) -> None:
        super().__init__(policy, env, n_heads=n_heads, **kwargs)
