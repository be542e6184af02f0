"""CrossQ + WN: CrossQ with weight normalisation, AdamW and (optional) target networks.

Paper: "Scaling Off-Policy Reinforcement Learning with Batch and Weight Normalization" (CrossQ + WN);
built on sb3-contrib's CrossQ (Bhatt et al., 2024).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch as th
from gymnasium import spaces
from sb3_contrib import CrossQ
from sb3_contrib.crossq.policies import CrossQCritic
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.noise import ActionNoise
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import polyak_update
from torch.nn import functional as F

from sb3_hanq.common.utils import (
    NonFiniteLossError,
    SupportedActionSpacesMixin,
    check_bool,
    check_choice,
    check_gamma,
    check_non_negative,
    check_positive_int,
    check_positive_lr,
    divergence_hint,
    load_with_completed_policy_kwargs,
    restored_on_divergence,
)
from sb3_hanq.common.weight_norm import PROJECTION_MODES, dense_weight_norm
from sb3_hanq.crossq_wn.policies import CrossQWNPolicy, MlpPolicy

SelfCrossQWN = TypeVar("SelfCrossQWN", bound="CrossQWN")

#: Policy keyword arguments that CrossQWN sets from its own arguments (``tau`` gives ``target_network``).
POLICY_KWARGS_FROM_ARGUMENTS = ("weight_norm_mode", "actor_weight_norm", "weight_decay", "target_network")


class CrossQWN(SupportedActionSpacesMixin, CrossQ):
    """CrossQ + WN (CrossQ + WN paper, §4): CrossQ whose batch-normalised hidden layers are held at unit norm.

    Each gradient step is CrossQ's (one joint forward pass of the critic over ``[s; s']`` and ``[a; a']`` in
    training mode, clipped double-Q soft Bellman target, actor and temperature updates every ``policy_delay``
    critic updates), plus:

    1. **Weight normalisation** (§4 "Implementation details"). After every critic (actor) optimiser step, the
       weights of the hidden dense layers of each critic (of the actor) are projected back onto the unit
       sphere, per output unit (``weight_norm_mode="row"``, default) or per matrix (``"matrix"``). These
       layers feed batch normalisation, so the critic is scale invariant in them (Theorem 4.1) and the
       projection does not change what they compute; it stops the weight norms from growing with the
       number of updates (§3, Fig. 2) and so keeps the effective learning rate constant (Theorem 4.2).
       See :func:`~sb3_hanq.common.weight_norm.project_unit_norm_`. The paper projects "the first two linear
       layers", which with its two hidden layers are all the hidden layers; we project every hidden layer
       followed by batch normalisation, never the output layers.
    2. **The actor too** (``actor_weight_norm=True``). §4 does not say which networks; we project the actor's
       hidden layers as well, because §5.1 puts batch normalisation in both actor and critic (so the same
       scale invariance holds) and Appendix C gives the actor the same AdamW weight decay (1e-2) as the
       critic, a decay §4 reserves for the parameters that are *not* normalised.
    3. **AdamW with two parameter groups** (§4, Appendix C): weight decay 0 for the projected layers
       (weights and biases: AdamW then is Adam), ``weight_decay`` for every other parameter (output layers,
       batch-normalisation scales and offsets). The temperature keeps CrossQ's Adam without decay (Table 1).
    4. **Target networks** (§4 "Target networks", on by default, ``tau=0.005``). The critic and the target
       critic each run one joint forward pass over ``[s; s']``, ``[a; a']`` with batch normalisation in
       training mode; the TD target uses the ``s'`` half of the *target's* output, and after each critic
       step the target parameters move by Polyak averaging, ``theta' <- (1 - tau) theta' + tau theta``
       (after the projection). ``tau=1.0`` allocates no target and is CrossQ's joint pass without target.
       The target's batch-normalisation running statistics are *its own*: they are updated by its
       training-mode forward pass on each joint batch, exactly as the critic's are by its pass, and are
       neither copied nor Polyak-averaged from the critic. They describe the target's activations, which
       differ from the critic's because its weights lag; with BatchRenorm they only enter the output after
       ``renorm_warmup_steps`` (before that both networks normalise with batch statistics, as §4 asks).

    Defaults are the paper's for CrossQ + WN (Appendix C, Table 1): learning rate 1e-4 for actor, critic and
    temperature; critic hidden layers [512, 512], actor [256, 256]; batch-norm momentum 0.99 in the paper's
    Flax convention, which is ``batch_norm_momentum=0.01`` in BatchRenorm1d's (see :class:`CrossQWNPolicy`);
    two critics; initial temperature 1 and target entropy ``-dim(A)`` (``"auto"``); Polyak ``tau`` 0.005;
    policy delay 3; 5000 warm-up transitions; batch size 256; AdamW with betas (0.9, 0.999) and weight decay
    1e-2 (0 for the projected layers). The update-to-data ratio is ``gradient_steps`` per ``train_freq``
    environment steps: the paper uses 1 and 5 (its strongest results use 5); the default is 1, as in SB3.
    The paper also repeats each action twice (Table 1 "Action repeat"), an environment wrapper not applied here.

    Logs CrossQ's keys (``train/n_updates``, ``train/ent_coef``, ``train/actor_loss``, ``train/critic_loss``,
    ``train/ent_coef_loss``) and ``train/critic_weight_norm``: after the last gradient step of the call, the sum
    over every dense layer of all critics of the Frobenius norm of its weight matrix (Fig. 2, row 3). Under
    ``"row"`` each projected layer contributes ``sqrt(width)``, under ``"matrix"`` 1; the rest is the output
    layers'. :class:`~sb3_hanq.common.callbacks.WeightNormCallback` logs the same for CrossQ or SAC.

    :param policy: ``"MlpPolicy"`` or a :class:`CrossQWNPolicy` subclass; network choices (``net_arch``,
        ``batch_norm_momentum``, ``n_critics``...) go in ``policy_kwargs``
    :param env: the environment (``Box`` actions); may be a registered id
    :param learning_rate: learning rate of actor, critic and temperature (Appendix C: 1e-4); float or schedule
    :param buffer_size: replay buffer size
    :param learning_starts: random-action transitions collected before learning (Appendix C warm-up: 5000)
    :param batch_size: minibatch size (Appendix C: 256)
    :param gamma: discount factor
    :param train_freq: update the model every ``train_freq`` steps (or ``(n, "episode")``)
    :param gradient_steps: gradient steps per update, i.e. the UTD ratio with ``train_freq=1`` (paper: 1 or 5)
    :param action_noise: action noise added to the policy's actions (as in CrossQ)
    :param replay_buffer_class: replay buffer class (as in CrossQ)
    :param replay_buffer_kwargs: replay buffer keyword arguments
    :param optimize_memory_usage: memory-efficient replay buffer
    :param n_steps: n-step returns (as in CrossQ)
    :param ent_coef: entropy coefficient, ``"auto"`` to learn it from 1.0 (Appendix C initial temperature 1.0)
    :param target_entropy: target entropy when learning ``ent_coef``; ``"auto"`` is ``-dim(A)``
    :param policy_delay: critic updates per actor (and temperature) update (Appendix C: 3)
    :param tau: Polyak rate of the target critic (Appendix C "target network momentum" 0.005); ``1.0``: no
        target network (CrossQ's target from the critic's own joint pass)
    :param weight_decay: AdamW weight decay of the unprojected parameters (Appendix C: 1e-2; must be >= 0)
    :param weight_norm_mode: ``"row"`` projects each output unit's weights (default), ``"matrix"`` each weight
        matrix, onto the unit sphere
    :param actor_weight_norm: project the actor's hidden layers too (default ``True``, see point 2 above)
    :param use_sde: generalised state-dependent exploration
    :param sde_sample_freq: resample the gSDE noise every this many steps (-1: at rollout start only)
    :param use_sde_at_warmup: use gSDE instead of uniform actions during warm-up
    :param stats_window_size: window for rollout logging
    :param tensorboard_log: TensorBoard log directory
    :param policy_kwargs: policy keyword arguments (see :class:`CrossQWNPolicy`)
    :param verbose: verbosity level
    :param seed: random seed
    :param device: ``"auto"``, ``"cpu"``, ``"cuda"``...
    :param _init_setup_model: build the networks at creation
    """

    policy_aliases: ClassVar[dict[str, type[BasePolicy]]] = {"MlpPolicy": MlpPolicy}
    supported_action_spaces: ClassVar[tuple[type[spaces.Space], ...]] = (spaces.Box,)
    policy: CrossQWNPolicy
    critic_target: CrossQCritic | None

    def __init__(
        self,
        policy: str | type[CrossQWNPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 1e-4,
        buffer_size: int = 1_000_000,
        learning_starts: int = 5000,
        batch_size: int = 256,
        gamma: float = 0.99,
        train_freq: int | tuple[int, str] = 1,
        gradient_steps: int = 1,
        action_noise: ActionNoise | None = None,
        replay_buffer_class: type[ReplayBuffer] | None = None,
        replay_buffer_kwargs: dict[str, Any] | None = None,
        optimize_memory_usage: bool = False,
        n_steps: int = 1,
        ent_coef: str | float = "auto",
        target_entropy: str | float = "auto",
        policy_delay: int = 3,
        tau: float = 0.005,
        weight_decay: float = 1e-2,
        weight_norm_mode: str = "row",
        actor_weight_norm: bool = True,
        use_sde: bool = False,
        sde_sample_freq: int = -1,
        use_sde_at_warmup: bool = False,
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
        check_non_negative("weight_decay", weight_decay, " (the paper uses 1e-2; 0 makes AdamW plain Adam)")
        check_choice("weight_norm_mode", weight_norm_mode, PROJECTION_MODES)
        if not (isinstance(tau, (int, float)) and 0 < tau <= 1):
            raise ValueError(f"Invalid tau={tau!r}: must be in (0, 1] (1 = no target network)")
        check_bool("actor_weight_norm", actor_weight_norm)
        check_positive_int("batch_size", batch_size)
        check_positive_int("policy_delay", policy_delay, " (critic updates per actor update; the paper uses 3)")
        policy_kwargs = dict(policy_kwargs or {})
        for key in POLICY_KWARGS_FROM_ARGUMENTS:
            if key in policy_kwargs:
                raise ValueError(
                    f"Pass {key} as an argument of {type(self).__name__} (tau for target_network), not in policy_kwargs"
                )
        policy_kwargs = self._complete_policy_kwargs(
            policy_kwargs,
            dict(
                weight_norm_mode=weight_norm_mode,
                actor_weight_norm=actor_weight_norm,
                weight_decay=weight_decay,
                tau=tau,
                use_sde=use_sde,
            ),
        )
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            buffer_size=buffer_size,
            learning_starts=learning_starts,
            batch_size=batch_size,
            gamma=gamma,
            train_freq=train_freq,
            gradient_steps=gradient_steps,
            action_noise=action_noise,
            replay_buffer_class=replay_buffer_class,
            replay_buffer_kwargs=replay_buffer_kwargs,
            optimize_memory_usage=optimize_memory_usage,
            n_steps=n_steps,
            ent_coef=ent_coef,
            target_entropy=target_entropy,
            policy_delay=policy_delay,
            use_sde=use_sde,
            sde_sample_freq=sde_sample_freq,
            use_sde_at_warmup=use_sde_at_warmup,
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=False,
        )
        self.tau = tau  # CrossQ fixes tau=1.0 (it has no target network)
        self.weight_decay = weight_decay
        self.weight_norm_mode = weight_norm_mode
        self.actor_weight_norm = actor_weight_norm
        if _init_setup_model:
            self._setup_model()

    @classmethod
    def _complete_policy_kwargs(cls, policy_kwargs: dict[str, Any], hyperparams: dict[str, Any]) -> dict[str, Any]:
        """The ``policy_kwargs`` stored with the model: the user's plus ``POLICY_KWARGS_FROM_ARGUMENTS`` and
        ``use_sde``, read from ``hyperparams`` (the constructor's arguments, or a saved file's data in :meth:`load`)."""
        return {
            **policy_kwargs,
            "weight_norm_mode": hyperparams["weight_norm_mode"],
            "actor_weight_norm": hyperparams["actor_weight_norm"],
            "weight_decay": hyperparams["weight_decay"],
            "target_network": hyperparams["tau"] < 1,
            "use_sde": hyperparams["use_sde"],  # as SB3's off-policy algorithms with gSDE support add it
        }

    @classmethod
    def load(cls, path: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """SB3's ``load``, accepting as ``policy_kwargs`` the dict given to the constructor (issue #15, item 3)."""
        load_with_completed_policy_kwargs(cls, path, cls._complete_policy_kwargs, kwargs)
        return super().load(path, *args, **kwargs)

    def _check_finite(self, name: str, value: float, replay_data: Any) -> None:
        """:class:`NonFiniteLossError` naming the loss, the gradient step and the likely cause (:meth:`train`
        then restores the model to its state at the start of the call)."""
        if math.isfinite(value):
            return
        hint = divergence_hint(
            rewards=replay_data.rewards,
            observations=replay_data.observations,
            next_observations=replay_data.next_observations,
            gamma=self.gamma,
            learning_rate_hint="the step size is the likely cause: try a lower learning_rate",
        )
        raise NonFiniteLossError(
            f"{type(self).__name__}: non-finite {name} {value} at gradient step {self._n_updates}; {hint}."
        )

    def _parameters_finite(self) -> bool:
        """One device sync for all parameters (and the temperature) of the policy."""
        tensors = [p.detach() for p in self.policy.parameters()]
        if self.log_ent_coef is not None:
            tensors.append(self.log_ent_coef.detach())
        norms = th._foreach_norm(tensors)
        return bool(th.isfinite(th.stack(norms)).all())

    def _create_aliases(self) -> None:
        super()._create_aliases()
        self.critic_target = self.policy.critic_target

    def train(self, gradient_steps: int, batch_size: int = 64) -> None:
        """CrossQ's update with weight normalisation for ``gradient_steps`` minibatches. A :class:`NonFiniteLossError`
        leaves the model (actor, critics, target critic, batch-norm statistics, optimisers, temperature) as it was
        at the start of the call."""
        optimizers = [self.actor.optimizer, self.critic.optimizer]
        if self.ent_coef_optimizer is not None:
            optimizers += [self.ent_coef_optimizer]
        tensors = [self.log_ent_coef] if self.log_ent_coef is not None else []
        with restored_on_divergence(self, [self.policy], optimizers, tensors):
            self._train(gradient_steps, batch_size, optimizers)

    def _train(self, gradient_steps: int, batch_size: int, optimizers: list[th.optim.Optimizer]) -> None:
        # Switch to train mode (this affects batch norm / dropout); the target critic stays in eval mode
        # except for its batch normalisation during its joint forward pass below.
        self.policy.set_training_mode(True)
        self._update_learning_rate(optimizers)  # sets the rate of both parameter groups

        ent_coef_losses, ent_coefs = [], []
        actor_losses, critic_losses = [], []

        # A step whose update left non-finite parameters makes the next one fail inside torch.distributions
        # (a ValueError on the actor's NaN mean): that is reported as the divergence it is (no cost when finite).
        try:
            for _ in range(gradient_steps):
                self._n_updates += 1
                replay_data = self.replay_buffer.sample(batch_size, env=self._vec_normalize_env)  # type: ignore[union-attr]
                discounts = replay_data.discounts if replay_data.discounts is not None else self.gamma
                n_samples = replay_data.rewards.shape[0]
                if self.use_sde:
                    self.actor.reset_noise()

                if self.log_ent_coef is not None:
                    ent_coef = th.exp(self.log_ent_coef.detach())
                else:
                    ent_coef = self.ent_coef_tensor
                ent_coefs.append(ent_coef.item())

                # a' ~ pi(.|s'), with the actor's batch normalisation in evaluation mode (as CrossQ)
                with th.no_grad():
                    self.actor.set_bn_training_mode(False)
                    next_actions, next_log_prob = self.actor.action_log_prob(replay_data.next_observations)

                # CrossQ's joint forward pass: batch statistics over the mixture of (s, a) and (s', a').
                all_obs = th.cat([replay_data.observations, replay_data.next_observations], dim=0)
                all_actions = th.cat([replay_data.actions, next_actions], dim=0)
                self.critic.set_bn_training_mode(True)
                all_q_values = th.cat(self.critic(all_obs, all_actions), dim=1)
                self.critic.set_bn_training_mode(False)
                current_q_values, next_q_values = th.split(all_q_values, n_samples, dim=0)
                if self.critic_target is not None:
                    # §4 "Target networks": the same joint pass through the target, also in training mode
                    # (it updates the target's own running statistics); its s' half gives Q'(s', a').
                    with th.no_grad():
                        self.critic_target.set_bn_training_mode(True)
                        all_target_q_values = th.cat(self.critic_target(all_obs, all_actions), dim=1)
                        self.critic_target.set_bn_training_mode(False)
                    next_q_values = th.split(all_target_q_values, n_samples, dim=0)[1]

                with th.no_grad():
                    # y = r + gamma (1 - d) (min_k Q_k(s', a') - alpha log pi(a'|s'))
                    next_q_values, _ = th.min(next_q_values.detach(), dim=1, keepdim=True)
                    next_q_values = next_q_values - ent_coef * next_log_prob.reshape(-1, 1)
                    target_q_values = replay_data.rewards + (1 - replay_data.dones) * discounts * next_q_values

                # (n_samples, n_critics) -> (n_critics, n_samples, 1)
                critic_loss = 0.5 * sum(F.mse_loss(q, target_q_values) for q in current_q_values.T[..., None])
                assert isinstance(critic_loss, th.Tensor)
                critic_losses.append(critic_loss.item())
                self._check_finite("critic loss", critic_losses[-1], replay_data)
                self.critic.optimizer.zero_grad()
                critic_loss.backward()
                self.critic.optimizer.step()
                self.policy.project_critic_weights()  # §4: back onto the unit sphere after every step
                if self.critic_target is not None:
                    polyak_update(self.critic.parameters(), self.critic_target.parameters(), self.tau)

                # Delayed policy (and temperature) updates, as CrossQ
                if self._n_updates % self.policy_delay == 0:
                    self.actor.set_bn_training_mode(True)
                    actions_pi, log_prob = self.actor.action_log_prob(replay_data.observations)
                    log_prob = log_prob.reshape(-1, 1)
                    self.actor.set_bn_training_mode(False)

                    if self.ent_coef_optimizer is not None and self.log_ent_coef is not None:
                        ent_coef_loss = -(self.log_ent_coef * (log_prob + self.target_entropy).detach()).mean()  # type: ignore[operator]
                        ent_coef_losses.append(ent_coef_loss.item())
                        self._check_finite("temperature loss", ent_coef_losses[-1], replay_data)
                        self.ent_coef_optimizer.zero_grad()
                        ent_coef_loss.backward()
                        self.ent_coef_optimizer.step()

                    # The actor maximises the online critic (batch normalisation in evaluation mode, as CrossQ).
                    self.critic.set_bn_training_mode(False)
                    q_values_pi = th.cat(self.critic(replay_data.observations, actions_pi), dim=1)
                    min_qf_pi, _ = th.min(q_values_pi, dim=1, keepdim=True)
                    actor_loss = (ent_coef * log_prob - min_qf_pi).mean()
                    actor_losses.append(actor_loss.item())
                    self._check_finite("actor loss", actor_losses[-1], replay_data)
                    self.actor.optimizer.zero_grad()
                    actor_loss.backward()
                    self.actor.optimizer.step()
                    self.policy.project_actor_weights()

        except ValueError as error:
            if self._parameters_finite():
                raise
            raise NonFiniteLossError(
                f"{type(self).__name__}: non-finite parameters at gradient step {self._n_updates}, left by the "
                "previous step's update (finite losses); the step size is the likely cause: try a lower learning_rate."
            ) from error
        if not self._parameters_finite():  # the last step's update (its loss was finite)
            raise NonFiniteLossError(
                f"{type(self).__name__}: non-finite parameters after gradient step {self._n_updates} (finite losses); "
                "the step size is the likely cause: try a lower learning_rate."
            )
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/ent_coef", np.mean(ent_coefs))
        if len(actor_losses) > 0:
            self.logger.record("train/actor_loss", np.mean(actor_losses))
        self.logger.record("train/critic_loss", np.mean(critic_losses))
        if len(ent_coef_losses) > 0:
            self.logger.record("train/ent_coef_loss", np.mean(ent_coef_losses))
        self.logger.record("train/critic_weight_norm", dense_weight_norm(self.critic).item())

    def learn(
        self: SelfCrossQWN,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 4,
        tb_log_name: str = "CrossQWN",
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfCrossQWN:
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )

    def _excluded_save_params(self) -> list[str]:
        # The target critic is saved inside the policy's state dict.
        return [*super()._excluded_save_params(), "critic_target", "_training_snapshot"]
