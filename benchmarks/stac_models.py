"""The STAC / A2C models that the STAC benchmarks compare: one network for everybody (STAC paper Table 2)."""

from __future__ import annotations

import numpy as np


def make_model(algo: str, kwargs: dict, env_id: str, seed: int, n_envs: int = 8, n_steps: int = 20):
    """``algo`` ("STAC" or "A2C") on ``n_envs`` copies of ``env_id``: an MLP torso (256, 256) shared by a policy
    head and a value head of 256 hidden units (A2C gets the torso as a shared features extractor)."""
    import torch as th
    from stable_baselines3 import A2C
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

    from sb3_hanq import STAC

    env = make_vec_env(env_id, n_envs=n_envs, seed=seed)
    if algo == "STAC":
        policy_kwargs = dict(net_arch=[256, 256], head_arch=[256])
        return STAC("MlpPolicy", env, n_steps=n_steps, seed=seed, device="cpu", policy_kwargs=policy_kwargs, **kwargs)

    class MlpTorso(BaseFeaturesExtractor):
        """STAC's torso (Table 2: MLP (256, 256), ReLU) as an SB3 features extractor shared by A2C's heads."""

        def __init__(self, observation_space, net_arch=(256, 256)):
            super().__init__(observation_space, net_arch[-1])
            layers: list[th.nn.Module] = [th.nn.Flatten()]
            in_dim = int(np.prod(observation_space.shape))
            for size in net_arch:
                layers += [th.nn.Linear(in_dim, size), th.nn.ReLU()]
                in_dim = size
            self.net = th.nn.Sequential(*layers)

        def forward(self, observations: th.Tensor) -> th.Tensor:
            return self.net(observations)

    policy_kwargs = dict(features_extractor_class=MlpTorso, net_arch=dict(pi=[256], vf=[256]))
    return A2C("MlpPolicy", env, n_steps=n_steps, seed=seed, device="cpu", policy_kwargs=policy_kwargs, **kwargs)
