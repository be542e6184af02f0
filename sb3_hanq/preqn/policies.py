"""PreQN policy: SB3's TD3 actor and one critic, with a ``sin`` critic by default and no target networks.

PreQN paper §4 (Alg. 1), §5.1-5.2 (activations), Appendix B (network size).
"""

from __future__ import annotations

from typing import Any

import torch as th
from gymnasium import spaces
from stable_baselines3.common.torch_layers import (
    BaseFeaturesExtractor,
    CombinedExtractor,
    FlattenExtractor,
    NatureCNN,
)
from stable_baselines3.common.type_aliases import Schedule
from stable_baselines3.td3.policies import TD3Policy
from torch import nn

from sb3_hanq.common.utils import check_choice, check_net_arch


class Sin(nn.Module):
    """Elementwise ``sin`` activation. §5.1 finds sin networks in a "sweet spot" of large diagonal and small
    off-diagonal NTK entries, and §5.2 reports PreQN performing best with it."""

    def forward(self, x: th.Tensor) -> th.Tensor:
        return th.sin(x)


CRITIC_ACTIVATIONS: dict[str, type[nn.Module]] = {"sin": Sin, "relu": nn.ReLU, "tanh": nn.Tanh}


class PreQNPolicy(TD3Policy):
    """TD3's policy (deterministic actor with tanh-squashed output, ``ContinuousCritic``) with:

    * one critic (PreQN "only uses a single Q-function", §5.2);
    * the critic's activation chosen by name, ``critic_activation="sin"`` by default (§5.2: PreQN-sin was
      the best variant; ``"relu"`` and ``"tanh"`` are the other activations of §5.1);
    * **no target networks**: ``actor_target`` and ``critic_target`` are ``None`` (Alg. 1);
    * no critic optimiser: :class:`~sb3_hanq.PreQN` updates the critic with plain preconditioned steps
      (Alg. 1 lines 11-13). The actor has ``optimizer_class`` (Adam, Appendix B).

    Defaults: ``net_arch=[256, 256]`` for actor and critic (Appendix B). The actor keeps SB3's
    ``activation_fn`` (ReLU): the paper names the activation of its Q-function experiments, not the actor's.
    Weights use PyTorch's default initialisation, as everywhere in SB3.

    :param observation_space: observation space
    :param action_space: action space (``Box``)
    :param lr_schedule: the actor's learning-rate schedule
    :param net_arch: hidden layer widths (a list for both networks, or ``{"pi": [...], "qf": [...]}``)
    :param activation_fn: the actor's activation
    :param critic_activation: the critic's activation: ``"sin"`` (default), ``"relu"`` or ``"tanh"``
    :param features_extractor_class: features extractor
    :param features_extractor_kwargs: its keyword arguments
    :param normalize_images: divide images by 255
    :param optimizer_class: the actor's optimiser (Adam)
    :param optimizer_kwargs: its keyword arguments, except the learning rate
    :param n_critics: must be 1 (kept so that SB3 can rebuild the policy from its saved parameters)
    :param share_features_extractor: share the actor's features extractor with the critic (then only the
        actor trains it, as in TD3)
    """

    actor_target: None  # type: ignore[assignment]
    critic_target: None  # type: ignore[assignment]

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        activation_fn: type[nn.Module] = nn.ReLU,
        critic_activation: str = "sin",
        features_extractor_class: type[BaseFeaturesExtractor] = FlattenExtractor,
        features_extractor_kwargs: dict[str, Any] | None = None,
        normalize_images: bool = True,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        n_critics: int = 1,
        share_features_extractor: bool = False,
    ) -> None:
        check_choice("critic_activation", critic_activation, CRITIC_ACTIVATIONS)
        check_net_arch(net_arch)
        if n_critics != 1:
            raise ValueError(f"Invalid n_critics={n_critics!r}: PreQN uses a single Q-function (§5.2)")
        self.critic_activation = critic_activation  # read by _build, which the parent's __init__ calls
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            net_arch=[256, 256] if net_arch is None else net_arch,  # Appendix B
            activation_fn=activation_fn,
            features_extractor_class=features_extractor_class,
            features_extractor_kwargs=features_extractor_kwargs,
            normalize_images=normalize_images,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
            n_critics=1,
            share_features_extractor=share_features_extractor,
        )

    def _build(self, lr_schedule: Schedule) -> None:
        # TD3Policy._build without the two target networks and without the critic's optimiser.
        self.critic_kwargs["activation_fn"] = CRITIC_ACTIVATIONS[self.critic_activation]
        self.actor = self.make_actor(features_extractor=None)
        self.actor.optimizer = self.optimizer_class(
            self.actor.parameters(),
            lr=lr_schedule(1),  # type: ignore[call-arg]
            **self.optimizer_kwargs,
        )
        features_extractor = self.actor.features_extractor if self.share_features_extractor else None
        self.critic = self.make_critic(features_extractor=features_extractor)
        stateful = [name for name, _ in self.critic.named_buffers() if "running_" in name]
        if stateful:
            raise ValueError(
                f"PreQN's critic cannot hold layers with running statistics such as batch normalisation (found "
                f"{stateful[0]!r}, from features_extractor_class={self.features_extractor_class.__name__}): the NTK "
                "preconditioning evaluates the critic with torch.func, which forbids layers updating their buffers "
                "in place. Use a features_extractor_class without batch normalisation"
            )
        self.actor_target = None
        self.critic_target = None

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(critic_activation=self.critic_activation)
        return data


MlpPolicy = PreQNPolicy


class CnnPolicy(PreQNPolicy):
    """:class:`PreQNPolicy` with a ``NatureCNN`` features extractor (image observations). The critic's NTK then
    includes the CNN's parameters and is computed from per-sample Jacobians (slower than the MLP kernel)."""

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        activation_fn: type[nn.Module] = nn.ReLU,
        critic_activation: str = "sin",
        features_extractor_class: type[BaseFeaturesExtractor] = NatureCNN,
        features_extractor_kwargs: dict[str, Any] | None = None,
        normalize_images: bool = True,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        n_critics: int = 1,
        share_features_extractor: bool = False,
    ) -> None:
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            net_arch,
            activation_fn,
            critic_activation,
            features_extractor_class,
            features_extractor_kwargs,
            normalize_images,
            optimizer_class,
            optimizer_kwargs,
            n_critics,
            share_features_extractor,
        )


class MultiInputPolicy(PreQNPolicy):
    """:class:`PreQNPolicy` for ``Dict`` observations (``CombinedExtractor``)."""

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        activation_fn: type[nn.Module] = nn.ReLU,
        critic_activation: str = "sin",
        features_extractor_class: type[BaseFeaturesExtractor] = CombinedExtractor,
        features_extractor_kwargs: dict[str, Any] | None = None,
        normalize_images: bool = True,
        optimizer_class: type[th.optim.Optimizer] = th.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        n_critics: int = 1,
        share_features_extractor: bool = False,
    ) -> None:
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            net_arch,
            activation_fn,
            critic_activation,
            features_extractor_class,
            features_extractor_kwargs,
            normalize_images,
            optimizer_class,
            optimizer_kwargs,
            n_critics,
            share_features_extractor,
        )
