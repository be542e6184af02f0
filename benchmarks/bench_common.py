"""Helpers shared by the speed benchmarks."""

from __future__ import annotations

import argparse

import gymnasium as gym
import numpy as np
import torch as th
from stable_baselines3.common.buffers import ReplayBuffer


def random_transitions(env_id: str, size: int, seed: int) -> ReplayBuffer:
    """A CPU replay buffer of ``size`` transitions of ``env_id`` under uniformly random actions, so that every
    algorithm timed on it trains on the same data."""
    env = gym.make(env_id)
    env.action_space.seed(seed)
    buffer = ReplayBuffer(size, env.observation_space, env.action_space, device="cpu", n_envs=1)
    obs, _ = env.reset(seed=seed)
    for _ in range(size):
        action = env.action_space.sample()
        next_obs, reward, terminated, truncated, _ = env.step(action)
        buffer.add(obs[None], next_obs[None], action[None], np.array([reward]), np.array([terminated]), [{}])
        obs = env.reset()[0] if terminated or truncated else next_obs
    env.close()
    return buffer


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every off-policy speed benchmark takes: env, timed steps, repeats, buffer, threads, seed."""
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--steps", type=int, default=200, help="gradient steps per algorithm and repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--buffer", type=int, default=10_000, help="random transitions in the replay buffer")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)


def torch_device(name: str) -> th.device:
    """The ``--device`` option as a torch device, or an error naming it when torch sees no such GPU (SB3 would
    fall back to the CPU silently, and the table would call CPU timings GPU ones)."""
    device = th.device(name)
    if device.type == "cuda" and not th.cuda.is_available():
        raise SystemExit(f"--device {name}: torch {th.__version__} sees no CUDA device")
    return device


def synchronize(device: th.device | str) -> None:
    """Wait for the kernels queued on ``device`` (a CUDA device runs them asynchronously): call it before reading
    a clock, so that a timed interval holds its own work and no earlier one's."""
    device = th.device(device)
    if device.type == "cuda":
        th.cuda.synchronize(device)


def device_name(device: th.device | str) -> str:
    """How the result tables name the device: "CPU", or the GPU's model as CUDA reports it."""
    device = th.device(device)
    return th.cuda.get_device_name(device) if device.type == "cuda" else device.type.upper()
