"""HyperAdam against independent references: torch.optim.Adam, finite differences, hand-built cases."""

import copy
import math

import pytest
import torch as th

from sb3_hanq.common.optimizers import HyperAdam


def _regression_problem(dtype=th.float32, seed=0):
    gen = th.Generator().manual_seed(seed)
    x = th.randn(64, 5, generator=gen, dtype=dtype)
    y = th.randn(64, 1, generator=gen, dtype=dtype)
    th.manual_seed(seed)
    net = th.nn.Sequential(th.nn.Linear(5, 16), th.nn.Tanh(), th.nn.Linear(16, 1)).to(dtype)
    return net, x, y


def _loss(net, x, y):
    return ((net(x) - y) ** 2).mean()


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_zero_hyper_lr_is_exactly_adam(weight_decay):
    net, x, y = _regression_problem()
    ref = copy.deepcopy(net)
    opt = HyperAdam(net.parameters(), lr=3e-3, hyper_lr=0.0, weight_decay=weight_decay)
    ref_opt = th.optim.Adam(ref.parameters(), lr=3e-3, weight_decay=weight_decay, foreach=False)
    for _ in range(50):
        for model, optimizer in ((net, opt), (ref, ref_opt)):
            optimizer.zero_grad()
            _loss(model, x, y).backward()
            optimizer.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        assert th.allclose(p, q, atol=1e-6, rtol=0), (p - q).abs().max()
    assert opt.param_groups[0]["lr"] == 3e-3


@pytest.mark.parametrize("parameterization", ["log", "linear"])
def test_hypergradient_matches_finite_differences(parameterization):
    """dL(theta_i)/dalpha along theta_i = theta_{i-1} - alpha u_{i-1} (Eq. 7), by central differences."""
    net, x, y = _regression_problem(dtype=th.float64)
    opt = HyperAdam(net.parameters(), lr=1e-2, hyper_lr=1e-3, lr_parameterization=parameterization)
    for _ in range(5):
        opt.zero_grad()
        _loss(net, x, y).backward()
        opt.step()
    alpha = opt.param_groups[0]["lr"]  # the alpha used for the last step
    params = list(net.parameters())
    u_prev = [opt.state[p]["prev_update"].clone() for p in params]
    theta_prev = [p.detach() + alpha * u for p, u in zip(params, u_prev)]

    def loss_at(a):
        probe = copy.deepcopy(net)
        with th.no_grad():
            for p, t0, u in zip(probe.parameters(), theta_prev, u_prev):
                p.copy_(t0 - a * u)
        return _loss(probe, x, y).item()

    eps = 1e-6
    fd = (loss_at(alpha + eps) - loss_at(alpha - eps)) / (2 * eps)
    opt.zero_grad()
    _loss(net, x, y).backward()
    opt.step()
    assert opt.param_groups[0]["hypergradient"] == pytest.approx(fd, rel=1e-5, abs=1e-10)


def test_separate_hyperobjective_gradient_is_used():
    """hyper_grads replaces p.grad in Eq. (7) but not in the parameter update (Eq. 6)."""
    net, x, y = _regression_problem(dtype=th.float64)
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    opt_a = HyperAdam(a.parameters(), lr=1e-2, hyper_lr=0.0)
    opt_b = HyperAdam(b.parameters(), lr=1e-2, hyper_lr=1e-12)  # adaptation negligible, but hypergradient computed
    for _ in range(3):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            _loss(model, x, y).backward()
            other = [th.ones_like(p) for p in model.parameters()]
            expected = -sum(
                (o * opt.state[p]["prev_update"]).sum()
                for o, p in zip(other, model.parameters())
                if "prev_update" in opt.state[p]
            )
            opt.step(hyper_grads=other)
    # hypergradient = ones . (-u_{i-1}) = -(sum of the previous update)
    assert opt_b.param_groups[0]["hypergradient"] == pytest.approx(float(expected), rel=1e-10)
    for p, q in zip(a.parameters(), b.parameters()):
        assert th.allclose(p, q, atol=1e-9)
    with pytest.raises(ValueError, match="hyper_grads"):
        opt_b.step(hyper_grads=[None])


def test_learning_rate_grows_when_too_small_and_shrinks_when_too_large():
    """On f(w) = w^2/2, tiny steps keep gradients aligned (alpha grows); overshooting flips them (alpha shrinks)."""
    for lr, should_grow in ((1e-3, True), (3.0, False)):
        w = th.nn.Parameter(th.tensor([5.0]))
        opt = HyperAdam([w], lr=lr, hyper_lr=0.05)
        for _ in range(30):
            opt.zero_grad()
            (0.5 * w**2).sum().backward()
            opt.step()
        assert (opt.param_groups[0]["lr"] > lr) == should_grow


def test_alpha_stays_positive():
    w = th.nn.Parameter(th.tensor([5.0]))
    for param, floor in (("log", 0.0), ("linear", 1e-6)):
        w.data.fill_(5.0)
        opt = HyperAdam([w], lr=3.0, hyper_lr=10.0, lr_parameterization=param, min_lr=1e-6)
        for _ in range(50):
            opt.zero_grad()
            (0.5 * w**2).sum().backward()
            opt.step()
            assert opt.param_groups[0]["lr"] > 0 and opt.param_groups[0]["lr"] >= floor


def test_schedule_writes_combine_with_adapted_alpha():
    """SB3 writes group['lr'] every train(); a constant value keeps the adaptation, a new one rescales it."""
    w = th.nn.Parameter(th.tensor([5.0]))
    opt = HyperAdam([w], lr=1e-3, hyper_lr=0.05)
    for _ in range(20):
        opt.param_groups[0]["lr"] = 1e-3  # what SB3's _update_learning_rate does with a constant schedule
        opt.zero_grad()
        (0.5 * w**2).sum().backward()
        opt.step()
    group = opt.param_groups[0]
    adapted = group["lr"]
    assert adapted > 1e-3  # adaptation survived the writes
    assert adapted == pytest.approx(1e-3 * math.exp(group["log_lr_scale"]))
    group["lr"] = 5e-4  # schedule decays: alpha = schedule * learned factor
    opt.zero_grad()
    (0.5 * w**2).sum().backward()
    opt.step()
    assert group["base_lr"] == 5e-4
    assert group["lr"] == pytest.approx(5e-4 * math.exp(group["log_lr_scale"]))


def test_state_dict_round_trip_continues_identically():
    net, x, y = _regression_problem()
    opt = HyperAdam(net.parameters(), lr=1e-2, hyper_lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        _loss(net, x, y).backward()
        opt.step()
    clone = copy.deepcopy(net)
    opt_clone = HyperAdam(clone.parameters(), lr=1.0)
    opt_clone.load_state_dict(copy.deepcopy(opt.state_dict()))  # as a save/load through a file would
    assert opt_clone.param_groups[0]["lr"] == opt.param_groups[0]["lr"] != 1e-2
    for model, optimizer in ((net, opt), (clone, opt_clone)):
        for _ in range(5):
            optimizer.zero_grad()
            _loss(model, x, y).backward()
            optimizer.step()
    assert opt_clone.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for p, q in zip(net.parameters(), clone.parameters()):
        assert th.equal(p, q)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=-1e-3), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(hyper_lr=-0.1), "hyper_lr"),
        (dict(lr_parameterization="exp"), "lr_parameterization"),
        (dict(betas=(0.9, 1.5)), "betas"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HyperAdam([th.nn.Parameter(th.zeros(1))], **kwargs)


def test_runaway_learning_rate_is_a_clear_error():
    """A gradient that never changes direction makes every hypergradient negative, so log alpha grows by ~kappa per
    step without bound; the optimiser stops with an error naming hyper_lr instead of writing inf into the weights."""
    param = th.nn.Parameter(th.zeros(3))
    optimizer = HyperAdam([param], lr=1e-3, hyper_lr=1.0)
    with pytest.raises(OverflowError, match="hyper_lr"):
        for _ in range(200):
            param.grad = th.ones(3)
            optimizer.step()
    assert th.isfinite(param).all()
