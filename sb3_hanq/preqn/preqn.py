"""PreQN: Preconditioned Q-Networks, DDPG-style deep Q-learning without target networks.

Paper: Achiam, Knight & Abbeel, "Towards Characterizing Divergence in Deep Q-Learning" (2019), §4 (Alg. 1),
§5.2 and Appendix B.
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.noise import ActionNoise, NormalActionNoise
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.td3 import TD3

from sb3_hanq.common.ntk import (
    LSTSQ_METHODS,
    LineSearchResult,
    QFunction,
    backtracking_linesearch,
    ntk_diagonal,
    ntk_row_ratio,
    preconditioned_direction,
)
from sb3_hanq.common.utils import (
    NonFiniteLossError,
    SupportedActionSpacesMixin,
    check_choice,
    check_gamma,
    check_positive_int,
    check_positive_lr,
    divergence_hint,
    restored_on_divergence,
)
from sb3_hanq.preqn.policies import CnnPolicy, MlpPolicy, MultiInputPolicy, PreQNPolicy

SelfPreQN = TypeVar("SelfPreQN", bound="PreQN")

DEFAULT_ACTION_NOISE = "default"


class PreQN(SupportedActionSpacesMixin, TD3):
    """PreQN (PreQN paper §4, Alg. 1): DDPG with the critic trained by NTK-preconditioned steps, no target networks.

    Each gradient step, on a minibatch B = {(s_i, a_i, r_i, s'_i, d_i)} from the replay buffer:

    1. TD errors (line 10), bootstrapping from the critic and actor themselves (no target networks):
       ``Delta_i = r_i + gamma (1 - d_i) Q_theta(s'_i, mu_phi(s'_i)) - Q_theta(s_i, a_i)``.
    2. The critic's NTK on B, ``K_ij = grad_theta Q(s_i, a_i) . grad_theta Q(s_j, a_j)`` (Eq. 9; line 11),
       layer by layer for MLP critics (:func:`~sb3_hanq.common.ntk.mlp_ntk`), from per-sample Jacobians
       otherwise; the least-squares solution ``Z = K^+ Delta`` (Eq. 22, :func:`~sb3_hanq.common.ntk.ntk_lstsq`:
       eigendecomposition, eigenvalues below ``lstsq_rtol * lambda_max`` treated as zero; or, with
       ``lstsq_method="cholesky"``, the ridge-regularised solve ``(K + r lambda_max I)^-1 Delta`` with r at the
       round-off level, ~6x faster on CPU: it solves the well-conditioned part of K like ``eigh`` and damps
       instead of drops the numerically-zero eigenvalues, a documented deviation from the paper's least squares).
    3. The proposed step ``theta' = theta + alpha_q sum_i Z_i grad_theta Q(s_i, a_i)`` (Eq. 23; line 12). The
       sum is never formed sample by sample: for MLP critics it is one matrix product per layer from the
       kernel's backward signals, otherwise one backward pass of ``sum_i Z_i Q_i``
       (:func:`~sb3_hanq.common.ntk.preconditioned_direction`). A plain step: no momentum, no adaptive scaling.
    4. Backtracking line search (Eq. 24; line 13): the step is multiplied by ``backtrack_factor`` until
       ``cos(Q_theta'(B) - Q_theta(B), Delta) >= eta``, at most ``max_backtracks`` times; if even the last
       candidate fails, the step is **rejected**: the critic keeps its parameters and ``rejected_steps`` grows.
    5. The actor takes one Adam step on ``-mean_B Q_theta(s, mu_phi(s))`` with the updated critic (line 14).

    To first order step 3 changes the Q-values of B by ``alpha_q K K^+ Delta``, i.e. by ``alpha_q Delta`` when K
    has full rank: the tabular-like update of Eq. 20, which is a contraction (Lemma 1). The line search keeps
    the higher-order terms small.

    Defaults are Appendix B's: gamma 0.99, batch 256, [256, 256] networks, actor Adam with learning rate 1e-3,
    critic step size alpha_q = 0.1, action noise N(0, 0.1), 5000 uniform-random start steps before the first
    update ("update after" = "start steps" = 5000: SB3's ``learning_starts`` does both), updates every 50
    environment steps with as many gradient steps as environment steps elapsed (``train_freq=50``,
    ``gradient_steps=-1``), eta = 0.97; the critic uses ``sin`` activations (see :class:`PreQNPolicy`). The paper
    does not give the line search's shrink factor or cap; ours are ``backtrack_factor=0.5`` and
    ``max_backtracks=10``: the smallest step tried is alpha_q / 1024 ~ 1e-4, where the first-order model holds
    for the networks we tried, so a step still failing there is one the linear model cannot align
    (``K K^+ Delta`` far from ``Delta``, e.g. K numerically rank deficient) and shrinking further would not help.

    Logged (once per ``train()`` call, means over its gradient steps unless said otherwise):

    * ``train/critic_alignment``: cos(Q' - Q, Delta) of the accepted steps (>= eta by construction);
    * ``train/linesearch_backtracks``: number of shrinkings per gradient step (``max_backtracks`` for a rejected
      step);
    * ``train/rejected_steps``: total number of rejected critic steps since the model was created;
    * ``train/ntk_row_ratio``: the average row ratio ``mean_i R_i`` of the minibatch NTK (§5.1);
    * ``train/ntk_diag``: the average diagonal entry ``mean_i K_ii`` of the minibatch NTK (§5.1);
    * ``train/critic_loss``: mean squared TD error ``mean_B Delta^2`` before the critic step;
    * ``train/actor_loss``: ``-mean_B Q(s, mu(s))``;
    * ``train/n_updates``: total number of gradient steps.

    :param policy: ``"MlpPolicy"``, ``"CnnPolicy"``, ``"MultiInputPolicy"`` or a :class:`PreQNPolicy` subclass;
        the critic's activation is ``policy_kwargs=dict(critic_activation="sin" | "relu" | "tanh")``
    :param env: the environment (``Box`` actions); may be a registered id
    :param learning_rate: the actor's Adam learning rate alpha_mu (Appendix B: 1e-3); float or schedule
    :param buffer_size: replay buffer size
    :param learning_starts: uniform-random transitions collected before learning (Appendix B: 5000)
    :param batch_size: minibatch size (Appendix B: 256)
    :param gamma: discount factor (Appendix B: 0.99)
    :param train_freq: update every ``train_freq`` environment steps (Appendix B: 50)
    :param gradient_steps: gradient steps per update; -1 (default) is as many as environment steps elapsed
        (Appendix B)
    :param action_noise: exploration noise; ``"default"`` is Gaussian N(0, 0.1) on the actions rescaled to
        [-1, 1] (Appendix B), ``None`` disables it, or any SB3 ``ActionNoise``
    :param replay_buffer_class: replay buffer class (as in TD3)
    :param replay_buffer_kwargs: replay buffer keyword arguments
    :param optimize_memory_usage: memory-efficient replay buffer
    :param n_steps: n-step returns (as in TD3)
    :param critic_step_size: alpha_q, the critic's (largest) step size (Appendix B: 0.1); must be > 0
    :param eta: alignment threshold of the line search, in (0, 1] (Appendix B: 0.97)
    :param max_backtracks: cap on the line search's shrinkings (>= 0) before a step is rejected (default 10)
    :param backtrack_factor: the line search's shrink factor, in (0, 1) (default 0.5)
    :param lstsq_rtol: relative eigenvalue cutoff of the least-squares solve (``None``: n * float eps), or the
        ridge of the ``"cholesky"`` solve relative to K's largest eigenvalue (``None``: eps, then n * eps if that
        factorisation fails), see :func:`~sb3_hanq.common.ntk.ntk_lstsq`
    :param lstsq_method: ``"eigh"`` (default: the minimum-norm least squares of Eq. 22) or ``"cholesky"``
        (ridge-regularised, faster; falls back to ``"eigh"`` when no factorisation succeeds)
    :param stats_window_size: window for rollout logging
    :param tensorboard_log: TensorBoard log directory
    :param policy_kwargs: policy keyword arguments (see :class:`PreQNPolicy`)
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
    supported_action_spaces: ClassVar[tuple[type[spaces.Space], ...]] = (spaces.Box,)
    policy: PreQNPolicy
    actor_target: None  # type: ignore[assignment]
    critic_target: None  # type: ignore[assignment]

    def __init__(
        self,
        policy: str | type[PreQNPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 1e-3,
        buffer_size: int = 1_000_000,
        learning_starts: int = 5000,
        batch_size: int = 256,
        gamma: float = 0.99,
        train_freq: int | tuple[int, str] = 50,
        gradient_steps: int = -1,
        action_noise: ActionNoise | str | None = DEFAULT_ACTION_NOISE,
        replay_buffer_class: type[ReplayBuffer] | None = None,
        replay_buffer_kwargs: dict[str, Any] | None = None,
        optimize_memory_usage: bool = False,
        n_steps: int = 1,
        critic_step_size: float = 0.1,
        eta: float = 0.97,
        max_backtracks: int = 10,
        backtrack_factor: float = 0.5,
        lstsq_rtol: float | None = None,
        lstsq_method: str = "eigh",
        stats_window_size: int = 100,
        tensorboard_log: str | None = None,
        policy_kwargs: dict[str, Any] | None = None,
        verbose: int = 0,
        seed: int | None = None,
        device: th.device | str = "auto",
        _init_setup_model: bool = True,
    ) -> None:
        check_positive_lr("learning_rate", learning_rate)
        check_gamma(gamma)
        if isinstance(critic_step_size, bool) or not (
            isinstance(critic_step_size, (int, float)) and critic_step_size > 0
        ):
            raise ValueError(f"Invalid critic_step_size={critic_step_size!r}: must be a float > 0")
        if isinstance(eta, bool) or not (isinstance(eta, (int, float)) and 0 < eta <= 1):
            raise ValueError(f"Invalid eta={eta!r}: the alignment threshold must be in (0, 1]")
        if isinstance(max_backtracks, bool) or not (isinstance(max_backtracks, int) and max_backtracks >= 0):
            raise ValueError(f"Invalid max_backtracks={max_backtracks!r}: must be an int >= 0")
        if not (isinstance(backtrack_factor, (int, float)) and 0 < backtrack_factor < 1):
            raise ValueError(f"Invalid backtrack_factor={backtrack_factor!r}: must be in (0, 1)")
        if lstsq_rtol is not None and not (isinstance(lstsq_rtol, (int, float)) and 0 <= lstsq_rtol < 1):
            raise ValueError(f"Invalid lstsq_rtol={lstsq_rtol!r}: must be None or in [0, 1)")
        check_choice("lstsq_method", lstsq_method, LSTSQ_METHODS)
        check_positive_int("batch_size", batch_size)
        if isinstance(action_noise, str) and action_noise != DEFAULT_ACTION_NOISE:
            raise ValueError(
                f"Invalid action_noise={action_noise!r}: expected an ActionNoise, None or {DEFAULT_ACTION_NOISE!r}"
            )
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            buffer_size=buffer_size,
            learning_starts=learning_starts,
            batch_size=batch_size,
            tau=1.0,  # unused: no target networks
            gamma=gamma,
            train_freq=train_freq,
            gradient_steps=gradient_steps,
            action_noise=None if isinstance(action_noise, str) else action_noise,
            replay_buffer_class=replay_buffer_class,
            replay_buffer_kwargs=replay_buffer_kwargs,
            optimize_memory_usage=optimize_memory_usage,
            n_steps=n_steps,
            # DDPG-style (Alg. 1): the actor is updated at every gradient step, targets are not smoothed.
            policy_delay=1,
            target_policy_noise=0.0,
            target_noise_clip=0.0,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=False,
        )
        self.critic_step_size = float(critic_step_size)
        self.eta = float(eta)
        self.max_backtracks = max_backtracks
        self.backtrack_factor = float(backtrack_factor)
        self.lstsq_rtol = lstsq_rtol
        self.lstsq_method = lstsq_method
        self.rejected_steps = 0
        # Appendix B's N(0, 0.1) needs the action dimension: made in _setup_model.
        self._default_action_noise = action_noise == DEFAULT_ACTION_NOISE
        if _init_setup_model:
            self._setup_model()

    def _setup_model(self) -> None:
        if self._default_action_noise:  # one noise value per action entry, shaped like the actions (as TD3's)
            shape = self.action_space.shape
            assert shape is not None
            self.action_noise = NormalActionNoise(mean=np.zeros(shape), sigma=0.1 * np.ones(shape))
            self._default_action_noise = False
        # TD3's set-up minus everything about target networks.
        OffPolicyAlgorithm._setup_model(self)
        self._create_aliases()

    def _create_aliases(self) -> None:
        self.actor = self.policy.actor
        self.critic = self.policy.critic
        self.actor_target = None
        self.critic_target = None
        self._q_function = QFunction(self.critic)

    def train(self, gradient_steps: int, batch_size: int = 256) -> None:
        """Alg. 1 for ``gradient_steps`` minibatches. A :class:`NonFiniteLossError` leaves the model (actor, critic,
        the actor's optimiser, ``rejected_steps``) as it was at the start of the call."""
        if gradient_steps <= 0:
            return
        attributes = ("_n_updates", "rejected_steps")
        with restored_on_divergence(self, [self.policy], [self.actor.optimizer], attributes=attributes):
            self._train(gradient_steps, batch_size)

    def _train(self, gradient_steps: int, batch_size: int) -> None:
        self.policy.set_training_mode(True)
        self._update_learning_rate([self.actor.optimizer])
        q_function = self._q_function
        params = list(q_function.params.values())
        actor_params = list(self.actor.parameters())

        alignments: list[float] = []
        backtracks: list[int] = []
        step_stats: list[th.Tensor] = []  # per step: row ratio, diagonal, critic loss, actor loss
        for _ in range(gradient_steps):
            self._n_updates += 1
            data = self.replay_buffer.sample(batch_size, env=self._vec_normalize_env)  # type: ignore[union-attr]
            discounts = data.discounts if data.discounts is not None else self.gamma
            obs, actions = data.observations, data.actions

            # Alg. 1 line 10: Delta_i = r_i + gamma (1 - d_i) Q(s'_i, mu(s'_i)) - Q(s_i, a_i), no target networks.
            with th.no_grad():
                next_q = q_function(data.next_observations, self.actor(data.next_observations))
                targets = (data.rewards + (1 - data.dones) * discounts * next_q[:, None]).reshape(-1)
            # Line 11: the minibatch NTK, and Q(s, a) with its graph (one forward, one backward pass).
            ntk = q_function.ntk_and_q(obs, actions)
            kernel, q_before = ntk.kernel, ntk.output.detach()
            delta = targets - q_before
            critic_loss = (delta**2).mean()
            if not bool(th.isfinite(critic_loss)):
                self._raise_non_finite("critic loss (mean squared TD error)", critic_loss, data)
            if not bool(th.isfinite(kernel).all()):
                self._raise_non_finite("NTK entry", kernel[~th.isfinite(kernel)][0], data)
            # Lines 11-12: Z = K^+ Delta and the direction sum_i Z_i grad Q_i (from the kernel's backward pass).
            direction, _ = preconditioned_direction(ntk, params, delta, self.lstsq_rtol, self.lstsq_method)
            del ntk

            # Line 13: backtrack theta' = theta + alpha d towards theta until cos(Q' - Q, Delta) >= eta.
            search, candidate = self._line_search(obs, actions, q_before, delta, direction)
            with th.no_grad():
                if search.accepted:
                    th._foreach_copy_(params, candidate)  # exactly the parameters that were evaluated
                    alignments.append(search.alignment)
                else:
                    self.rejected_steps += 1  # the critic keeps theta
            backtracks.append(search.backtracks)

            # Line 14: one Adam step of the actor on -Q(s, mu(s)), with the updated critic.
            actor_loss = -self.critic.q1_forward(obs, self.actor(obs)).mean()
            if not bool(th.isfinite(actor_loss)):
                self._raise_non_finite("actor loss", actor_loss, data)
            self.actor.optimizer.zero_grad()
            actor_loss.backward(inputs=actor_params)  # the critic's own gradients are not needed
            self.actor.optimizer.step()

            with th.no_grad():
                step_stats.append(
                    th.stack(
                        [
                            ntk_row_ratio(kernel).mean(),
                            ntk_diagonal(kernel).mean(),
                            critic_loss,
                            actor_loss.detach(),
                        ]
                    )
                )

        if not self._parameters_finite():  # the last step's update (its losses were finite)
            raise NonFiniteLossError(
                f"{type(self).__name__}: non-finite parameters after gradient step {self._n_updates} (finite losses); "
                "the actor's learning_rate is the likely cause: try a lower one."
            )
        row_ratio, diagonal, critic_loss_mean, actor_loss_mean = th.stack(step_stats).mean(dim=0).tolist()
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        if alignments:
            self.logger.record("train/critic_alignment", float(np.mean(alignments)))
        self.logger.record("train/linesearch_backtracks", float(np.mean(backtracks)))
        self.logger.record("train/rejected_steps", self.rejected_steps)
        self.logger.record("train/ntk_row_ratio", row_ratio)
        self.logger.record("train/ntk_diag", diagonal)
        self.logger.record("train/critic_loss", critic_loss_mean)
        self.logger.record("train/actor_loss", actor_loss_mean)

    def _raise_non_finite(self, name: str, value: th.Tensor, data: Any) -> None:
        """:class:`NonFiniteLossError` naming the loss, the gradient step and the likely cause (:meth:`train` then
        restores the model to its state at the start of the call)."""
        hint = divergence_hint(
            rewards=data.rewards,
            observations=data.observations,
            next_observations=data.next_observations,
            gamma=self.gamma,
            learning_rate_hint="the step sizes are the likely cause: try a smaller critic_step_size or learning_rate "
            "(actor), or another critic_activation",
        )
        raise NonFiniteLossError(
            f"{type(self).__name__}: non-finite {name} {float(value)} at gradient step {self._n_updates} "
            f"(critic_step_size={self.critic_step_size}); {hint}."
        )

    def _parameters_finite(self) -> bool:
        """One device sync for all parameters of actor and critic."""
        norms = th._foreach_norm([p.detach() for p in self.policy.parameters()])
        return bool(th.isfinite(th.stack(norms)).all())

    def _line_search(
        self,
        obs: th.Tensor | dict[str, th.Tensor],
        actions: th.Tensor,
        q_before: th.Tensor,
        delta: th.Tensor,
        direction: list[th.Tensor],
    ) -> tuple[LineSearchResult, list[th.Tensor]]:
        """Eq. 24 on the batch: the search's outcome and the last candidate parameters it evaluated."""
        names, params = list(self._q_function.params), list(self._q_function.params.values())
        candidate: list[th.Tensor] = []

        def evaluate(alpha: float) -> th.Tensor:  # Q_{theta + alpha d}(B), the critic itself untouched
            candidate[:] = th._foreach_add(params, direction, alpha=alpha)
            return self._q_function(obs, actions, dict(zip(names, candidate)))

        with th.no_grad():
            search = backtracking_linesearch(
                evaluate, q_before, delta, self.critic_step_size, self.eta, self.backtrack_factor, self.max_backtracks
            )
        return search, candidate

    def learn(
        self: SelfPreQN,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 4,
        tb_log_name: str = "PreQN",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfPreQN:
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )

    def _excluded_save_params(self) -> list[str]:
        # _q_function only refers to the critic, which is saved inside the policy.
        return [*super()._excluded_save_params(), "_q_function", "_training_snapshot"]

    def _get_torch_save_params(self) -> tuple[list[str], list[str]]:
        return ["policy", "actor.optimizer"], []  # the critic has no optimiser
