"""STAC / STACX networks (STAC paper, Zahavy et al. 2020, §3.2 and supplementary §9.3, Table 2)::

    f            = torso(features(obs))              shared MLP, (256, 256) ReLU for features (Table 2)
    pi^p(.|x)    = policy_head_p(f)                  two-layer MLP per head, 256 hidden units (§9.3)
    V^p(x)       = value_head_p(f)                   two-layer MLP per head, 256 hidden units
    p = 1 .. n_heads                                 1 for STAC, 3 for STACX; head 1 acts

Discrete actions: softmax over the policy head's logits. Continuous actions (§4.2, §9.3): the policy head
outputs 2|A| numbers (y_mu, y_sigma); mean = tanh(y_mu), log std = s_min + 0.5 (s_max - s_min)(tanh(y_sigma) + 1),
u ~ N(mean, std), action = tanh(u) with the Jacobian correction in the log-probability (Haarnoja et al., 2018).
The paper's LSTM (Table 2) is left out: SB3's on-policy rollouts carry no recurrent state.

Everything the update needs is a function of a parameter dictionary, :meth:`STACPolicy.heads` (through
``torch.func.functional_call``), so STAC can evaluate the network at the updated parameters theta'(eta).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.distributions import TanhBijector
from stable_baselines3.common.policies import ActorCriticPolicy, BasePolicy
from stable_baselines3.common.preprocessing import preprocess_obs
from stable_baselines3.common.sb2_compat.rmsprop_tf_like import RMSpropTFLike
from stable_baselines3.common.torch_layers import (
    BaseFeaturesExtractor,
    CombinedExtractor,
    FlattenExtractor,
    NatureCNN,
    create_mlp,
)
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from torch import nn
from torch.distributions import Categorical, Normal, kl_divergence
from torch.func import functional_call

from sb3_hanq.common.utils import check_net_arch

# Squash correction epsilon, as SB3's SquashedDiagGaussianDistribution.
_SQUASH_EPS = 1e-6


class STACNetwork(nn.Module):
    """Shared torso and ``n_heads`` (policy, value) heads. ``forward(obs)`` takes *preprocessed* observations and
    returns the raw policy-head outputs ``[P, B, k]`` and the values ``[P, B]`` of the first ``n_heads`` heads."""

    def __init__(
        self,
        features_extractor: BaseFeaturesExtractor,
        features_dim: int,
        net_arch: list[int],
        head_arch: list[int],
        n_heads: int,
        policy_dim: int,
        activation_fn: type[nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__()
        self.features_extractor = features_extractor
        self.n_heads = n_heads
        self.torso = nn.Sequential(*create_mlp(features_dim, -1, net_arch, activation_fn))
        latent_dim = net_arch[-1] if net_arch else features_dim
        self.policy_heads = nn.ModuleList(
            nn.Sequential(*create_mlp(latent_dim, policy_dim, head_arch, activation_fn)) for _ in range(n_heads)
        )
        self.value_heads = nn.ModuleList(
            nn.Sequential(*create_mlp(latent_dim, 1, head_arch, activation_fn)) for _ in range(n_heads)
        )

    def forward(self, obs: PyTorchObs, n_heads: int | None = None) -> tuple[th.Tensor, th.Tensor]:
        latent = self.torso(self.features_extractor(obs))
        heads = range(self.n_heads if n_heads is None else n_heads)
        policy_out = th.stack([self.policy_heads[p](latent) for p in heads])
        values = th.stack([self.value_heads[p](latent).squeeze(-1) for p in heads])
        return policy_out, values


class STACPolicy(BasePolicy):
    """Actor-critic policy with a shared torso and ``n_heads`` policy/value heads (head 1 acts).

    :param observation_space: observation space
    :param action_space: ``Discrete`` or bounded 1-D ``Box``
    :param lr_schedule: learning-rate schedule of the inner optimiser
    :param net_arch: torso MLP sizes; default ``[256, 256]`` (Table 2, control from features), ``[]`` with a CNN
    :param head_arch: hidden sizes of each policy and value head; default ``[256]`` (Table 2 "head hiddens")
    :param activation_fn: activation (ReLU, §9.3)
    :param n_heads: number of heads (1: STAC, 3: STACX, §3.2)
    :param ortho_init: SB3's orthogonal initialisation (as A2C/PPO: gain sqrt(2) for hidden layers, 0.01 for the
        policy output, 1 for the value output); the paper does not give its initialisation
    :param log_std_bounds: (s_min, s_max) bounding the log standard deviation of continuous actions (§9.3;
        the paper gives no values, these are ours)
    :param features_extractor_class: SB3 features extractor
    :param features_extractor_kwargs: its keyword arguments
    :param normalize_images: divide images by 255
    :param optimizer_class: the inner optimiser; must be SB3's ``RMSpropTFLike`` (epsilon inside the square root,
        as the paper's Optax RMSProp), because STAC takes its step differentiably with the same formula
    :param optimizer_kwargs: its keyword arguments (``alpha`` = decay, ``eps``)
    :param use_sde: must be ``False`` (passed by ``OnPolicyAlgorithm``)
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Schedule,
        net_arch: list[int] | None = None,
        head_arch: list[int] | None = None,
        activation_fn: type[nn.Module] = nn.ReLU,
        n_heads: int = 1,
        ortho_init: bool = True,
        log_std_bounds: tuple[float, float] = (-4.0, 2.0),
        features_extractor_class: type[BaseFeaturesExtractor] = FlattenExtractor,
        features_extractor_kwargs: dict[str, Any] | None = None,
        normalize_images: bool = True,
        optimizer_class: type[th.optim.Optimizer] = RMSpropTFLike,
        optimizer_kwargs: dict[str, Any] | None = None,
        use_sde: bool = False,
    ) -> None:
        if use_sde:
            raise ValueError("STAC does not support gSDE (use_sde=True)")
        if not issubclass(optimizer_class, RMSpropTFLike):
            raise ValueError(
                f"STAC's inner optimiser must be RMSpropTFLike (its step is taken differentiably with the same "
                f"formula), got optimizer_class={optimizer_class!r}"
            )
        if isinstance(action_space, spaces.Box) and (
            len(action_space.shape) != 1
            or not (np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high)))
        ):
            raise ValueError(f"STAC needs a bounded 1-D Box action space (squashed Gaussian), got {action_space}")
        if not (isinstance(n_heads, int) and n_heads >= 1):
            raise ValueError(f"Invalid n_heads={n_heads!r}: must be an int >= 1")
        check_net_arch(net_arch)
        check_net_arch(head_arch, "head_arch")
        if not log_std_bounds[0] < log_std_bounds[1]:
            raise ValueError(f"Invalid log_std_bounds={log_std_bounds!r}: need s_min < s_max")
        super().__init__(
            observation_space,
            action_space,
            features_extractor_class,
            features_extractor_kwargs,
            normalize_images=normalize_images,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
            squash_output=isinstance(action_space, spaces.Box),
        )
        if net_arch is None:
            net_arch = [] if issubclass(features_extractor_class, NatureCNN) else [256, 256]
        self.net_arch = list(net_arch)
        self.head_arch = [256] if head_arch is None else list(head_arch)
        self.activation_fn = activation_fn
        self.n_heads = n_heads
        self.ortho_init = ortho_init
        self.log_std_bounds = (float(log_std_bounds[0]), float(log_std_bounds[1]))
        self.lr_schedule = lr_schedule
        self.continuous = isinstance(action_space, spaces.Box)
        if self.continuous:
            self.action_dim = int(action_space.shape[0])  # type: ignore[index]
            policy_dim = 2 * self.action_dim
        elif isinstance(action_space, spaces.Discrete):
            self.action_dim = int(action_space.n)
            policy_dim = self.action_dim
        else:
            raise ValueError(f"STAC supports Discrete and Box action spaces, got {action_space}")

        features_extractor = self.make_features_extractor()
        self.net = STACNetwork(
            features_extractor,
            features_extractor.features_dim,
            self.net_arch,
            self.head_arch,
            n_heads,
            policy_dim,
            activation_fn,
        )
        if ortho_init:
            self._init_weights()
        self.optimizer = self.optimizer_class(  # type: ignore[call-arg]
            self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs
        )

    def _init_weights(self) -> None:
        init = ActorCriticPolicy.init_weights
        for module in [self.net.features_extractor, self.net.torso]:
            module.apply(lambda m: init(m, gain=np.sqrt(2)))
        for head, out_gain in [(h, 0.01) for h in self.net.policy_heads] + [(h, 1.0) for h in self.net.value_heads]:
            linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
            for layer in linears[:-1]:
                init(layer, gain=np.sqrt(2))
            init(linears[-1], gain=out_gain)

    # --- the network as a function of its parameters ------------------------------------------------

    def heads(
        self, obs: PyTorchObs, params: dict[str, th.Tensor] | None = None, n_heads: int | None = None
    ) -> tuple[th.Tensor, th.Tensor]:
        """Raw policy outputs ``[P, B, k]`` and values ``[P, B]`` of the first ``n_heads`` heads (all by default),
        at ``params`` (a dict of ``self.net``'s parameters, e.g. theta'(eta)) or at the current parameters.

        When ``params`` holds the module's own parameter tensors the module is called directly: the result is the
        same and ``functional_call``'s re-parametrisation (a sizeable part of a small network's forward) is skipped.
        """
        preprocessed = preprocess_obs(obs, self.observation_space, normalize_images=self.normalize_images)
        if params is None or self._are_own_parameters(params):
            return self.net(preprocessed, n_heads)
        return functional_call(self.net, params, (preprocessed,), {"n_heads": n_heads})

    def _are_own_parameters(self, params: dict[str, th.Tensor]) -> bool:
        n_own = 0
        for name, param in self.net.named_parameters():
            if params.get(name) is not param:
                return False
            n_own += 1
        return n_own == len(params)

    def distribution(self, policy_out: th.Tensor) -> Categorical | Normal:
        """pi(.|x) from raw head outputs: Categorical over logits, or the Gaussian N(mean, std) *before* the tanh."""
        if not self.continuous:
            return Categorical(logits=policy_out, validate_args=False)
        y_mu, y_sigma = policy_out.chunk(2, dim=-1)
        s_min, s_max = self.log_std_bounds
        log_std = s_min + 0.5 * (s_max - s_min) * (th.tanh(y_sigma) + 1.0)  # §9.3
        return Normal(th.tanh(y_mu), log_std.exp(), validate_args=False)

    def log_prob(self, policy_out: th.Tensor, actions: th.Tensor) -> th.Tensor:
        """log pi(a|x), ``[..., B]``. Continuous ``actions`` are the squashed ones in [-1, 1]; the Jacobian of tanh
        is subtracted (Haarnoja et al., 2018, Eq. (21))."""
        dist = self.distribution(policy_out)
        if isinstance(dist, Categorical):
            return dist.log_prob(actions)
        return self._squashed_log_prob(dist, actions)

    @staticmethod
    def _squashed_log_prob(dist: Normal, actions: th.Tensor) -> th.Tensor:
        gaussian_actions = TanhBijector.inverse(actions)
        log_prob = dist.log_prob(gaussian_actions).sum(-1)
        return log_prob - th.log(1 - actions**2 + _SQUASH_EPS).sum(-1)

    def log_prob_and_regulariser(self, policy_out: th.Tensor, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        """:meth:`log_prob` and :meth:`regulariser` together, building the distribution once."""
        dist = self.distribution(policy_out)
        if isinstance(dist, Categorical):
            return dist.log_prob(actions), dist.entropy()
        return self._squashed_log_prob(dist, actions), self._minus_kl_to_standard(dist)

    def regulariser(self, policy_out: th.Tensor) -> th.Tensor:
        """The quantity the g_e term maximises, ``[..., B]``: the entropy (discrete, Eq. (1)), or minus the KL to a
        standard Gaussian of the pre-squash Gaussian (continuous, §4.2)."""
        dist = self.distribution(policy_out)
        if isinstance(dist, Categorical):
            return dist.entropy()
        return self._minus_kl_to_standard(dist)

    @staticmethod
    def _minus_kl_to_standard(dist: Normal) -> th.Tensor:
        standard = Normal(th.zeros_like(dist.loc), th.ones_like(dist.scale), validate_args=False)
        return -kl_divergence(dist, standard).sum(-1)

    def kl(self, policy_out_p: th.Tensor, policy_out_q: th.Tensor) -> th.Tensor:
        """KL(p || q) between two policies given by raw head outputs, ``[..., B]`` (for squashed Gaussians it equals
        the KL of the pre-squash Gaussians: tanh is a bijection)."""
        kl = kl_divergence(self.distribution(policy_out_p), self.distribution(policy_out_q))
        return kl.sum(-1) if self.continuous else kl

    def sample(self, policy_out: th.Tensor, deterministic: bool = False) -> th.Tensor:
        """Actions from raw head outputs: the mode or a sample; continuous actions are squashed into [-1, 1]."""
        dist = self.distribution(policy_out)
        if isinstance(dist, Categorical):
            return dist.probs.argmax(-1) if deterministic else dist.sample()
        return th.tanh(dist.mean if deterministic else dist.sample())

    # --- the SB3 policy API (head 1) ----------------------------------------------------------------

    def forward(self, obs: PyTorchObs, deterministic: bool = False) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """Acting (head 1): actions, values ``[B, 1]`` and log pi(a|x) ``[B]``. The log-probability is computed from
        the (squashed) action, exactly as the update recomputes it, so on-policy importance ratios are 1."""
        policy_out, values = self.heads(obs, n_heads=1)
        actions = self.sample(policy_out[0], deterministic)
        return actions, values[0].unsqueeze(-1), self.log_prob(policy_out[0], actions)

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> th.Tensor:
        policy_out, _ = self.heads(observation, n_heads=1)
        return self.sample(policy_out[0], deterministic)

    def predict_values(self, obs: PyTorchObs) -> th.Tensor:
        """V^1(x), ``[B, 1]``."""
        return self.heads(obs, n_heads=1)[1][0].unsqueeze(-1)

    def evaluate_actions(self, obs: PyTorchObs, actions: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """As SB3's ``ActorCriticPolicy.evaluate_actions`` for head 1: values ``[B, 1]``, log pi(a|x) and the
        regulariser (entropy, or minus the KL to a standard Gaussian), ``[B]``."""
        policy_out, values = self.heads(obs, n_heads=1)
        if not self.continuous:
            actions = actions.long().flatten()
        return values[0].unsqueeze(-1), self.log_prob(policy_out[0], actions), self.regulariser(policy_out[0])

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            dict(
                lr_schedule=self.lr_schedule,
                net_arch=self.net_arch,
                head_arch=self.head_arch,
                activation_fn=self.activation_fn,
                n_heads=self.n_heads,
                ortho_init=self.ortho_init,
                log_std_bounds=self.log_std_bounds,
                features_extractor_class=self.features_extractor_class,
                features_extractor_kwargs=self.features_extractor_kwargs,
                optimizer_class=self.optimizer_class,
                optimizer_kwargs=self.optimizer_kwargs,
            )
        )
        return data


MlpPolicy = STACPolicy


class CnnPolicy(STACPolicy):
    """STAC policy for images: SB3's Nature-CNN as the torso (the paper uses a ResNet torso and an LSTM, §9.3)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("features_extractor_class", NatureCNN)
        super().__init__(*args, **kwargs)


class MultiInputPolicy(STACPolicy):
    """STAC policy for Dict observations (SB3's ``CombinedExtractor``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("features_extractor_class", CombinedExtractor)
        super().__init__(*args, **kwargs)
