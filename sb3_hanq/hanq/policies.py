"""HANQ networks: a Q-network with a normalised main head and an asymmetric (meta)predictor.

HANQ paper §3 (Fig. 6a), §4 (Tables 2-4), §10-11::

    f            = torso(obs)                         (one ReLU layer of width 128 for classic control;
                                                       Nature-CNN features for images)
    Q_theta(s,.) = Linear(main_norm(f))               (main_norm: LayerNorm by default)
    omega(s,.)   = Linear(meta_norm(f))               (meta_norm: l2-normalisation by default;
                                                       2 outputs per action: omega_scale, omega_bias)
    Q_omega,theta(s,a) = exp(omega_scale(s,a)) * Q_theta(s,a) + omega_bias(s,a)

The predictor is only applied to the Q(s,a) term of the loss (asymmetry); the bootstrap target and
the greedy policy use Q_theta.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch as th
from gymnasium import spaces
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.torch_layers import (
    BaseFeaturesExtractor,
    CombinedExtractor,
    FlattenExtractor,
    NatureCNN,
    create_mlp,
)
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from stable_baselines3.common.utils import get_device
from stable_baselines3.dqn.policies import DQNPolicy
from torch import nn

from sb3_hanq.common.optimizers import HyperAdam
from sb3_hanq.common.torch_layers import NORMS, make_norm
from sb3_hanq.common.utils import check_choice, check_net_arch

PREDICTORS = ("meta", "scalar", "none")

#: What the metapredictor's outputs are indexed by (issue #14): one (omega_scale, omega_bias) per state-action
#: pair or one per state, broadcast over the actions.
METAPREDICTOR_OUTPUTS = ("state_action", "state")


class HANQNetwork(BasePolicy):
    """Q-network with a predictor head (HANQ paper Fig. 6a).

    ``forward(obs)`` returns Q_theta(s, .) (what acting and bootstrapping use);
    :meth:`predictor_params` returns omega(s, .) from the shared features.

    :param predictor: ``"meta"`` (state-action dependent omega from a metapredictor head, HANQ),
        ``"scalar"`` (one learned omega_scale (and omega_bias) shared by all inputs, SSAQ and
        Table 2 "w/o metapred."), ``"none"`` (plain Q-network, Table 2 "w/o any pred.")
    :param positive_scale: use exp(omega_scale) (HANQ) or omega_scale (SSAQ)
    :param predictor_bias: learn omega_bias (HANQ) or not (SSAQ, Table 2 "w/o omega_bias")
    :param main_norm: normalisation before the Q head: ``"layer"``, ``"l2"`` or ``"none"`` (Tables 3-4)
    :param meta_norm: normalisation before the metapredictor head, same choices
    :param metapredictor_outputs: ``"state"`` (default): the head has 2 outputs, one (omega_scale, omega_bias)
        per state broadcast over the actions, reading §11 ("HANQ's metapredictor again takes as input the
        features", a function of s) and Alg. 2's "omega_theta(s, a)" as loose notation; ``"state_action"``: the
        head has 2 |A| outputs, one pair per action, reading Alg. 2 literally. Chosen by evidence (issue #14,
        DiscretePendulum, 200k gradient steps, kappa 0.1): on the default "episodes" data, tuned over learning rates
        10^-1 ... 10^-4, 89.0 per state against 16.9 per (s, a) (each one's best cell at 30 seeds);
        on the "uniform" data at lr 10^-2.5, 73.1 against 10.8 (``benchmarks/results/hanq_repro/summary.md``). A
        plausible mechanism: a per-(s, a) bias can absorb r(s, a) + gamma max Q(s') and leave Q_theta, which acts, flat.
        Files saved before this option existed load with ``"state_action"``, as they were trained.
        Only with ``predictor="meta"``.
    """

    action_space: spaces.Discrete

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Discrete,
        features_extractor: BaseFeaturesExtractor,
        features_dim: int,
        net_arch: list[int] | None = None,
        activation_fn: type[nn.Module] = nn.ReLU,
        normalize_images: bool = True,
        predictor: str = "meta",
        positive_scale: bool = True,
        predictor_bias: bool = True,
        main_norm: str = "layer",
        meta_norm: str = "l2",
        metapredictor_outputs: str = "state",
    ) -> None:
        super().__init__(
            observation_space, action_space, features_extractor=features_extractor, normalize_images=normalize_images
        )
        self.metapredictor_outputs = metapredictor_outputs
        self.net_arch = [128] if net_arch is None else net_arch
        self.activation_fn = activation_fn
        self.features_dim = features_dim
        self.predictor = predictor
        self.positive_scale = positive_scale
        self.predictor_bias = predictor_bias
        self.main_norm_type = main_norm
        self.meta_norm_type = meta_norm
        n_actions = int(action_space.n)
        latent_dim = self.net_arch[-1] if self.net_arch else features_dim

        self.torso = nn.Sequential(*create_mlp(features_dim, -1, self.net_arch, activation_fn))
        self.main_norm = make_norm(main_norm, latent_dim, "main_norm")
        self.q_head = nn.Linear(latent_dim, n_actions)
        # Unused heads are not created, so each ablation changes the parameter set (tested).
        # Initialisation (not specified in the paper): the predictor starts near the identity,
        # omega_scale^+ ~ 1 and omega_bias ~ 0, like SSAQ's omega_scale = 1 (Alg. 1).
        scale_init = 0.0 if positive_scale else 1.0
        if predictor == "meta":
            self.meta_norm = make_norm(meta_norm, latent_dim, "meta_norm")
            # outputs per state for each of scale and bias (a Python int: torch.compile reads it as a constant)
            self.meta_outputs = 1 if metapredictor_outputs == "state" else n_actions
            self.meta_head = nn.Linear(latent_dim, self.meta_outputs * (2 if predictor_bias else 1))
            with th.no_grad():
                self.meta_head.bias[: self.meta_outputs].add_(scale_init)
        elif predictor == "scalar":
            self.omega_scale = nn.Parameter(th.tensor(scale_init))
            if predictor_bias:
                self.omega_bias = nn.Parameter(th.tensor(0.0))

    def latent(self, obs: PyTorchObs) -> th.Tensor:
        """Shared features f(s): the input of both the main head and the metapredictor."""
        return self.torso(self.extract_features(obs, self.features_extractor))

    def q_from_latent(self, latent: th.Tensor) -> th.Tensor:
        """Q_theta(s, .) = Linear(main_norm(f))."""
        return self.q_head(self.main_norm(latent))

    def forward(self, obs: PyTorchObs) -> th.Tensor:
        return self.q_from_latent(self.latent(obs))

    def predictor_params(self, latent: th.Tensor) -> tuple[th.Tensor | None, th.Tensor | None]:
        """omega_scale, omega_bias as [..., batch, n_actions] tensors (meta), scalars (scalar) or None (none).

        Any leading dimensions of ``latent`` are kept (the population trainer stacks members in front)."""
        if self.predictor == "meta":
            out = self.meta_head(self.meta_norm(latent))
            return out[..., : self.meta_outputs], (out[..., self.meta_outputs :] if self.predictor_bias else None)
        if self.predictor == "scalar":
            return self.omega_scale, (self.omega_bias if self.predictor_bias else None)
        return None, None

    def predict_q(
        self, latent: th.Tensor, q_values: th.Tensor, actions: th.Tensor | None = None
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor | None, th.Tensor | None]:
        """Q_omega,theta for the given actions ([..., batch, 1] indices) or for all actions.

        Q_omega,theta = omega_scale^+ * Q_theta + omega_bias (Alg. 2), with omega_scale^+ = exp(omega_scale)
        when ``positive_scale`` (HANQ; Table 2 "w/o omega_scale^+" ablates it) or omega_scale itself (SSAQ, Alg. 1).

        :return: (Q_omega,theta, Q_theta, omega_scale^+, omega_bias) at those actions; the last two are
            ``None`` when the predictor has no scale / bias
        """
        scale, bias = self.predictor_params(latent)
        if actions is not None:
            q_values = th.gather(q_values, -1, actions)
            if self.predictor == "meta" and self.metapredictor_outputs == "state_action":
                scale = th.gather(scale, -1, actions)  # type: ignore[arg-type]
                if bias is not None:
                    bias = th.gather(bias, -1, actions)
        multiplier = None if scale is None else (th.exp(scale) if self.positive_scale else scale)
        prediction = q_values if multiplier is None else q_values * multiplier
        if bias is not None:
            prediction = prediction + bias
        return prediction, q_values, multiplier, bias

    def _predict(self, observation: PyTorchObs, deterministic: bool = True) -> th.Tensor:
        return self(observation).argmax(dim=1).reshape(-1)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            dict(
                net_arch=self.net_arch,
                features_dim=self.features_dim,
                activation_fn=self.activation_fn,
                features_extractor=self.features_extractor,
                predictor=self.predictor,
                positive_scale=self.positive_scale,
                predictor_bias=self.predictor_bias,
                main_norm=self.main_norm_type,
                meta_norm=self.meta_norm_type,
                metapredictor_outputs=self.metapredictor_outputs,
            )
        )
        return data


class HANQPolicy(DQNPolicy):
    """Policy holding a :class:`HANQNetwork` and, only when ``target_network=True``, a target copy.

    Same arguments as SB3's ``DQNPolicy`` (default ``net_arch=[128]``, §11; ``optimizer_class=HyperAdam``)
    plus the ablation flags of :class:`HANQNetwork` and:

    :param symmetric: also apply the predictor on the Q(s', a') path of the target (Table 2 "symmetrized")
    :param target_network: allocate a target network (set by the algorithm from ``tau < 1``)
    """

    q_net: HANQNetwork  # type: ignore[assignment]
    q_net_target: HANQNetwork | None  # type: ignore[assignment]

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Discrete,
        lr_schedule: Schedule,
        net_arch: list[int] | None = None,
        activation_fn: type[nn.Module] = nn.ReLU,
        features_extractor_class: type[BaseFeaturesExtractor] = FlattenExtractor,
        features_extractor_kwargs: dict[str, Any] | None = None,
        normalize_images: bool = True,
        optimizer_class: type[th.optim.Optimizer] = HyperAdam,
        optimizer_kwargs: dict[str, Any] | None = None,
        predictor: str = "meta",
        positive_scale: bool = True,
        predictor_bias: bool = True,
        symmetric: bool = False,
        main_norm: str = "layer",
        meta_norm: str = "l2",
        metapredictor_outputs: str = "state",
        target_network: bool = False,
    ) -> None:
        check_choice("predictor", predictor, PREDICTORS)
        check_choice("main_norm", main_norm, NORMS)
        check_choice("meta_norm", meta_norm, NORMS)
        check_choice("metapredictor_outputs", metapredictor_outputs, METAPREDICTOR_OUTPUTS)
        check_net_arch(net_arch)
        for name, flag in (("positive_scale", positive_scale), ("predictor_bias", predictor_bias)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        if net_arch is None and features_extractor_class is not NatureCNN:
            net_arch = [128]  # §11: two-layer network, hidden width 128
        self.hanq_kwargs: dict[str, Any] = dict(
            predictor=predictor,
            positive_scale=positive_scale,
            predictor_bias=predictor_bias,
            main_norm=main_norm,
            meta_norm=meta_norm,
            metapredictor_outputs=metapredictor_outputs,
        )
        self.symmetric = bool(symmetric)
        self.target_network = bool(target_network)
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            net_arch,
            activation_fn,
            features_extractor_class,
            features_extractor_kwargs,
            normalize_images,
            optimizer_class,
            optimizer_kwargs,
        )

    def _build(self, lr_schedule: Schedule) -> None:
        self.q_net = self.make_q_net()
        self.q_net_target = None
        if self.target_network:
            self.q_net_target = self.make_q_net()
            self.q_net_target.load_state_dict(self.q_net.state_dict())
            self.q_net_target.set_training_mode(False)
        self.optimizer = self.optimizer_class(  # type: ignore[call-arg]
            self.q_net.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs
        )

    def make_q_net(self) -> HANQNetwork:  # type: ignore[override]
        net_args = self._update_features_extractor(self.net_args, features_extractor=None)
        return HANQNetwork(**net_args, **self.hanq_kwargs).to(self.device)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(self.hanq_kwargs)
        data.update(symmetric=self.symmetric, target_network=self.target_network)
        return data

    @classmethod
    def load(cls, path: str | Path | io.BufferedIOBase, device: th.device | str = "auto") -> HANQPolicy:
        """SB3's :meth:`BasePolicy.load`. A file saved before ``metapredictor_outputs`` existed (its constructor
        data lacks the key) was trained with the per-(s, a) head, the default then, and loads with it, as
        :meth:`HANQ.load` does for whole models."""
        device = get_device(device)
        saved = th.load(path, map_location=device, weights_only=False)  # type: ignore[arg-type]
        saved["data"].setdefault("metapredictor_outputs", "state_action")
        model = cls(**saved["data"])
        model.load_state_dict(saved["state_dict"])
        model.to(device)
        return model


MlpPolicy = HANQPolicy


class CnnPolicy(HANQPolicy):
    """HANQ policy for images (§11): Nature-CNN features, LayerNorm before the Q head, metapredictor fed
    the features before that LayerNorm."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("features_extractor_class", NatureCNN)
        super().__init__(*args, **kwargs)


class MultiInputPolicy(HANQPolicy):
    """HANQ policy for Dict observations (SB3's ``CombinedExtractor``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("features_extractor_class", CombinedExtractor)
        super().__init__(*args, **kwargs)
