"""HANQ: Hypergradients, Asymmetry and Normalization for deep Q-learning without a target network."""

from __future__ import annotations

import math
from typing import Any, ClassVar, TypeVar

import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import GymEnv, MaybeCallback, Schedule
from stable_baselines3.common.utils import LinearSchedule, get_parameters_by_name
from stable_baselines3.dqn import DQN

from sb3_hanq.common.optimizers import HyperAdam
from sb3_hanq.common.q_learning import (
    PredictorOutput,
    bootstrap_q_values,
    hyperobjective_loss,
    predicted_q_values,
    q_learning_targets,
    rg_directional_correction_reverse,
    rg_target_gradient,
    td_loss,
)
from sb3_hanq.common.utils import (
    NonFiniteLossError,
    SupportedActionSpacesMixin,
    check_choice,
    check_gamma,
    check_positive_int,
    check_positive_lr,
    divergence_hint,
    load_with_completed_policy_kwargs,
    replay_buffer_data,
    restored_on_divergence,
)
from sb3_hanq.hanq.policies import CnnPolicy, HANQNetwork, HANQPolicy, MlpPolicy, MultiInputPolicy

SelfHANQ = TypeVar("SelfHANQ", bound="HANQ")

HYPER_OBJECTIVES = ("rg", "sg")
#: Which minibatch and weights the learning rate's hypergradient is taken on (see ``HANQ``'s ``hyper_batch``).
HYPER_BATCHES = ("next", "same")


class HANQ(SupportedActionSpacesMixin, DQN):
    """HANQ (HANQ paper, Alg. 2): DQN without a target network, stabilised by an asymmetric metapredictor
    on Q(s, a), LayerNorm / l2 normalisation, and hypergradient descent on Adam's learning rate.

    Each gradient step minimises the plain mean squared Bellman error (Alg. 2)
    ``mean_B (Q_omega,theta(s,a) - sg[r + gamma (1-d) max_a' Q_theta(s',a')])^2``
    (no Huber loss, no gradient clipping, unlike SB3's DQN), and the learning rate alpha takes one
    :class:`~sb3_hanq.common.optimizers.HyperAdam` hyper-step on the residual-gradient objective
    (the same squared error without the stop-gradient, §12 Eq. 9) or the semi-gradient one (Eq. 8).

    It reuses SB3's DQN for replay, epsilon-greedy exploration, ``predict`` and online ``learn``; the
    paper's home setting, training from a fixed dataset, is :func:`sb3_hanq.offline.train_offline`.

    Defaults follow §11 (classic control): batch 128, gamma 0.99, one hidden layer of 128 units,
    Adam hyperoptimised by Adam with kappa = 10^-1 (Table 1). The paper tunes the learning rate per
    problem over 10^-1 ... 10^-4 and does not report the chosen one; the default 10^-2.5 is the best
    initial learning rate it reports for HSSAQ (Fig. 7), which we also found best for HANQ on
    DiscretePendulum (see README).

    :param policy: ``"MlpPolicy"``, ``"CnnPolicy"``, ``"MultiInputPolicy"`` or a :class:`HANQPolicy` subclass.
        Ablations (Tables 2-4) are ``policy_kwargs``: ``predictor``, ``positive_scale``,
        ``predictor_bias``, ``symmetric``, ``main_norm``, ``meta_norm``.
    :param env: the environment (discrete actions); may be a registered id
    :param learning_rate: initial Adam learning rate alpha_0 (a float or SB3 schedule, see ``HyperAdam``
        for how a schedule combines with the adapted alpha)
    :param buffer_size: replay buffer size (online training)
    :param learning_starts: transitions collected before learning (online training)
    :param batch_size: minibatch size
    :param tau: target update rate beta of Eq. (2). ``1.0`` (default): no target network is allocated
        and targets use the online network (Alg. 2). ``tau < 1`` allocates a Polyak target network.
    :param gamma: discount factor
    :param train_freq: update the model every ``train_freq`` steps (online training)
    :param gradient_steps: gradient steps per rollout (online training)
    :param replay_buffer_class: replay buffer class (as in DQN)
    :param replay_buffer_kwargs: replay buffer keyword arguments
    :param optimize_memory_usage: memory-efficient replay buffer (as in DQN)
    :param n_steps: n-step returns (as in DQN)
    :param target_update_interval: when ``tau < 1``, Polyak-update the target every this many environment
        steps online, or gradient steps offline (default 1: every step, as Eq. 2)
    :param exploration_fraction: epsilon-greedy schedule (online training, as in DQN)
    :param exploration_initial_eps: initial epsilon
    :param exploration_final_eps: final epsilon
    :param max_grad_norm: gradient-norm clipping; ``None`` (default, the paper's) disables it
    :param hyper_lr: hyper-learning rate kappa (>= 0; 0 keeps alpha fixed, plain Adam)
    :param hyper_objective: ``"rg"`` (residual gradient, default, Alg. 2) or ``"sg"`` (semi-gradient), Table 7.
        With a target network (``tau < 1``) the target does not depend on theta and the two coincide.
    :param hyper_batch: where the hypergradient dL~/dalpha is taken (the paper has two forms).
        ``"next"`` (§12, Eqs. 7-9): before step i, on the new minibatch B_i at theta_i, along the previous
        update u_{i-1} (Chandra et al.'s hypergradient descent; no extra pass). ``"same"`` (Alg. 2 read
        literally: "take a gradient descent step", then "compute the residual hypergradient and update the
        learning rate" of the same minibatch's loss): after step i, on B_i at theta_{i+1}, along u_i (one
        extra forward and backward pass per step). Evidence (issue #14, DiscretePendulum, per-state metapredictor,
        kappa 0.1, 200k steps): each tuned over learning rates 10^-1 ... 10^-4 (10 seeds per cell), best cell at 30
        seeds, on the default "episodes" data the two tie, 89.0 ("next", lr 10^-1.5) and 88.4 ("same", 10^-2;
        paired difference -0.6 [-5.2, 4.7]); with "next" alpha collapses to ~1e-9 and freezes every seed, with
        "same" it settles near 1e-4 and none freezes (on the "uniform" data, lr 10^-2.5: 73.1 and 73.9). On
        Acrobot-v1 (10 seeds per cell) "same" loses at every learning rate tried: L_RG 45.5 against 81.5 at
        10^-4, L_SG 30.6 against 56.5 at 10^-2.5. The default stays "next".
    :param stats_window_size: window for rollout logging
    :param tensorboard_log: TensorBoard log directory
    :param policy_kwargs: policy keyword arguments; ``optimizer_kwargs`` may set ``lr_parameterization``
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
    supported_action_spaces: ClassVar[tuple[type[spaces.Space], ...]] = (spaces.Discrete,)
    policy: HANQPolicy
    q_net: HANQNetwork  # type: ignore[assignment]
    q_net_target: HANQNetwork | None  # type: ignore[assignment]

    def __init__(
        self,
        policy: str | type[HANQPolicy],
        env: GymEnv | str,
        learning_rate: float | Schedule = 10**-2.5,
        buffer_size: int = 1_000_000,
        learning_starts: int = 100,
        batch_size: int = 128,
        tau: float = 1.0,
        gamma: float = 0.99,
        train_freq: int | tuple[int, str] = 4,
        gradient_steps: int = 1,
        replay_buffer_class: type[ReplayBuffer] | None = None,
        replay_buffer_kwargs: dict[str, Any] | None = None,
        optimize_memory_usage: bool = False,
        n_steps: int = 1,
        target_update_interval: int = 1,
        exploration_fraction: float = 0.1,
        exploration_initial_eps: float = 1.0,
        exploration_final_eps: float = 0.05,
        max_grad_norm: float | None = None,
        hyper_lr: float = 0.1,
        hyper_objective: str = "rg",
        hyper_batch: str = "next",
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
        if not (isinstance(hyper_lr, (int, float)) and hyper_lr >= 0):
            raise ValueError(f"Invalid hyper_lr={hyper_lr!r}: must be a float >= 0 (0 disables hypergradients)")
        check_choice("hyper_objective", hyper_objective, HYPER_OBJECTIVES)
        check_choice("hyper_batch", hyper_batch, HYPER_BATCHES)
        if not 0 < tau <= 1:
            raise ValueError(f"Invalid tau={tau!r}: must be in (0, 1] (1 = no target network)")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"Invalid max_grad_norm={max_grad_norm!r}: must be > 0 or None")
        check_positive_int("batch_size", batch_size)
        self.hyper_lr = hyper_lr
        self.hyper_objective = hyper_objective
        self.hyper_batch = hyper_batch
        self._hyper_data: Any = None  # hyper_batch="same": the last minibatch (not saved)
        policy_kwargs = dict(policy_kwargs or {})
        if policy_kwargs.get("optimizer_class", HyperAdam) is not HyperAdam and hyper_lr > 0:
            raise ValueError(
                f"hyper_lr={hyper_lr} needs optimizer_class=HyperAdam, got {policy_kwargs['optimizer_class']!r}; "
                "set hyper_lr=0 to use another optimiser"
            )
        policy_kwargs = self._complete_policy_kwargs(policy_kwargs, dict(tau=tau, hyper_lr=hyper_lr))
        super().__init__(
            policy,
            env,
            learning_rate=learning_rate,
            buffer_size=buffer_size,
            learning_starts=learning_starts,
            batch_size=batch_size,
            tau=tau,
            gamma=gamma,
            train_freq=train_freq,
            gradient_steps=gradient_steps,
            replay_buffer_class=replay_buffer_class,
            replay_buffer_kwargs=replay_buffer_kwargs,
            optimize_memory_usage=optimize_memory_usage,
            n_steps=n_steps,
            target_update_interval=target_update_interval,
            exploration_fraction=exploration_fraction,
            exploration_initial_eps=exploration_initial_eps,
            exploration_final_eps=exploration_final_eps,
            max_grad_norm=max_grad_norm,  # type: ignore[arg-type]
            stats_window_size=stats_window_size,
            tensorboard_log=tensorboard_log,
            policy_kwargs=policy_kwargs,
            verbose=verbose,
            seed=seed,
            device=device,
            _init_setup_model=False,
        )
        self._algorithm = type(self).__name__  # saved with the model: load() refuses another class's file
        if _init_setup_model:
            self._setup_model()

    @classmethod
    def _complete_policy_kwargs(cls, policy_kwargs: dict[str, Any], hyperparams: dict[str, Any]) -> dict[str, Any]:
        """The ``policy_kwargs`` stored with the model: the user's, plus ``target_network`` (from ``tau``) and,
        with HyperAdam, ``optimizer_kwargs["hyper_lr"]`` (from ``hyper_lr``). ``hyperparams`` holds ``tau`` and
        ``hyper_lr`` (the constructor's arguments, or a saved file's data in :meth:`load`)."""
        policy_kwargs = dict(policy_kwargs)
        policy_kwargs["target_network"] = hyperparams["tau"] < 1
        # stored explicitly, so that a file keeps its reading if the default changes again (see _setup_model)
        policy_kwargs.setdefault("metapredictor_outputs", "state")
        # The hypergradient lives in the optimiser; a user-supplied optimizer_class is kept as is.
        if policy_kwargs.get("optimizer_class", HyperAdam) is HyperAdam:
            optimizer_kwargs = dict(policy_kwargs.get("optimizer_kwargs") or {})
            optimizer_kwargs.setdefault("hyper_lr", hyperparams["hyper_lr"])
            policy_kwargs["optimizer_kwargs"] = optimizer_kwargs
        return policy_kwargs

    @classmethod
    def load(cls, path: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        """SB3's ``load``, refusing a file saved by another algorithm class (e.g. ``SSAQ.load`` of a HANQ file,
        which would otherwise come back as an "SSAQ" with HANQ's metapredictor and kappa), and accepting as
        ``policy_kwargs`` the dict given to the constructor (see ``load_with_completed_policy_kwargs``)."""
        load_with_completed_policy_kwargs(cls, path, cls._complete_policy_kwargs, kwargs)
        model = super().load(path, *args, **kwargs)
        saved = model.__dict__.get("_algorithm", cls.__name__)  # files saved before 0.1.0 carry no name
        if saved != cls.__name__:
            raise ValueError(f"{path!r} was saved by {saved}, not {cls.__name__}: load it with {saved}.load")
        return model

    def _excluded_save_params(self) -> list[str]:
        """The minibatch kept for ``hyper_batch="same"`` is transient: not saved with the model."""
        return [*super()._excluded_save_params(), "_hyper_data", "_training_snapshot"]

    def _setup_model(self) -> None:
        # A file saved before metapredictor_outputs existed was trained with one (omega_scale, omega_bias) per
        # (s, a), the default then: it loads as it was trained (new models always carry the key)
        self.policy_kwargs.setdefault("metapredictor_outputs", "state_action")
        if self.policy_kwargs.get("target_network"):
            super()._setup_model()
            return
        # No target network (the default): DQN's set-up minus everything about the target.
        OffPolicyAlgorithm._setup_model(self)
        self._create_aliases()
        self.batch_norm_stats = get_parameters_by_name(self.q_net, ["running_"])
        self.batch_norm_stats_target = []
        self.exploration_schedule = LinearSchedule(
            self.exploration_initial_eps, self.exploration_final_eps, self.exploration_fraction
        )

    def _on_step(self) -> None:
        if self.q_net_target is not None:
            super()._on_step()
            return
        self._n_calls += 1
        self.exploration_rate = self.exploration_schedule(self._current_progress_remaining)
        self.logger.record("rollout/exploration_rate", self.exploration_rate)

    def _prediction_and_targets(
        self, data: Any, target_net: HANQNetwork, target_graph: bool
    ) -> tuple[PredictorOutput, th.Tensor]:
        """Q_omega,theta(s, a) and the targets y of a minibatch (Alg. 2); y keeps its graph when ``target_graph``."""
        discounts = data.discounts if data.discounts is not None else self.gamma
        out = predicted_q_values(self.q_net, data.observations, data.actions.long())
        with th.set_grad_enabled(target_graph):
            next_q = bootstrap_q_values(target_net, data.next_observations, self.policy.symmetric)
        return out, q_learning_targets(next_q, data.rewards, data.dones, discounts)

    def train(self, gradient_steps: int, batch_size: int = 100) -> None:
        """Alg. 2 for ``gradient_steps`` minibatches. The losses are checked once, after the last step (no device
        sync per step); if one is not finite, the policy (networks and optimiser state, including the adapted
        learning rate) is restored to its state at the start of this call, so a :class:`NonFiniteLossError` leaves
        the model as it was before the call's first step (with ``gradient_steps=1``: before the failing step)."""
        attributes = ("_n_updates", "_hyper_data")
        with restored_on_divergence(self, [self.policy], [self.policy.optimizer], attributes=attributes):
            self._train(gradient_steps, batch_size)

    def _train(self, gradient_steps: int, batch_size: int) -> None:
        self.policy.set_training_mode(True)
        optimizer = self.policy.optimizer
        self._update_learning_rate(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        hyper_active = isinstance(optimizer, HyperAdam) and any(
            g.get("hyper_lr", 0) > 0 for g in optimizer.param_groups
        )
        use_rg = hyper_active and self.hyper_objective == "rg" and self.q_net_target is None
        # HyperAdam(tune_betas=True) differentiates along more than u_{i-1}: it takes grad L_RG whole
        whole_gradient = hyper_active and any(g.get("tune_betas", False) for g in optimizer.param_groups)
        same_batch = hyper_active and self.hyper_batch == "same"
        target_net = self.q_net if self.q_net_target is None else self.q_net_target
        losses: list[th.Tensor] = []
        for _ in range(gradient_steps):
            data = self.replay_buffer.sample(batch_size, env=self._vec_normalize_env)  # type: ignore[union-attr]
            directions = optimizer.previous_updates() if hyper_active else None  # type: ignore[attr-defined]
            hyper_grads = None
            if same_batch and directions is not None:
                # Alg. 2 literally: d/dalpha of L~ on the previous step's minibatch at the weights it produced
                # (after a load, whose file holds no minibatch, the current one stands in once)
                hyper_data = self._hyper_data if self._hyper_data is not None else data
                hyper_out, hyper_targets = self._prediction_and_targets(hyper_data, target_net, target_graph=use_rg)
                hyper_loss = hyperobjective_loss(hyper_out.prediction, hyper_targets, residual=use_rg)
                grads = th.autograd.grad(hyper_loss, params, allow_unused=True)
                hyper_grads = [th.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
            if same_batch or not use_rg:
                directions = None
            # RG of the next-batch form (§12 Eq. 9): keep the s' graph only when a hyper-step uses it
            out, targets = self._prediction_and_targets(data, target_net, target_graph=directions is not None)

            loss = td_loss(out.prediction, targets)  # L_SG, the training loss (Alg. 2)
            optimizer.zero_grad()
            loss.backward()
            correction = None
            through_target: list[th.Tensor | None] = []
            if directions is not None:
                errors = (out.prediction - targets).detach()
                if whole_gradient:
                    through_target = rg_target_gradient(targets, errors, params)
                else:
                    correction = rg_directional_correction_reverse(targets, errors, params, directions)
            if self.max_grad_norm is not None:
                th.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            if through_target:  # grad L_RG = grad L_SG (as the step uses it) + the term through the targets
                hyper_grads = [p.grad if t is None else p.grad + t for p, t in zip(params, through_target)]  # type: ignore[operator]
            if isinstance(optimizer, HyperAdam):
                optimizer.step(hyper_grads=hyper_grads, hyper_correction=correction)
            else:
                optimizer.step()
            losses.append(loss.detach())
            if same_batch:
                self._hyper_data = data
        q_sa, multiplier, bias = out.q_values, out.multiplier, out.bias

        # Checked once per call (no device sync per step); the error names the first bad gradient step. The
        # parameters (which the last step's update may have made non-finite) are checked in the same sync.
        loss_values = th.stack(losses)
        finite = th.isfinite(loss_values)
        with th.no_grad():
            params_finite = th.isfinite(th.stack(th._foreach_norm(params)).sum())
        lr = optimizer.param_groups[0]["lr"]
        if not bool(finite.all() & params_finite) or not math.isfinite(lr):
            if not bool(finite.all()):
                bad = int((~finite).nonzero()[0, 0])
                # The minibatches are not kept (no per-step cost): the data check reads the whole buffer.
                hint = divergence_hint(
                    **replay_buffer_data(self.replay_buffer),
                    gamma=self.gamma,
                    learning_rate_hint="the step size is the likely cause: try a lower learning_rate or hyper_lr",
                    where="the replay buffer",
                )
                raise NonFiniteLossError(
                    f"{type(self).__name__}: non-finite loss {loss_values[bad].item()} at gradient step "
                    f"{self._n_updates + bad + 1} (learning rate {lr:.3g}); {hint}."
                )
            raise NonFiniteLossError(
                f"{type(self).__name__}: non-finite parameters or learning rate ({lr:.3g}) after gradient step "
                f"{self._n_updates + gradient_steps} (finite losses); the step size is the likely cause: try a lower "
                "learning_rate or hyper_lr."
            )
        # omega and Q of the last gradient step; the loss averaged over this call's steps (as SB3's DQN)
        with th.no_grad():
            last = th.stack(
                [
                    q_sa.mean(),
                    q_sa.new_tensor(1.0) if multiplier is None else multiplier.mean(),
                    q_sa.new_tensor(0.0) if bias is None else bias.mean(),
                    loss_values.mean(),
                ]
            ).tolist()
        q_mean, scale_mean, bias_mean, loss_mean = last
        self._n_updates += gradient_steps
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/loss", loss_mean)
        self.logger.record("train/learning_rate", optimizer.param_groups[0]["lr"])
        self.logger.record("train/omega_scale", scale_mean)
        self.logger.record("train/omega_bias", bias_mean)
        self.logger.record("train/q_values", q_mean)
        if isinstance(optimizer, HyperAdam):
            self.logger.record("train/hypergradient", optimizer.param_groups[0]["hypergradient"])

    def learn(
        self: SelfHANQ,
        total_timesteps: int,
        callback: MaybeCallback = None,
        log_interval: int = 4,
        tb_log_name: str | None = None,
        reset_num_timesteps: bool = True,
        progress_bar: bool = False,
    ) -> SelfHANQ:
        return super().learn(
            total_timesteps=total_timesteps,
            callback=callback,
            log_interval=log_interval,
            tb_log_name=tb_log_name or type(self).__name__,
            reset_num_timesteps=reset_num_timesteps,
            progress_bar=progress_bar,
        )

    @property
    def current_learning_rate(self) -> float:
        """The learning rate alpha in use (adapted by the hypergradient)."""
        return float(self.policy.optimizer.param_groups[0]["lr"])
