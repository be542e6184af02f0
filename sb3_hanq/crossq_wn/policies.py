"""Policy for CrossQ + WN: sb3-contrib's CrossQ actor and critics, with weight-normalised hidden layers,
AdamW parameter groups and an optional target critic (CrossQ + WN paper, §4)."""

from __future__ import annotations

from typing import Any

import torch as th
from gymnasium import spaces
from sb3_contrib.crossq.policies import CrossQCritic, CrossQPolicy
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor, FlattenExtractor
from stable_baselines3.common.type_aliases import Schedule
from torch import nn

from sb3_hanq.common.utils import check_bool, check_choice, check_net_arch, check_non_negative
from sb3_hanq.common.weight_norm import (
    PROJECTION_MODES,
    find_projected_layers,
    project_unit_norm_,
    weight_decay_param_groups,
)


class CrossQWNPolicy(CrossQPolicy):
    """CrossQ's policy (actor, ``n_critics`` critics, BatchRenorm layers) with three changes (§4):

    * the hidden dense layers of each critic, and of the actor when ``actor_weight_norm``, have unit-norm
      weights (:func:`~sb3_hanq.common.weight_norm.project_unit_norm_`, done here once at construction and by
      :class:`~sb3_hanq.CrossQWN` after every gradient step);
    * the optimisers hold two parameter groups: weight decay 0 for the projected layers, ``weight_decay`` for
      every other parameter (:func:`~sb3_hanq.common.weight_norm.weight_decay_param_groups`);
    * with ``target_network``, a target critic ``critic_target`` (a copy of the critic, Polyak-averaged by
      the algorithm).

    Defaults follow Appendix C (Table 1, column "CrossQ + WN") and differ from sb3-contrib's CrossQ in:
    critic width 512 (CrossQ: 1024), AdamW (CrossQ: Adam), Adam betas (0.9, 0.999) (CrossQ: (0.5, 0.999)).
    The batch-normalisation momentum is the paper's 0.99 in Flax's convention, ``ra <- 0.99 ra + 0.01 batch``;
    sb3-contrib's ``BatchRenorm1d`` updates ``ra += momentum * (batch - ra)`` (the weight of the new batch, as
    ``torch.nn.BatchNorm1d``), so the same average is ``batch_norm_momentum=0.01``, which is also CrossQ's.

    :param observation_space: observation space
    :param action_space: action space (``Box``)
    :param lr_schedule: learning rate schedule
    :param net_arch: hidden layer widths; default ``{"pi": [256, 256], "qf": [512, 512]}`` (Appendix C: actor
        hidden dim 256, critic hidden dim 512, two hidden layers each)
    :param activation_fn: activation; must be positively homogeneous (ReLU, the default) for the projected
        layers to be scale invariant
    :param batch_norm: use BatchRenorm layers; required (weight normalisation relies on them)
    :param batch_norm_momentum: BatchRenorm running-average rate, PyTorch convention (0.01 = Flax's 0.99, above)
    :param batch_norm_eps: BatchRenorm epsilon (sb3-contrib's default)
    :param renorm_warmup_steps: BatchRenorm steps that use batch statistics only (sb3-contrib's default)
    :param use_sde: generalised state-dependent exploration
    :param log_std_init: initial log standard deviation (gSDE)
    :param use_expln: ``expln`` instead of ``exp`` for the standard deviation (gSDE)
    :param clip_mean: clip the mean action (gSDE)
    :param features_extractor_class: features extractor
    :param features_extractor_kwargs: its keyword arguments
    :param normalize_images: divide images by 255
    :param optimizer_class: optimiser; default ``th.optim.AdamW`` (Appendix C)
    :param optimizer_kwargs: optimiser keyword arguments except the learning rate and weight decay;
        default ``{"betas": (0.9, 0.999)}`` (Appendix C)
    :param n_critics: number of critics (Appendix C: 2)
    :param share_features_extractor: share the features extractor between actor and critic
    :param weight_norm_mode: ``"row"`` (per output unit, default) or ``"matrix"``, see ``project_unit_norm_``
    :param actor_weight_norm: project the actor's hidden layers too (default ``True``, see ``CrossQWN``)
    :param weight_decay: decoupled weight decay of the unprojected parameters (Appendix C: 1e-2)
    :param target_network: allocate a target critic (§4 "Target networks")
    """

    critic_target: CrossQCritic | None

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        activation_fn: type[nn.Module] = nn.ReLU,
        batch_norm: bool = True,
        batch_norm_momentum: float = 0.01,  # Flax's (the paper's) 0.99, see the class docstring
        batch_norm_eps: float = 0.001,
        renorm_warmup_steps: int = 100_000,
        use_sde: bool = False,
        log_std_init: float = -3,
        use_expln: bool = False,
        clip_mean: float = 2.0,
        features_extractor_class: type[BaseFeaturesExtractor] = FlattenExtractor,
        features_extractor_kwargs: dict[str, Any] | None = None,
        normalize_images: bool = True,
        optimizer_class: type[th.optim.Optimizer] = th.optim.AdamW,
        optimizer_kwargs: dict[str, Any] | None = None,
        n_critics: int = 2,
        share_features_extractor: bool = False,
        weight_norm_mode: str = "row",
        actor_weight_norm: bool = True,
        weight_decay: float = 1e-2,
        target_network: bool = True,
    ) -> None:
        check_choice("weight_norm_mode", weight_norm_mode, PROJECTION_MODES)
        check_non_negative("weight_decay", weight_decay, " (the paper uses 1e-2; 0 makes AdamW plain Adam)")
        check_bool("actor_weight_norm", actor_weight_norm)
        check_net_arch(net_arch)
        if optimizer_kwargs is None:
            optimizer_kwargs = {"betas": (0.9, 0.999)}  # Appendix C; CrossQ's own default is (0.5, 0.999)
        elif "weight_decay" in optimizer_kwargs:
            raise ValueError("Pass weight_decay as an argument (it applies to the unprojected parameters only)")
        if net_arch is None:
            net_arch = {"pi": [256, 256], "qf": [512, 512]}  # Appendix C
        # Read by _build, which the parent's __init__ calls.
        self.weight_norm_mode = weight_norm_mode
        self.actor_weight_norm = actor_weight_norm
        self.weight_decay = weight_decay
        self.target_network = target_network
        self.critic_projected: list[nn.Linear] = []
        self.actor_projected: list[nn.Linear] = []
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            net_arch=net_arch,
            activation_fn=activation_fn,
            batch_norm=batch_norm,
            batch_norm_momentum=batch_norm_momentum,
            batch_norm_eps=batch_norm_eps,
            renorm_warmup_steps=renorm_warmup_steps,
            use_sde=use_sde,
            log_std_init=log_std_init,
            use_expln=use_expln,
            clip_mean=clip_mean,
            features_extractor_class=features_extractor_class,
            features_extractor_kwargs=features_extractor_kwargs,
            normalize_images=normalize_images,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
            n_critics=n_critics,
            share_features_extractor=share_features_extractor,
        )

    def _build(self, lr_schedule: Schedule) -> None:
        # CrossQ builds the actor, the critics and one optimiser each (over the parameters each should train).
        super()._build(lr_schedule)
        self.critic_projected = [layer for q_net in self.critic.q_networks for layer in find_projected_layers(q_net)]  # type: ignore[arg-type]
        self.actor_projected = find_projected_layers(self.actor.latent_pi) if self.actor_weight_norm else []
        if not self.critic_projected or (self.actor_weight_norm and not self.actor_projected):
            raise ValueError(
                "Weight normalisation found no hidden layer followed by batch normalisation: CrossQWN needs "
                "batch_norm=True, a positively homogeneous activation_fn (e.g. nn.ReLU) and at least one hidden "
                "layer in the critic (and in the actor unless actor_weight_norm=False)"
            )
        self.project_critic_weights()
        self.project_actor_weights()
        for net, projected in ((self.actor, self.actor_projected), (self.critic, self.critic_projected)):
            params = [p for group in net.optimizer.param_groups for p in group["params"]]
            groups = weight_decay_param_groups(params, projected, self.weight_decay)
            net.optimizer = self.optimizer_class(groups, lr=lr_schedule(1), **self.optimizer_kwargs)  # type: ignore[call-arg]

        self.critic_target = None
        if self.target_network:
            # As SAC's target: same architecture (own features extractor), same weights, eval mode unless
            # CrossQWN.train switches its batch normalisation to training mode for the joint forward pass.
            self.critic_target = self.make_critic(features_extractor=None)
            self.critic_target.load_state_dict(self.critic.state_dict())
            self.critic_target.set_training_mode(False)

    def project_critic_weights(self) -> None:
        """Project the critics' hidden layers onto the unit sphere (§4)."""
        for layer in self.critic_projected:
            project_unit_norm_(layer.weight, self.weight_norm_mode)

    def project_actor_weights(self) -> None:
        """Project the actor's hidden layers onto the unit sphere (§4); nothing if ``actor_weight_norm=False``."""
        for layer in self.actor_projected:
            project_unit_norm_(layer.weight, self.weight_norm_mode)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            weight_norm_mode=self.weight_norm_mode,
            actor_weight_norm=self.actor_weight_norm,
            weight_decay=self.weight_decay,
            target_network=self.target_network,
            share_features_extractor=self.share_features_extractor,
        )
        return data


MlpPolicy = CrossQWNPolicy
