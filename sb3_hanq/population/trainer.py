"""Offline training of a whole population of agents (seeds x hyperparameters) as one batched computation.

The HANQ paper's protocol (§4, §11) is 30 seeds x 200k gradient steps per configuration, each
configuration tuned over 7 learning rates and a beta or kappa grid. Training those agents one per process
costs about 100 CPU-minutes per configuration; here M agents share every tensor operation:

- parameters stacked along a leading member dimension (:func:`torch.func.stack_module_state`); a "stacked twin"
  of the network (:func:`stacked_twin`: batched ``nn.Linear`` / ``nn.LayerNorm``) runs the network's own
  methods on all members at once through :func:`torch.func.functional_call` (measured 2x faster than
  :func:`torch.func.vmap`, whose batching rules left strided layouts);
- the loss, targets, residual-gradient term and HyperAdam update are the functions of
  :mod:`sb3_hanq.common.q_learning` and :mod:`sb3_hanq.common.optimizers` that ``HANQ.train`` and
  :class:`~sb3_hanq.common.optimizers.HyperAdam` call, with one learning rate (and kappa, beta, gamma,
  hyperobjective) per member;
- every seed collects its own dataset (:func:`~sb3_hanq.common.offline.collect_dataset`, as the paper
  does) and starts from the initial weights ``HANQ(..., seed=seed)`` would have, so members that share a
  seed differ only in their hyperparameters; each member draws its own minibatch indices;
- evaluation is batched too (:mod:`sb3_hanq.population.envs`), with the paper's normalised score (Table 10).

Members whose networks differ in shape or structure (policy flags, the loss, clipping, a target network or
not) go in separate *groups*; groups of one run step together.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch as th
import torch.nn.functional as F
from stable_baselines3.common.utils import get_device, set_random_seed
from torch import nn
from torch.func import functional_call, stack_module_state

from sb3_hanq.common.envs import register_envs
from sb3_hanq.common.offline import (
    PENDULUM_STARTS,
    OfflineDataset,
    collect_dataset,
    normalized_score,
    validate_dataset,
)
from sb3_hanq.common.optimizers import (
    LR_PARAMETERIZATIONS,
    adam_directions,
    adam_moments_,
    adam_step_with_beta_derivatives,
    beta_from_logit,
    beta_logit,
    beta_logit_update,
    hyper_adam_update,
)
from sb3_hanq.common.optimizers import learning_rate as adapted_learning_rate
from sb3_hanq.common.q_learning import (
    TD_LOSSES,
    ModuleFunction,
    PredictorOutput,
    bootstrap_q_values,
    hyperobjective_loss,
    predicted_q_values,
    q_learning_targets,
    td_loss,
)
from sb3_hanq.common.torch_layers import NORMS
from sb3_hanq.hanq.hanq import HYPER_BATCHES, HYPER_OBJECTIVES
from sb3_hanq.hanq.policies import METAPREDICTOR_OUTPUTS, PREDICTORS, HANQPolicy
from sb3_hanq.population.envs import BATCHED_ENV_IDS, make_batched_env
from sb3_hanq.ssaq.ssaq import SSAQ_POLICY_DEFAULTS

#: Algorithms and their defaults: network flags of :class:`~sb3_hanq.hanq.policies.HANQPolicy`, kappa, beta.
#: ``dqn`` is the paper's DQN (Alg. 2 minus the changes in blue): squared TD loss, a Polyak target network with
#: rate beta = ``tau`` (1 = none); ``-params main_norm:layer`` (or ``l2``) gives DQN-LN (DQN-l2N), ``--hyper-lr``
#: Table 8's hypergradient DQN, ``-params loss:huber max_grad_norm:10`` SB3's ``DQN``.
ALGORITHMS: dict[str, dict[str, Any]] = {
    "hanq": dict(policy={}, hyper_lr=0.1, tau=1.0),
    "ssaq": dict(policy=dict(SSAQ_POLICY_DEFAULTS), hyper_lr=0.0, tau=1.0),
    "hssaq": dict(policy=dict(SSAQ_POLICY_DEFAULTS), hyper_lr=1e-4, tau=1.0),  # Fig. 7: kappa = 10^-4
    "dqn": dict(policy=dict(predictor="none", main_norm="none"), hyper_lr=0.0, tau=1e-3),
}

#: Hyperparameters that may take a different value in every member, with their defaults (HANQ paper §11).
MEMBER_HYPERPARAMETERS = ("learning_rate", "hyper_lr", "tau", "gamma", "hyper_objective")

#: ``-params`` keys: structural settings shared within a group (a list of values makes a grid dimension).
#: name -> (accepted type(s), check, description)
GROUP_PARAMS: dict[str, tuple[tuple[type, ...], Callable[[Any], bool], str]] = {
    "predictor": ((str,), lambda v: v in PREDICTORS, f"one of {PREDICTORS}"),
    "positive_scale": ((bool,), lambda v: True, "a bool"),
    "predictor_bias": ((bool,), lambda v: True, "a bool"),
    "symmetric": ((bool,), lambda v: True, "a bool"),
    "metapredictor_outputs": (
        (str,),
        lambda v: v in METAPREDICTOR_OUTPUTS,
        f"one of {METAPREDICTOR_OUTPUTS}",
    ),
    "main_norm": ((str,), lambda v: v in NORMS, f"one of {NORMS}"),
    "meta_norm": ((str,), lambda v: v in NORMS, f"one of {NORMS}"),
    "net_arch": ((list,), lambda v: all(isinstance(x, int) and x > 0 for x in v), "a list of positive ints"),
    "loss": ((str,), lambda v: v in TD_LOSSES, f"one of {TD_LOSSES}"),
    "max_grad_norm": ((float, int, type(None)), lambda v: v is None or v > 0, "a float > 0 or None"),
    "lr_parameterization": ((str,), lambda v: v in LR_PARAMETERIZATIONS, f"one of {LR_PARAMETERIZATIONS}"),
    "hyper_batch": ((str,), lambda v: v in HYPER_BATCHES, f"one of {HYPER_BATCHES}"),
    "tune_betas": ((bool,), lambda v: True, "a bool"),
}

#: Datasets of the paper (§11): 1000 random-action transitions for Pendulum (as ``pendulum_start`` reads them),
#: 10k from standard resets otherwise.
DATASET_SIZES = {"DiscretePendulum-v1": 1000, "CartPole-v1": 10_000, "Acrobot-v1": 10_000}


@dataclasses.dataclass(frozen=True)
class Member:
    """One agent of the population: its seed, per-member hyperparameters and structural settings."""

    algo: str
    seed: int
    learning_rate: float
    hyper_lr: float
    tau: float
    gamma: float
    hyper_objective: str
    params: tuple[tuple[str, Any], ...]  # the structural settings (see GROUP_PARAMS), sorted by name

    @property
    def config(self) -> dict[str, Any]:
        """Everything but the seed: the configuration this member is one seed of."""
        out: dict[str, Any] = dict(algo=self.algo)
        out.update({k: getattr(self, k) for k in MEMBER_HYPERPARAMETERS})
        out.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in self.params})
        return out

    @property
    def group_key(self) -> tuple[Any, ...]:
        """Members with equal keys share one batched computation (same shapes and code path)."""
        return (self.params, self.tau < 1)


#: Where a member's minibatch indices come from: ``"member"``, its own stream, seeded by the run's ``seed`` and the
#: member's seed, so that a member draws the same minibatches in any population; ``"population"``, one stream for
#: the whole run (the only one before 2026-12-04), which makes a member's minibatches depend on who else is in it.
MINIBATCH_STREAMS = ("member", "population")
#: Gradient steps of minibatch indices a member's stream draws at once (``"member"``): one generator call per
#: member per block instead of per step. Part of the stream's definition: changing it changes every run's indices.
STREAM_BLOCK = 250


def param_defaults(algo: str) -> dict[str, Any]:
    """An algorithm's structural settings (``-params`` keys) when a run leaves them out: HANQ's reading of the paper
    (issue #14: per-state metapredictor, next-minibatch hypergradient, a step on log alpha), with the algorithm's
    own network flags (:data:`ALGORITHMS`)."""
    policy = dict(
        predictor="meta",
        positive_scale=True,
        predictor_bias=True,
        symmetric=False,
        main_norm="layer",
        meta_norm="l2",
        metapredictor_outputs="state",  # HANQ's default (issue #14)
        net_arch=[128],
    )
    policy.update(ALGORITHMS[algo]["policy"])
    optimiser = dict(lr_parameterization="log", hyper_batch="next", tune_betas=False)
    return {**policy, "loss": "mse", "max_grad_norm": None, **optimiser}


def _as_grid(value: Any, name: str) -> list[Any]:
    if name == "net_arch":  # a list of ints is one architecture, a list of lists a grid
        return value if value and isinstance(value, list) and isinstance(value[0], list) else [value]
    return value if isinstance(value, list) else [value]


def _check_number(name: str, value: Any, low: float, high: float, low_open: bool, high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"Invalid {name}={value!r}: expected a number")
    bad_low = value <= low if low_open else value < low
    bad_high = value >= high if high_open else value > high
    if bad_low or bad_high:
        interval = ("(" if low_open else "[") + f"{low:g}, {high:g}" + (")" if high_open else "]")
        raise ValueError(f"Invalid {name}={value!r}: must be in {interval}")


def make_members(
    algo: str,
    seeds: Sequence[int],
    learning_rate: Sequence[float] | None = None,
    hyper_lr: Sequence[float] | None = None,
    tau: Sequence[float] | None = None,
    gamma: Sequence[float] | None = None,
    hyper_objective: Sequence[str] | None = None,
    params: dict[str, Any] | None = None,
) -> list[Member]:
    """The grid: the product of the value lists given (``None``: the algorithm's default) and the seeds.

    ``params`` holds structural settings (:data:`GROUP_PARAMS`); a list value is a grid dimension
    (``net_arch``: a list of lists). Every value is checked here, before any training.
    """
    if algo not in ALGORITHMS:
        raise ValueError(f"Invalid algo={algo!r}: expected one of {tuple(ALGORITHMS)}")
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds: expected at least one seed")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise TypeError(f"Invalid seed {seed!r}: expected an integer >= 0")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: expected distinct seeds, got {seeds}")
    defaults = ALGORITHMS[algo]
    grids: dict[str, list[Any]] = {
        "learning_rate": list(learning_rate) if learning_rate is not None else [10**-2.5],
        "hyper_lr": list(hyper_lr) if hyper_lr is not None else [defaults["hyper_lr"]],
        "tau": list(tau) if tau is not None else [defaults["tau"]],
        "gamma": list(gamma) if gamma is not None else [0.99],
        "hyper_objective": list(hyper_objective) if hyper_objective is not None else ["rg"],
    }
    for name, values in grids.items():
        if not values:
            raise ValueError(f"{name}: expected at least one value")
        for value in values:
            if name == "learning_rate":
                _check_number(name, value, 0.0, math.inf, low_open=True)
            elif name == "hyper_lr":
                _check_number(name, value, 0.0, math.inf, low_open=False)
            elif name == "tau":
                _check_number(name, value, 0.0, 1.0, low_open=True)
            elif name == "gamma":
                _check_number(name, value, 0.0, 1.0, low_open=False, high_open=True)
            elif value not in HYPER_OBJECTIVES:
                raise ValueError(f"Invalid hyper_objective={value!r}: expected one of {HYPER_OBJECTIVES}")
    structural = param_defaults(algo)
    param_grids: dict[str, list[Any]] = {}
    for name, value in (params or {}).items():
        if name not in GROUP_PARAMS:
            hint = " (pass it as its own argument)" if name in MEMBER_HYPERPARAMETERS else ""
            raise ValueError(f"Unknown parameter {name!r}{hint}: expected one of {tuple(GROUP_PARAMS)}")
        types, check, description = GROUP_PARAMS[name]
        for v in _as_grid(value, name):
            if (isinstance(v, bool) and bool not in types) or not isinstance(v, types) or not check(v):
                raise TypeError(f"Invalid value {v!r} for parameter {name!r}: expected {description}")
        param_grids[name] = _as_grid(value, name)
    names = list(grids) + list(param_grids)
    members = []
    for combo in itertools.product(*grids.values(), *param_grids.values()):
        point = dict(zip(names, combo))
        settings = dict(structural)
        settings.update({k: point[k] for k in param_grids})
        frozen = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in settings.items()))
        for seed in seeds:
            members.append(
                Member(algo=algo, seed=int(seed), params=frozen, **{k: point[k] for k in MEMBER_HYPERPARAMETERS})
            )
    return members


def estimate_memory(members: Sequence[Member], n_obs: int, n_actions: int, batch_size: int, eval_episodes: int) -> int:
    """A rough upper estimate of the bytes a run needs (parameters and optimiser state, activations of one
    gradient step, evaluation), used to refuse an M the machine cannot hold before any training."""
    total = 0
    for member in members:
        settings = dict(member.params)
        widths = [n_obs, *settings["net_arch"]]
        n_params = sum(a * b + b for a, b in zip(widths[:-1], widths[1:])) + widths[-1] * 3 * n_actions + 4 * widths[-1]
        total += 4 * n_params * 10  # params, target, grads, Adam moments, u, RG gradients, temporaries
        total += 4 * batch_size * sum(widths[1:]) * 40  # s and s' activations, their backward, temporaries
        total += 8 * eval_episodes * (n_obs + 8)
    return total


def available_memory(device: th.device) -> int:
    """Free memory of ``device`` in bytes (CUDA: ``mem_get_info``; CPU: MemAvailable of /proc/meminfo)."""
    if device.type == "cuda":
        return int(th.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _bmm_transposed(a: th.Tensor, b: th.Tensor) -> th.Tensor:
    """``a^T @ b`` for ``[M, K, p]`` and ``[M, K, q]``, computed as ``(b^T @ a)^T`` when that puts the wider
    dimension last: batched GEMMs with 3 output columns ran 5x slower than with 128 here (MKL, 2 cores)."""
    if a.shape[-1] >= b.shape[-1]:
        return th.bmm(b.transpose(1, 2), a).transpose(1, 2)
    return th.bmm(a.transpose(1, 2), b)


class _StackedLinearFunction(th.autograd.Function):
    """y = x W^T + b per member, with a backward that picks the fast GEMM layout (:func:`_bmm_transposed`)."""

    @staticmethod
    def forward(ctx: Any, x: th.Tensor, weight: th.Tensor, bias: th.Tensor | None) -> th.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        out = th.bmm(x, weight.transpose(1, 2))
        return out if bias is None else out.add_(bias.unsqueeze(1))

    @staticmethod
    def backward(ctx: Any, grad: th.Tensor) -> tuple[th.Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_x = th.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_w = _bmm_transposed(grad, x) if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


class StackedLinear(nn.Module):
    """``nn.Linear`` for M members at once: ``weight [M, out, in]``, ``bias [M, out]``, input ``[M, ..., in]``.

    Same parameter names as ``nn.Linear``, so a member's ``state_dict`` entries stack into it unchanged."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None

    def forward(self, x: th.Tensor) -> th.Tensor:
        shape = x.shape
        out = _StackedLinearFunction.apply(x.reshape(shape[0], -1, shape[-1]), self.weight, self.bias)
        return out.reshape(*shape[:-1], out.shape[-1])


class StackedLayerNorm(nn.Module):
    """``nn.LayerNorm`` over the last dimension with one affine transform per member (``weight [M, H]``)."""

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        if len(norm.normalized_shape) != 1 or not norm.elementwise_affine:
            raise ValueError("the population trainer supports LayerNorm over the last dimension with affine only")
        self.normalized_shape = tuple(norm.normalized_shape)
        self.eps = norm.eps
        self.weight = nn.Parameter(norm.weight.detach().clone())
        self.bias = nn.Parameter(norm.bias.detach().clone())

    def forward(self, x: th.Tensor) -> th.Tensor:
        shape = x.shape
        x = x.reshape(shape[0], -1, shape[-1])
        out = F.layer_norm(x, self.normalized_shape, eps=self.eps) * self.weight.unsqueeze(-2) + self.bias.unsqueeze(-2)
        return out.reshape(shape)


def stacked_twin(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose layers take a leading member dimension (``[M, batch, ...]``) and stacked
    parameters: ``nn.Linear`` -> :class:`StackedLinear`, ``nn.LayerNorm`` -> :class:`StackedLayerNorm`,
    ``nn.Flatten`` keeps the member and batch dimensions. The module's own methods (``HANQNetwork.latent``,
    ``predict_q``, ...) then run unchanged on all members at once, through :func:`torch.func.functional_call`.
    Parameter names are unchanged; a layer with parameters of any other type is refused."""
    twin = copy.deepcopy(module)

    def convert(parent: nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear):
                setattr(parent, name, StackedLinear(child))
            elif isinstance(child, nn.LayerNorm):
                setattr(parent, name, StackedLayerNorm(child))
            elif isinstance(child, nn.Flatten):
                setattr(parent, name, nn.Flatten(start_dim=child.start_dim + 1, end_dim=child.end_dim))
            elif any(True for _ in child.parameters(recurse=False)):
                raise ValueError(f"the population trainer cannot stack layer {name!r} ({type(child).__name__})")
            else:
                convert(child)

    convert(twin)
    return twin


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed memory in the heap instead of returning each large block to the OS.

    Every stacked activation of a population step is a few MB; by default glibc serves such blocks with
    ``mmap`` and gives them back on ``free``, so each step page-faults on fresh memory. Raising the mmap and
    trim thresholds (``mallopt``, the same as ``MALLOC_MMAP_THRESHOLD_`` etc.) measured 26 -> 14.5 ms per step
    for 30 HANQ members (benchmarks/results/speed_population.md). Process-wide and harmless elsewhere; a no-op
    (returning ``False``) where glibc is not the allocator.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
        big = 1 << 30
        return bool(
            libc.mallopt(m_mmap_threshold, big)
            and libc.mallopt(m_trim_threshold, big)
            and libc.mallopt(m_top_pad, 1 << 28)
        )
    except (OSError, AttributeError):
        return False


class _Group:
    """Members with the same structure: stacked parameters, per-member optimiser state, one step for all."""

    def __init__(
        self,
        members: list[Member],
        indices: list[int],
        observation_space: Any,
        action_space: Any,
        device: th.device,
        initial_params: dict[int, dict[str, th.Tensor]] | None = None,
    ) -> None:
        self.members = members
        self.indices = indices  # positions in the run's member list
        self.seed_index = th.zeros(len(members), dtype=th.long, device=device)  # row of each member's dataset
        self.member_index = th.tensor(indices, dtype=th.long, device=device)  # position in the trainer's members
        self.device = device
        settings = dict(members[0].params)
        self.settings = settings
        self.symmetric = bool(settings["symmetric"])
        self.loss = settings["loss"]
        self.max_grad_norm = settings["max_grad_norm"]
        self.lr_parameterization = settings["lr_parameterization"]
        self.same_batch = settings["hyper_batch"] == "same"  # HANQ(hyper_batch="same"): Alg. 2's literal form
        self.prev_batch: list[th.Tensor] | None = None  # that form's minibatch of the previous step
        # Adam's betas hyperoptimised too (HyperAdam); settings from before the option lack the key
        self.tune_betas = bool(settings.get("tune_betas", False))
        self.target_network = members[0].tau < 1
        policy_kwargs = {k: settings[k] for k in ("predictor", "positive_scale", "predictor_bias", "main_norm")}
        policy_kwargs.update(meta_norm=settings["meta_norm"], net_arch=list(settings["net_arch"]))
        policy_kwargs.update(metapredictor_outputs=settings["metapredictor_outputs"])
        nets = []
        for k, member in enumerate(members):
            # The same initial weights as HANQ(..., seed=seed): SB3 seeds every RNG, then builds the policy.
            set_random_seed(member.seed)
            policy = HANQPolicy(observation_space, action_space, lambda _: 1e-3, target_network=False, **policy_kwargs)
            net = policy.q_net.to(device)
            if initial_params is not None and indices[k] in initial_params:
                net.load_state_dict(initial_params[indices[k]])
            nets.append(net)
        self.twin = stacked_twin(nets[0])
        params, _ = stack_module_state(nets)  # type: ignore[arg-type]
        self.names = list(params)
        self.params = [params[name].detach().clone() for name in self.names]
        self.target = [p.clone() for p in self.params] if self.target_network else None
        self.exp_avgs = [th.zeros_like(p) for p in self.params]
        self.exp_avg_sqs = [th.zeros_like(p) for p in self.params]
        self.prev_updates: list[th.Tensor] | None = None
        self.step = 0  # Adam steps taken (the same for every member)
        self.hyper_step = 0
        self.base_lr = th.tensor([m.learning_rate for m in members], dtype=th.float64, device=device)
        self.hyper_lr = th.tensor([m.hyper_lr for m in members], dtype=th.float64, device=device)
        self.tau = th.tensor([m.tau for m in members], dtype=th.float64, device=device)
        self.gamma = th.tensor([m.gamma for m in members], dtype=th.float32, device=device)
        self.use_rg = th.tensor([m.hyper_objective == "rg" for m in members], device=device)
        self.any_rg = (not self.target_network) and any(m.hyper_objective == "rg" and m.hyper_lr > 0 for m in members)
        self.log_lr_scale = th.zeros(len(members), dtype=th.float64, device=device)
        self.lr_offset = th.zeros(len(members), dtype=th.float64, device=device)
        self.hyper_exp_avg = th.zeros(len(members), dtype=th.float64, device=device)
        self.hyper_exp_avg_sq = th.zeros(len(members), dtype=th.float64, device=device)
        # tune_betas: each member's (beta1, beta2) as logits (beta_from_logit), their hyper-Adam moments, and
        # alpha du/dbeta of the last step (per beta, one tensor per parameter)
        self.beta_logits = beta_logit(th.tensor([[0.9, 0.999]] * len(members), dtype=th.float64, device=device))
        self.hyper_beta_exp_avg = th.zeros(len(members), 2, dtype=th.float64, device=device)
        self.hyper_beta_exp_avg_sq = th.zeros(len(members), 2, dtype=th.float64, device=device)
        self.prev_d_beta1: list[th.Tensor] | None = None
        self.prev_d_beta2: list[th.Tensor] | None = None
        self.diverged_at = th.full((len(members),), -1, dtype=th.long, device=device)
        self.last_loss = th.zeros(len(members), device=device)
        self.last_scale = th.ones(len(members), device=device)
        self._predicted = ModuleFunction(self.twin, predicted_q_values)
        self._bootstrap = ModuleFunction(self.twin, bootstrap_q_values)
        self._forward = ModuleFunction(self.twin, lambda net, obs: net(obs))
        self._step_fn = self._loss_terms

    # -- state --------------------------------------------------------------------------------------------
    _TENSOR_LISTS: tuple[str, ...] = ("params", "target", "exp_avgs", "exp_avg_sqs", "prev_updates", "prev_batch")
    _TENSOR_LISTS += ("prev_d_beta1", "prev_d_beta2")
    _TENSORS: tuple[str, ...] = ("log_lr_scale", "lr_offset", "hyper_exp_avg", "hyper_exp_avg_sq", "diverged_at")
    _TENSORS += ("beta_logits", "hyper_beta_exp_avg", "hyper_beta_exp_avg_sq")

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {name: getattr(self, name) for name in self._TENSOR_LISTS + self._TENSORS}
        state.update(step=self.step, hyper_step=self.hyper_step)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self._TENSOR_LISTS:
            value = state.get(name)  # (checkpoints written before prev_batch existed lack it)
            setattr(self, name, None if value is None else [t.to(self.device) for t in value])
        for name in self._TENSORS:
            if name in state:  # (checkpoints written before tune_betas existed lack its tensors: the defaults stay)
                setattr(self, name, state[name].to(self.device))
        self.step, self.hyper_step = int(state["step"]), int(state["hyper_step"])

    def member_params(self, k: int) -> dict[str, th.Tensor]:
        """Member ``k``'s parameters as a ``state_dict`` of the network (e.g. to load into ``HANQ.q_net``)."""
        return {name: p[k].detach().clone() for name, p in zip(self.names, self.params)}

    @property
    def learning_rates(self) -> th.Tensor:
        """alpha per member (float64), as :class:`HyperAdam` computes it."""
        return adapted_learning_rate(self.base_lr, self.log_lr_scale, self.lr_offset, self.lr_parameterization, 1e-8)  # type: ignore[return-value]

    @property
    def betas(self) -> th.Tensor:
        """Adam's (beta1, beta2) per member, ``[M, 2]`` (float64): 0.9 and 0.999 unless ``tune_betas``."""
        return beta_from_logit(self.beta_logits)  # type: ignore[return-value]

    @property
    def beta1(self) -> th.Tensor:
        return self.betas[:, 0]

    @property
    def beta2(self) -> th.Tensor:
        return self.betas[:, 1]

    # -- one gradient step for all members ------------------------------------------------------------------
    def _named(self, tensors: Sequence[th.Tensor]) -> dict[str, th.Tensor]:
        """Stacked tensors as the twin's parameters; scalars of the network ([M]) broadcast as [M, 1, 1]."""
        return {"module." + n: (t.view(-1, 1, 1) if t.dim() == 1 else t) for n, t in zip(self.names, tensors)}

    def _prediction_and_targets(
        self,
        params: list[th.Tensor],
        batch: Sequence[th.Tensor],
        target_graph: bool,
        target_params: list[th.Tensor] | None = None,
    ) -> tuple[PredictorOutput, th.Tensor]:
        """Q_omega,theta(s, a) and y of every member's minibatch: the same functions as ``HANQ.train``, on all
        members at once (the twin's layers are stacked). y keeps its graph when ``target_graph``, with respect to
        ``target_params`` when given (the same values as ``params``, other leaves), else to ``params``."""
        obs, actions, next_obs, rewards, dones = batch
        out = functional_call(self._predicted, self._named(params), (obs, actions))
        if self.target is not None:
            source = self.target
        elif target_params is not None:  # the online weights' values, as other leaves (see train_step)
            source = target_params
        else:  # no target network: the targets use the online weights (Alg. 2)
            source = params if target_graph else [p.detach() for p in params]
        with th.set_grad_enabled(target_graph):
            next_q = functional_call(self._bootstrap, self._named(source), (next_obs, self.symmetric))
        return out, q_learning_targets(next_q, rewards, dones, self.gamma.view(-1, 1, 1))

    def _loss_terms(
        self, params: list[th.Tensor], shadow: list[th.Tensor] | None, batch: Sequence[th.Tensor]
    ) -> tuple[th.Tensor, th.Tensor, th.Tensor, th.Tensor]:
        """Per member: the training loss, Q_omega,theta(s, a), y and the mean omega_scale^+ of the minibatch.
        y is differentiable with respect to ``shadow`` (the residual-gradient term) when it is given. The
        function :meth:`train_step` runs (``_step_fn``), compiled when the trainer is built with ``compile``."""
        out, targets = self._prediction_and_targets(
            params, batch, target_graph=shadow is not None, target_params=shadow
        )
        losses = td_loss(out.prediction, targets, self.loss)  # [M]
        scales = (
            out.multiplier.detach().reshape(len(self.members), -1).mean(1)
            if out.multiplier is not None
            else th.ones(len(self.members), device=self.device)
        )
        return losses, out.prediction, targets, scales

    def train_step(self, batch: tuple[th.Tensor, ...], update_target: bool = True) -> None:
        """One gradient step of every member on its own minibatch ``batch`` (tensors ``[M, B, ...]``), then
        (``update_target``) the Polyak update of the target networks."""
        params = [p.requires_grad_(True) for p in self.params]
        directions = self.prev_updates if self.any_rg and not self.same_batch else None
        # RG's extra term needs the gradient through the targets; the targets read a second set of leaves with
        # the same values (``shadow``), so that one backward pass gives both gradients separately
        shadow = [p.detach().requires_grad_(True) for p in self.params] if directions is not None else None
        losses, predictions, targets, scales = self._step_fn(params, shadow, batch)
        through_target: Sequence[th.Tensor | None] = ()
        if shadow is not None:
            weights = -2.0 * (predictions - targets).detach() / predictions[0].numel()
            both = th.autograd.grad(
                [losses.sum(), targets], params + shadow, [th.ones_like(losses.sum()), weights], allow_unused=True
            )
            grads = [th.zeros_like(p) if g is None else g for p, g in zip(params, both[: len(params)])]
            through_target = both[len(params) :]
        else:
            grads = list(th.autograd.grad(losses.sum(), params))
        m = len(self.members)

        def per_member(tensors: list[th.Tensor]) -> th.Tensor:  # sum over each member's entries
            return th.stack([t.reshape(m, -1).sum(1) for t in tensors]).sum(0)

        ok = th.isfinite(losses) & th.isfinite(per_member([g * g for g in grads])) & (self.diverged_at < 0)
        if self.max_grad_norm is not None:  # th.nn.utils.clip_grad_norm_, per member
            norms = per_member([g * g for g in grads]).sqrt()
            coef = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            grads = [g * coef.view(-1, *([1] * (g.dim() - 1))) for g in grads]
        view = [(-1,) + (1,) * (p.dim() - 1) for p in params]
        grads = [th.where(ok.view(v), g, 0.0) for g, v in zip(grads, view)]

        lr = self.learning_rates
        if self.prev_updates is not None:
            # Eq. (7): dL~(theta_i)/dalpha = -grad L~(theta_i) . u_{i-1}; L~ = L_SG, or L_RG (Eq. 9) whose extra
            # term is the gradient through the bootstrap target (rg_directional_correction_reverse, per member)
            if self.same_batch:
                # Alg. 2 literally: L~ of the previous step's minibatch at the weights that step produced
                hyper_batch = self.prev_batch if self.prev_batch is not None else batch
                residual = self.use_rg.view(-1, 1, 1) & (self.target is None)
                hyper_shadow = [p.detach().requires_grad_(True) for p in params] if self.any_rg else []
                _, hyper_prediction, hyper_targets, _ = self._step_fn(params, hyper_shadow or None, hyper_batch)
                hyper_losses = hyperobjective_loss(hyper_prediction, hyper_targets, residual)
                hyper_grads = th.autograd.grad(hyper_losses.sum(), params + hyper_shadow, allow_unused=True)
                # grad L~ = its part through Q_omega,theta(s, a) + its part through the targets (the shadow leaves)
                through_q, through_y = hyper_grads[: len(params)], hyper_grads[len(params) :] or [None] * len(params)
                hyper_gradient = [
                    sum((g for g in (gq, gy) if g is not None), th.zeros_like(p))
                    for gq, gy, p in zip(through_q, through_y, params)
                ]

                def along(dirs: list[th.Tensor]) -> th.Tensor:  # grad L~ . d, per member
                    return per_member([g * d for g, d in zip(hyper_gradient, dirs)])
            else:

                def along(dirs: list[th.Tensor]) -> th.Tensor:
                    out = per_member([g * d for g, d in zip(grads, dirs)])
                    if directions is None:
                        return out
                    correction = per_member(
                        [th.zeros_like(d) if g is None else g * d for g, d in zip(through_target, dirs)]
                    )
                    return out + th.where(self.use_rg, correction, 0.0)

            directional = along(self.prev_updates)
            hypergrad = th.where(ok, -directional.double(), 0.0)
            self.hyper_step += 1
            self.log_lr_scale, self.lr_offset, self.hyper_exp_avg, self.hyper_exp_avg_sq = hyper_adam_update(  # type: ignore[assignment]
                hypergrad,
                lr,
                base_lr=self.base_lr,
                log_lr_scale=self.log_lr_scale,
                lr_offset=self.lr_offset,
                exp_avg=self.hyper_exp_avg,
                exp_avg_sq=self.hyper_exp_avg_sq,
                step=self.hyper_step,
                hyper_lr=self.hyper_lr,
                hyper_betas=(0.9, 0.999),
                hyper_eps=1e-8,
                lr_parameterization=self.lr_parameterization,
                min_lr=1e-8,
            )
            if self.tune_betas and self.prev_d_beta1 is not None and self.prev_d_beta2 is not None:
                # dL~/dbeta = grad L~(theta_i) . (-alpha du_{i-1}/dbeta) (prev_d_beta* hold alpha du/dbeta), then
                # one hyper-Adam step on each beta's logit, as HyperAdam(tune_betas=True)
                beta_hypergrad = -th.stack([along(self.prev_d_beta1), along(self.prev_d_beta2)], 1).double()
                beta_hypergrad = th.where(ok.view(-1, 1), beta_hypergrad, 0.0)
                self.beta_logits, self.hyper_beta_exp_avg, self.hyper_beta_exp_avg_sq = beta_logit_update(  # type: ignore[assignment]
                    beta_hypergrad,
                    self.beta_logits,
                    self.hyper_beta_exp_avg,
                    self.hyper_beta_exp_avg_sq,
                    self.hyper_step,
                    self.hyper_lr.view(-1, 1),
                    (0.9, 0.999),
                    1e-8,
                )
            lr = self.learning_rates
        for p in params:
            p.requires_grad_(False)
        with th.no_grad():
            self.step += 1
            if self.tune_betas:  # each member's own betas, with the derivatives the next beta hyper-step needs
                beta1, beta2 = self.betas.float().unbind(1)
                steps = [
                    adam_step_with_beta_derivatives(m, v, g, self.step, beta1.view(s), beta2.view(s), 1e-8)
                    for m, v, g, s in zip(self.exp_avgs, self.exp_avg_sqs, grads, view)
                ]
                updates = [u for u, _, _ in steps]
                # a step undefined in the betas' extremes (kept away from them) would still not reach the weights
                ok = ok & th.isfinite(per_member([u * u for u in updates]))
                updates = [th.where(ok.view(s), u, 0.0) for u, s in zip(updates, view)]
                self.prev_d_beta1 = [d1 * lr.float().view(s) for (_, d1, _), s in zip(steps, view)]
                self.prev_d_beta2 = [d2 * lr.float().view(s) for (_, _, d2), s in zip(steps, view)]
            else:
                adam_moments_(self.exp_avgs, self.exp_avg_sqs, grads, 0.9, 0.999)
                updates = adam_directions(self.exp_avgs, self.exp_avg_sqs, [self.step] * len(params), 0.9, 0.999, 1e-8)
            step_sizes = th.where(ok, -lr, 0.0).float()
            th._foreach_addcmul_(self.params, updates, [step_sizes.view(v) for v in view])
            self.prev_updates = updates
            if self.same_batch:
                self.prev_batch = list(batch)
            if (
                self.target is not None and update_target
            ):  # Polyak update with rate beta per member (SB3's polyak_update)
                keep = (1 - self.tau).float()
                tau = self.tau.float()
                th._foreach_mul_(self.target, [keep.view(v) for v in view])
                th._foreach_addcmul_(self.target, self.params, [tau.view(v) for v in view])
            newly = (~ok) & (self.diverged_at < 0)
            self.diverged_at = th.where(newly, self.step, self.diverged_at)
            self.last_loss = losses.detach()
            self.last_scale = scales.detach()

    # -- acting -------------------------------------------------------------------------------------------------
    def greedy_actions(self, obs: th.Tensor) -> th.Tensor:
        """argmax_a Q_theta(s, a) per member for observations ``[M, n, obs_dim]`` -> ``[M, n]``."""
        with th.no_grad():
            q_values = functional_call(self._forward, self._named(self.params), (obs,))
        return q_values.argmax(dim=-1)


class PopulationTrainer:
    """Train every member of ``members`` offline on its own seed's dataset, as one batched computation.

    :param env_id: one of :data:`~sb3_hanq.population.envs.BATCHED_ENV_IDS`
    :param members: from :func:`make_members` (any mix of seeds and hyperparameters)
    :param batch_size: minibatch size (§11: 128)
    :param n_samples: dataset size per seed (default: the paper's, :data:`DATASET_SIZES`)
    :param eval_episodes: evaluation episodes per member and evaluation
    :param target_update_interval: Polyak-update the target networks every this many gradient steps
    :param datasets: ``{seed: OfflineDataset}`` to use instead of collecting (e.g. loaded files)
    :param initial_params: ``{member index: state_dict}`` to start a member from given weights
    :param device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
    :param seed: seeds the minibatch indices of the run (members' datasets and weights follow their own seeds)
    :param minibatch_stream: one of :data:`MINIBATCH_STREAMS`. ``"member"`` (default): every member samples its
        minibatches from its own generator, seeded by ``seed`` and the member's seed, so a member's run does not
        depend on the other members (members sharing a seed share their minibatches, as paired runs);
        ``"population"``: one generator for the whole run, as runs before this option had
    :param compile: run every group's forward and backward pass (:meth:`_Group._loss_terms`) through
        :func:`torch.compile`, which fuses the elementwise work. The same math to float rounding (tested);
        measured 1.5-2.6x faster than eager (1.6x at M = 30 and 300) on 2 CPU cores
        (``benchmarks/results/speed_population.md``), at the price of 5-25 s of compilation on the first step
    :param pendulum_start: how the Pendulum datasets are collected, one of
        :data:`~sb3_hanq.common.offline.PENDULUM_STARTS` (see :func:`~sb3_hanq.common.offline.collect_dataset`)
    """

    def __init__(
        self,
        env_id: str,
        members: Sequence[Member],
        batch_size: int = 128,
        n_samples: int | None = None,
        eval_episodes: int = 10,
        target_update_interval: int = 1,
        datasets: dict[int, OfflineDataset] | None = None,
        initial_params: dict[int, dict[str, th.Tensor]] | None = None,
        device: th.device | str = "auto",
        seed: int = 0,
        compile: bool = False,
        pendulum_start: str = "episodes",
        minibatch_stream: str = "member",
    ) -> None:
        if env_id not in BATCHED_ENV_IDS:
            raise ValueError(f"Invalid env_id={env_id!r}: expected one of {BATCHED_ENV_IDS}")
        for name, value in (
            ("batch_size", batch_size),
            ("eval_episodes", eval_episodes),
            ("target_update_interval", target_update_interval),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"Invalid {name}={value!r}: must be an integer >= 1")
        if not members:
            raise ValueError("members: expected at least one member")
        if not isinstance(compile, bool):
            raise TypeError(f"Invalid compile={compile!r}: expected a bool")
        if pendulum_start not in PENDULUM_STARTS:
            raise ValueError(f"Invalid pendulum_start={pendulum_start!r}: expected one of {PENDULUM_STARTS}")
        if minibatch_stream not in MINIBATCH_STREAMS:
            raise ValueError(f"Invalid minibatch_stream={minibatch_stream!r}: expected one of {MINIBATCH_STREAMS}")
        register_envs()
        self.env_id = env_id
        self.members = list(members)
        self.batch_size = int(batch_size)
        self.n_samples = int(n_samples if n_samples is not None else DATASET_SIZES[env_id])
        if self.n_samples < 1:
            raise ValueError(f"Invalid n_samples={n_samples!r}: must be >= 1")
        self.eval_episodes = int(eval_episodes)
        self.target_update_interval = int(target_update_interval)
        self.device = get_device(device)
        if self.device.type == "cpu":
            keep_freed_memory()
        import gymnasium as gym

        probe = gym.make(env_id)
        self.observation_space, self.action_space = probe.observation_space, probe.action_space
        probe.close()
        n_obs = int(np.prod(self.observation_space.shape or (1,)))
        n_actions = int(self.action_space.n)  # type: ignore[attr-defined]
        needed = estimate_memory(self.members, n_obs, n_actions, self.batch_size, self.eval_episodes)
        free = available_memory(self.device)
        if needed > free:
            raise MemoryError(
                f"{len(self.members)} members need about {needed / 2**30:.1f} GiB, but {self.device} has "
                f"{free / 2**30:.1f} GiB free: run fewer members (seeds x grid) at once"
            )

        # one dataset per seed (§11), stacked [n_seeds, N, ...]
        self.seeds = sorted({m.seed for m in self.members})
        given = datasets or {}
        data: list[OfflineDataset] = []
        for s in self.seeds:
            dataset = (
                given[s]
                if s in given
                else collect_dataset(env_id, self.n_samples, seed=s, pendulum_start=pendulum_start)
            )
            validate_dataset(dataset, self.observation_space, self.action_space)
            if len(dataset) != len(data[0].rewards if data else dataset.rewards):
                raise ValueError("datasets: every seed's dataset must have the same number of transitions")
            data.append(dataset)
        as_tensor = lambda arrays, dtype: th.as_tensor(np.stack(arrays), dtype=dtype, device=self.device)  # noqa: E731
        self.data = (
            as_tensor([d.observations.reshape(len(d), -1) for d in data], th.float32),
            as_tensor([d.actions.reshape(-1, 1) for d in data], th.long),
            as_tensor([d.next_observations.reshape(len(d), -1) for d in data], th.float32),
            as_tensor([d.rewards.reshape(-1, 1) for d in data], th.float32),
            as_tensor([d.terminations.reshape(-1, 1) for d in data], th.float32),
        )
        self.dataset_size = len(data[0])

        keys: dict[tuple[Any, ...], list[int]] = {}
        for i, member in enumerate(self.members):
            keys.setdefault(member.group_key, []).append(i)
        self.groups = []
        for indices in keys.values():
            group = _Group(
                [self.members[i] for i in indices],
                indices,
                self.observation_space,
                self.action_space,
                self.device,
                initial_params,
            )
            group.seed_index = th.tensor([self.seeds.index(self.members[i].seed) for i in indices], device=self.device)
            if compile:
                group._step_fn = th.compile(group._loss_terms, dynamic=False)
            self.groups.append(group)
        self.minibatch_stream = minibatch_stream
        self.generator = th.Generator().manual_seed(seed)  # "population"
        # "member": one generator per member, and the block of indices they drew last ([M, STREAM_BLOCK, batch])
        self.member_generators = [
            th.Generator().manual_seed(int(np.random.SeedSequence([seed, m.seed]).generate_state(1)[0]))
            for m in (self.members if minibatch_stream == "member" else [])
        ]
        self._block: th.Tensor | None = None
        self._block_index = -1  # which block of STREAM_BLOCK steps self._block holds
        self._block_states = [g.get_state() for g in self.member_generators]  # the generators before that block
        self.num_steps = 0
        #: per evaluation: gradient step, and per member score / learning rate / loss / omega_scale^+
        self.history: dict[str, list[Any]] = {"steps": [], "scores": [], "learning_rates": [], "losses": []}
        self.history["omega_scales"] = []
        self.index_fn: Callable[[_Group, int], th.Tensor] | None = None  # tests: replay given minibatch indices

    def _draw_block(self) -> None:
        """The next :data:`STREAM_BLOCK` steps of every member's indices, from the members' own generators."""
        self._block_states = [g.get_state() for g in self.member_generators]
        self._block = th.stack(
            [
                th.randint(self.dataset_size, (STREAM_BLOCK, self.batch_size), generator=g)
                for g in self.member_generators
            ]
        ).to(self.device)
        self._block_index += 1

    def minibatch_indices(self, group: _Group) -> th.Tensor:
        """The dataset rows ``[members of group, batch_size]`` that ``group`` trains on at gradient step
        :attr:`num_steps` (counted from 1), from the stream :attr:`minibatch_stream` names."""
        if self.index_fn is not None:
            return self.index_fn(group, self.num_steps).to(self.device)
        if self.minibatch_stream == "population":
            idx = th.randint(self.dataset_size, (len(group.members), self.batch_size), generator=self.generator)
            return idx.to(self.device)
        position = self.num_steps - 1
        while self._block_index < position // STREAM_BLOCK:
            self._draw_block()
        assert self._block is not None
        return self._block[group.member_index, position % STREAM_BLOCK]

    def _sample(self, group: _Group) -> tuple[th.Tensor, ...]:
        idx = self.minibatch_indices(group)
        rows = group.seed_index.view(-1, 1)
        return tuple(tensor[rows, idx] for tensor in self.data)

    def train_steps(self, n: int) -> None:
        """``n`` gradient steps of every member (no evaluation)."""
        for _ in range(n):
            self.num_steps += 1
            update_target = self.num_steps % self.target_update_interval == 0
            for group in self.groups:
                group.train_step(self._sample(group), update_target=update_target)

    def per_member(self, attribute: str) -> th.Tensor:
        """A per-member tensor of every group, in the order of ``members``."""
        out = th.empty(len(self.members), dtype=th.float64)
        for group in self.groups:
            value = getattr(group, attribute)
            out[group.indices] = value.detach().double().cpu()
        return out

    def evaluate(self) -> np.ndarray:
        """The normalised score (Table 10) of every member's greedy policy, averaged over ``eval_episodes``
        episodes whose start states depend on the member's seed and the evaluation's index only."""
        n, episodes = len(self.members), self.eval_episodes
        env = make_batched_env(self.env_id, n * episodes, device=self.device)
        eval_index = len(self.history["steps"])
        starts = []
        for member in self.members:
            draw = make_batched_env(self.env_id, episodes, device=self.device)
            draw.reset(th.Generator().manual_seed(1_000_003 * (member.seed + 1) + eval_index))
            starts.append(draw.state)
        obs = env.set_state(th.cat(starts))
        returns = th.zeros(n * episodes, dtype=th.float64, device=self.device)
        alive = th.ones(n * episodes, dtype=th.bool, device=self.device)
        actions = th.empty(n, episodes, dtype=th.long, device=self.device)
        for _ in range(env.max_episode_steps):
            obs_m = obs.view(n, episodes, -1)
            for group in self.groups:
                actions[group.indices] = group.greedy_actions(obs_m[group.indices])
            obs, reward, terminated = env.step(actions.view(-1))
            returns += th.where(alive, reward, 0.0)
            alive &= ~terminated
            if not bool(alive.any()):
                break
        mean_returns = returns.view(n, episodes).mean(1).cpu().numpy()
        return np.asarray(normalized_score(mean_returns, self.env_id), dtype=np.float64)

    def record(self) -> np.ndarray:
        """Evaluate and append one row to :attr:`history`; returns the scores."""
        scores = self.evaluate()
        self.history["steps"].append(self.num_steps)
        self.history["scores"].append(scores.tolist())
        self.history["learning_rates"].append(self.per_member("learning_rates").tolist())
        self.history["losses"].append(self.per_member("last_loss").tolist())
        self.history["omega_scales"].append(self.per_member("last_scale").tolist())
        if any(group.tune_betas for group in self.groups):  # Adam's betas, where the hypergradient moves them
            for name in ("beta1", "beta2"):
                self.history.setdefault(name, []).append(self.per_member(name).tolist())
        return scores

    # -- checkpoints -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return dict(
            num_steps=self.num_steps,
            generator=self.generator.get_state(),
            minibatch_stream=self.minibatch_stream,
            # "member": the generators before the block in use, which load_state_dict draws again
            member_generators=self._block_states,
            block_index=self._block_index,
            history=self.history,
            groups=[g.state_dict() for g in self.groups],
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        stream = state.get("minibatch_stream", "population")  # (checkpoints before the option: "population")
        if stream != self.minibatch_stream:
            raise ValueError(
                f"state: saved with minibatch_stream={stream!r}, this trainer has {self.minibatch_stream!r}"
            )
        self.num_steps = int(state["num_steps"])
        self.generator.set_state(state["generator"].cpu())  # (a checkpoint loaded with map_location="cuda")
        if stream == "member":
            self._block_states = [saved.cpu() for saved in state["member_generators"]]
            for generator, saved in zip(self.member_generators, self._block_states):
                generator.set_state(saved)
            # the block the saved run was in is drawn again from the same states when the next step needs it
            self._block_index, self._block = int(state["block_index"]) - 1, None
        self.history = state["history"]
        for group, group_state in zip(self.groups, state["groups"]):
            group.load_state_dict(group_state)

    def diverged_at(self) -> list[int | None]:
        """Per member, the gradient step whose loss or gradient was non-finite (``None``: never). From that
        step on the member's weights are frozen at their last finite values (and still evaluated)."""
        steps = self.per_member("diverged_at")
        return [None if s < 0 else int(s) for s in steps.tolist()]
