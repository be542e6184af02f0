"""HyperAdam against independent references: torch.optim.Adam, finite differences, hand-built cases."""

import copy
import math

import pytest
import torch as th

from sb3_hanq.common.optimizers import HyperAdam, adam_step_with_beta_derivatives


def _regression_problem(dtype=th.float32, seed=0):
    gen = th.Generator().manual_seed(seed)
    x = th.randn(64, 5, generator=gen, dtype=dtype)
    y = th.randn(64, 1, generator=gen, dtype=dtype)
    th.manual_seed(seed)
    net = th.nn.Sequential(th.nn.Linear(5, 16), th.nn.Tanh(), th.nn.Linear(16, 1)).to(dtype)
    return net, x, y


def _loss(net, x, y):
    return ((net(x) - y) ** 2).mean()


def _steps(net, opt, x, y, n=5):
    for _ in range(n):
        opt.zero_grad()
        _loss(net, x, y).backward()
        opt.step()


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
    _steps(net, opt, x, y)
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


@pytest.mark.parametrize("tune_betas", [False, True])
def test_state_dict_round_trip_continues_identically(tune_betas):
    net, x, y = _regression_problem()
    opt = HyperAdam(net.parameters(), lr=1e-2, hyper_lr=0.1, tune_betas=tune_betas)
    _steps(net, opt, x, y)
    clone = copy.deepcopy(net)
    opt_clone = HyperAdam(clone.parameters(), lr=1.0, tune_betas=tune_betas)
    opt_clone.load_state_dict(copy.deepcopy(opt.state_dict()))  # as a save/load through a file would
    assert opt_clone.param_groups[0]["lr"] == opt.param_groups[0]["lr"] != 1e-2
    assert (opt_clone.param_groups[0]["betas"] == opt.param_groups[0]["betas"] != (0.9, 0.999)) == tune_betas
    for model, optimizer in ((net, opt), (clone, opt_clone)):
        for _ in range(5):
            optimizer.zero_grad()
            _loss(model, x, y).backward()
            optimizer.step()
    assert opt_clone.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert opt_clone.param_groups[0]["betas"] == opt.param_groups[0]["betas"]
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


def _naive_adam_direction(m_prev, v_prev, grad, step, beta1, beta2, eps=1e-8):
    """Adam's u from the moments before the step, written out (differentiable in the betas)."""
    m = beta1 * m_prev + (1 - beta1) * grad
    v = beta2 * v_prev + (1 - beta2) * grad * grad
    return (m / (1 - beta1**step)) / ((v / (1 - beta2**step)).sqrt() + eps)


@pytest.mark.parametrize("step", [1, 2, 30])
@pytest.mark.parametrize("per_member", [False, True])
def test_adam_beta_derivatives_match_autograd(step, per_member):
    """du/dbeta1 and du/dbeta2 (tune_betas) against autograd through the written-out Adam step, for float betas and
    for one pair per population member (a leading member dimension); at step 1 both are exactly 0 (u = g / |g|)."""
    gen = th.Generator().manual_seed(step)
    shape = (3, 4, 5)
    grad = th.randn(shape, generator=gen, dtype=th.float64)
    m_prev = th.zeros(shape, dtype=th.float64) if step == 1 else th.randn(shape, generator=gen, dtype=th.float64)
    v_prev = th.zeros(shape, dtype=th.float64) if step == 1 else th.rand(shape, generator=gen, dtype=th.float64)
    if per_member:
        beta1 = th.tensor([0.8, 0.9, 0.95], dtype=th.float64).view(-1, 1, 1)
        beta2 = th.tensor([0.99, 0.999, 0.9], dtype=th.float64).view(-1, 1, 1)
    else:
        beta1, beta2 = th.full((1, 1, 1), 0.85, dtype=th.float64), th.full((1, 1, 1), 0.995, dtype=th.float64)
    # u is elementwise in the betas: with one beta per entry, the gradient of sum(u) is each entry's derivative
    b1, b2 = (b.expand(shape).clone().requires_grad_(True) for b in (beta1, beta2))
    reference = _naive_adam_direction(m_prev, v_prev, grad, step, b1, b2)
    jac1, jac2 = th.autograd.grad(reference.sum(), (b1, b2))
    m, v = m_prev.clone(), v_prev.clone()
    betas = (beta1, beta2) if per_member else (0.85, 0.995)
    update, d_beta1, d_beta2 = adam_step_with_beta_derivatives(m, v, grad, step, *betas, eps=1e-8)
    assert th.allclose(update, reference.detach(), rtol=1e-12, atol=0)
    assert th.allclose(d_beta1, jac1, rtol=1e-7, atol=1e-10)
    assert th.allclose(d_beta2, jac2, rtol=1e-7, atol=1e-10)
    if step == 1:
        assert th.equal(d_beta1, th.zeros_like(d_beta1)) and th.equal(d_beta2, th.zeros_like(d_beta2))
    # the moments were updated in place, as Adam's
    assert th.allclose(m, beta1 * m_prev + (1 - beta1) * grad) and th.allclose(
        v, beta2 * v_prev + (1 - beta2) * grad**2
    )


def test_beta_hypergradients_match_finite_differences():
    """tune_betas: dL(theta_i)/dbeta along theta_i = theta_{i-1} - alpha u_{i-1}(beta1, beta2), by central differences
    of the loss at the weights the last step would have reached with each beta moved."""
    net, x, y = _regression_problem(dtype=th.float64)
    opt = HyperAdam(net.parameters(), lr=1e-2, hyper_lr=1e-2, tune_betas=True)
    _steps(net, opt, x, y)
    params = list(net.parameters())
    theta = [p.detach().clone() for p in params]
    moments = [(opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone()) for p in params]
    opt.zero_grad()
    _loss(net, x, y).backward()
    grads = [p.grad.clone() for p in params]
    opt.step()  # step 6: alpha and the betas take their hyper-step, then theta moves with them
    group = opt.param_groups[0]
    alpha, (beta1, beta2), step = group["lr"], group["betas"], opt.state[params[0]]["step"]
    assert (beta1, beta2) != (0.9, 0.999)

    def loss_at(b1, b2):
        probe = copy.deepcopy(net)
        with th.no_grad():
            for p, t0, (m, v), g in zip(probe.parameters(), theta, moments, grads):
                p.copy_(t0 - alpha * _naive_adam_direction(m, v, g, step, b1, b2))
        return _loss(probe, x, y).item()

    h = 1e-6
    fd = [
        (loss_at(beta1 + h, beta2) - loss_at(beta1 - h, beta2)) / (2 * h),
        (loss_at(beta1, beta2 + h) - loss_at(beta1, beta2 - h)) / (2 * h),
    ]
    assert loss_at(beta1, beta2) == pytest.approx(_loss(net, x, y).item(), rel=1e-12)  # the reference is that step
    opt.zero_grad()
    _loss(net, x, y).backward()
    opt.step()
    assert group["beta_hypergradients"] == pytest.approx(fd, rel=1e-4, abs=1e-10)
    assert all(abs(g) > 1e-8 for g in fd)  # (a real test: the derivatives are not 0)


def test_tune_betas_bad_arguments():
    param = th.nn.Parameter(th.zeros(2))
    with pytest.raises(TypeError, match="tune_betas"):
        HyperAdam([param], tune_betas="yes")
    with pytest.raises(ValueError, match="betas"):
        HyperAdam([param], tune_betas=True, betas=(0.0, 0.999))
    optimizer = HyperAdam([param], hyper_lr=0.1, tune_betas=True)
    param.grad = th.ones(2)
    with pytest.raises(ValueError, match="hyper_grads"):
        optimizer.step(hyper_correction=0.0)


def test_tune_betas_keeps_beta2_below_one():
    """A logit pushed far past the bound (as a hypergradient that raises beta2 step after step does) is brought back
    within it at the next hyper-step: beta2 stays below 1 in float32, where Adam's bias correction would be 0 and
    the step NaN, and the weights stay finite."""
    net, x, y = _regression_problem()
    opt = HyperAdam(net.parameters(), lr=1e-2, hyper_lr=0.1, tune_betas=True)
    _steps(net, opt, x, y, n=2)
    opt.param_groups[0]["beta_logits"] = [-50.0, 50.0]
    _steps(net, opt, x, y, n=3)
    beta1, beta2 = opt.param_groups[0]["betas"]
    assert 0 < th.tensor(beta1, dtype=th.float32).item() and th.tensor(beta2, dtype=th.float32).item() < 1
    assert all(th.isfinite(p).all() for p in net.parameters())
