"""On a CUDA device: every algorithm trains with all of its tensors on the GPU, ``save`` / ``load`` moves it to the
CPU bit for bit, a loaded model acts alike on both devices, and the population trainer's CUDA run agrees with its
CPU run to float rounding.

Skipped without CUDA (the development machine has none); ``benchmarks/gpu_check.sh`` runs this file on a GPU.
The models are the small ones the per-algorithm tests build (their ``_small`` helpers), with ``device="cuda"``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch as th
from test_crossq_wn import _small as small_crossq_wn
from test_population import BATCH, EQUAL_STEPS
from test_population import ENV as POPULATION_ENV
from test_preqn import _small as small_preqn
from test_stac import _small as small_stac

from sb3_hanq import HANQ, SSAQ, STACX
from sb3_hanq.offline import collect_dataset, train_offline
from sb3_hanq.population import PopulationTrainer, make_members

pytestmark = pytest.mark.skipif(not th.cuda.is_available(), reason="needs CUDA")

DEVICE = "cuda"
OFFLINE_ENV = "DiscretePendulum-v1"
STEPS = 300  # environment steps (online) or gradient steps (offline): "a few hundred"


def _offline(cls, device):
    """HANQ / SSAQ as the paper trains them: offline on a fixed DiscretePendulum dataset (§3.1, §11)."""
    model = cls("MlpPolicy", OFFLINE_ENV, batch_size=32, seed=0, device=device)
    return train_offline(model, collect_dataset(OFFLINE_ENV, 300, seed=0), STEPS, log_interval=0)


def _online(make):
    def build(device):
        model = make(device)
        return model.learn(STEPS)

    return build


BUILDERS = {
    "HANQ": lambda device: _offline(HANQ, device),
    "SSAQ": lambda device: _offline(SSAQ, device),
    # 200 gradient steps each after 100 random steps
    "CrossQWN": _online(lambda device: small_crossq_wn(learning_starts=100, batch_size=16, device=device)),
    "PreQN": _online(lambda device: small_preqn(device=device)),
    # 30 updates of 2 envs x 5 steps; STACX: three heads and their metaparameters
    "STAC": _online(lambda device: small_stac(device=device)),
    "STACX": _online(lambda device: small_stac(cls=STACX, device=device)),
}


def _saved_state(model) -> dict[str, Any]:
    """Every leaf that ``save`` writes, keyed by its path: the policy's and the optimisers' state dicts (tensors,
    and plain numbers such as HyperAdam's hyper-optimiser state), the tensors ``save`` stores as they are (STAC's
    eta), and any other tensor the algorithm keeps as an attribute."""
    leaves: dict[str, Any] = {}

    def walk(path: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{path}/{key}", item)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(f"{path}/{i}", item)
        else:
            leaves[path] = value

    walk("", model.get_parameters())
    walk("", {f"attr.{k}": v for k, v in vars(model).items() if isinstance(v, th.Tensor)})
    return leaves


def _is_adam_step(path: str, tensor: th.Tensor) -> bool:
    """torch.optim.Adam / AdamW keep ``state["step"]`` as a 0-d CPU tensor by design unless ``capturable`` or
    ``fused`` (their ``_init_group``): reading it needs no device sync. The only tensor allowed off the device."""
    return path.endswith("/step") and tensor.dim() == 0 and tensor.device.type == "cpu"


def _assert_on(state: dict[str, Any], device: str) -> None:
    tensors = {k: v for k, v in state.items() if isinstance(v, th.Tensor)}
    assert tensors
    elsewhere = {k: v.device for k, v in tensors.items() if v.device.type != device and not _is_adam_step(k, v)}
    assert not elsewhere, f"tensors not on {device}: {elsewhere}"


def _assert_equal(state: dict[str, Any], other: dict[str, Any]) -> None:
    """The same leaves, bit for bit (tensors compared on the CPU, dtype included)."""
    assert state.keys() == other.keys()
    for key, value in state.items():
        if isinstance(value, th.Tensor):
            theirs = other[key]
            assert value.dtype == theirs.dtype and th.equal(value.cpu(), theirs.cpu()), key
        else:
            assert value == other[key], key


@pytest.mark.parametrize("name", list(BUILDERS))
def test_trains_on_cuda_and_round_trips_to_cpu(name, tmp_path):
    model = BUILDERS[name](DEVICE)
    assert model.device.type == DEVICE
    state = _saved_state(model)
    _assert_on(state, DEVICE)
    for key, value in state.items():
        if isinstance(value, th.Tensor) and value.is_floating_point():
            assert th.isfinite(value).all(), key
    # each optimiser really stepped, so its moments are among the tensors checked
    optimizers = {key.split("/")[1] for key in state if "optimizer" in key.split("/")[1]}
    assert optimizers and all(any(k.startswith(f"/{o}/state/") for k in state) for o in optimizers), optimizers

    model.save(tmp_path / name)
    on_cpu = type(model).load(tmp_path / name, device="cpu")
    assert on_cpu.device.type == "cpu"
    loaded = _saved_state(on_cpu)
    _assert_on(loaded, "cpu")
    _assert_equal(state, loaded)
    on_device = type(model).load(tmp_path / name, device=DEVICE)
    _assert_on(_saved_state(on_device), DEVICE)
    _assert_equal(state, _saved_state(on_device))

    space = model.observation_space
    space.seed(0)
    obs = np.stack([space.sample() for _ in range(64)])
    action_cpu, _ = on_cpu.predict(obs, deterministic=True)
    action_device, _ = on_device.predict(obs, deterministic=True)
    if np.issubdtype(action_cpu.dtype, np.integer):
        # argmax over Q-values or logits: a different action needs two of them within float32 rounding (~1e-6
        # relative) of each other, which 64 random observations meet with probability ~1e-4
        np.testing.assert_array_equal(action_device, action_cpu)
    else:
        # tanh actors of two or three float32 layers of width <= 32: the devices sum in different orders, which
        # moves each pre-activation by a few ulps (~1e-6 at these magnitudes); x2 for Pendulum's action scale
        np.testing.assert_allclose(action_device, action_cpu, rtol=0, atol=1e-5)


POPULATIONS = {
    # the first and the last configuration of test_population.py::test_member_equals_sb3_class: HANQ with both
    # hyperobjectives (no target network, the RG term, the hyper-Adam step on alpha) and DQN-LN with Polyak targets
    "hanq": dict(learning_rate=[3e-3], hyper_lr=[0.1], hyper_objective=["rg", "sg"]),
    "dqn": dict(learning_rate=[3e-3], tau=[0.05, 0.5], params=dict(main_norm="layer")),
}


@pytest.mark.parametrize("algo", list(POPULATIONS))
def test_population_on_cuda_matches_cpu(algo):
    """The same members, data, initial weights and minibatch indices (drawn on the CPU) on both devices: after
    EQUAL_STEPS steps the weights, learning rates and losses agree to float rounding; a CUDA checkpoint loads into
    a CPU trainer bit for bit."""
    # Within rounding: the devices run other GEMM, reduction and LayerNorm kernels (other summation orders; TF32
    # stays off, checked below), so each op differs by a few ulps, as SB3 and the population do on one CPU
    # (test_population.py: the same tolerances after the same EQUAL_STEPS = 50 steps). Such differences stay at
    # rounding level until a ReLU pre-activation comes within rounding of 0, after which the trajectories part
    # (test_population.py saw the first such kink at step 56 or later). Measured for these two populations on the
    # CPU, with the initial weights moved by one ulp (16 runs each): after 50 steps the weights, learning rates and
    # losses differ by at most 2.2% of the tolerances below, and 0 of 32 runs fails them.
    assert th.get_float32_matmul_precision() == "highest", "TF32 matmuls round to 1e-3: compare in full float32"
    members = make_members(algo, [0], **POPULATIONS[algo])
    # "uniform": the dataset whose kinks test_population.py measured
    kwargs = dict(batch_size=BATCH, n_samples=300, seed=0, pendulum_start="uniform")
    cpu = PopulationTrainer(POPULATION_ENV, members, device="cpu", **kwargs)
    cuda = PopulationTrainer(POPULATION_ENV, members, device=DEVICE, **kwargs)
    for trainer in (cpu, cuda):
        trainer.train_steps(EQUAL_STEPS)
    for group_cpu, group_cuda in zip(cpu.groups, cuda.groups, strict=True):
        assert group_cpu.indices == group_cuda.indices
        tensors = group_cuda.params + group_cuda.exp_avgs + group_cuda.exp_avg_sqs + (group_cuda.target or [])
        assert all(t.device.type == DEVICE for t in tensors)
        for name, p_cpu, p_cuda in zip(group_cpu.names, group_cpu.params, group_cuda.params, strict=True):
            th.testing.assert_close(p_cuda.cpu(), p_cpu, rtol=1e-4, atol=2e-5, msg=lambda m, n=name: f"{n}: {m}")
    for attribute, rtol in (("learning_rates", 1e-5), ("last_loss", 1e-4)):  # float64 alpha as test_population.py
        th.testing.assert_close(cuda.per_member(attribute), cpu.per_member(attribute), rtol=rtol, atol=0)
    if algo == "hanq":  # alpha was adapted, so the learning rates above compare the hypergradient path too
        assert not th.allclose(cuda.per_member("learning_rates"), th.tensor(3e-3, dtype=th.float64))
    assert cuda.diverged_at() == cpu.diverged_at() == [None] * len(members)

    # a checkpoint written on the GPU resumes on the CPU (sb3_hanq.population.run's resume path)
    resumed = PopulationTrainer(POPULATION_ENV, members, device="cpu", **kwargs)
    resumed.load_state_dict(cuda.state_dict())
    assert resumed.num_steps == EQUAL_STEPS
    for group_resumed, group_cuda in zip(resumed.groups, cuda.groups, strict=True):
        for p, q in zip(group_resumed.params + group_resumed.exp_avgs, group_cuda.params + group_cuda.exp_avgs):
            assert p.device.type == "cpu" and th.equal(p, q.cpu())
