"""The neural tangent kernel (NTK) of a Q-function on a minibatch, and PreQN's preconditioned update.

Paper: Achiam, Knight & Abbeel, "Towards Characterizing Divergence in Deep Q-Learning" (2019), "PreQN paper".

* The NTK of Q on a batch B of state-action pairs (§3.1, Eq. 9) is the Gram matrix of the per-sample
  parameter gradients, ``K_ij = grad_theta Q(s_i, a_i) . grad_theta Q(s_j, a_j)``, i.e. ``K = Phi^T Phi``
  with ``Phi`` the ``P x n`` matrix whose columns are the gradients (§4, Eq. 19). To first order an update
  ``theta' = theta + alpha g`` changes the Q-values by ``Phi^T alpha g`` (Eq. 19), so a gradient step on the
  squared TD error moves them by ``alpha K (y - Q)`` (Eq. 10): the off-diagonal entries are the
  generalisation between samples.
* Two ways to build K: :func:`mlp_ntk` for plain MLPs, layer by layer from one forward and one backward pass
  without ever forming ``Phi``; :func:`jacobian_ntk` for any network, from per-sample Jacobians
  (``torch.func.vmap`` of ``jacrev``), which materialises ``Phi`` (n x P) and is the fallback.
* Diagnostics (§5.1, Fig. 1 and 3): :func:`ntk_diagonal`, :func:`ntk_row_ratio`, :func:`cosine_alignment`.
* PreQN's update (§4, Eqs. 22-24, Alg. 1 lines 11-13): :func:`ntk_lstsq` (``Z = K^+ Delta``),
  :func:`preconditioned_direction` (``sum_i Z_i grad_theta Q_i``, with :func:`mlp_weighted_gradient` for MLPs),
  :func:`backtracking_linesearch`.
* :class:`QFunction` / :func:`q_function` adapt any SB3 critic (TD3, DDPG, SAC, PreQN: ``ContinuousCritic``)
  or Q-network (DQN: ``QNetwork``) to these functions, and :func:`batch_ntk` is the NTK of one of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch as th
from stable_baselines3.common.base_class import BaseAlgorithm
from torch import nn
from torch.func import functional_call, jacrev, vmap

from sb3_hanq.common.utils import check_choice

NTK_METHODS = ("auto", "layerwise", "jacobian")

Obs = th.Tensor | dict[str, th.Tensor]


def _check_square(kernel: th.Tensor, name: str = "kernel") -> int:
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"{name} must be a square [n, n] matrix, got shape {tuple(kernel.shape)}")
    return kernel.shape[0]


def _check_vector(x: th.Tensor, n: int, name: str) -> None:
    if x.shape != (n,):
        raise ValueError(f"{name} must have shape [{n}], got {tuple(x.shape)}")


# --------------------------------------------------------------------------------------------------------------
# Building K
# --------------------------------------------------------------------------------------------------------------


def plain_mlp_layers(net: nn.Module) -> list[nn.Linear] | None:
    """The ``nn.Linear`` layers of ``net`` if it is a *plain MLP*, else ``None``.

    A plain MLP is an ``nn.Sequential`` whose children are ``nn.Linear`` layers and modules without parameters
    or buffers (activations such as ``nn.ReLU``, ``nn.Tanh``, ``Sin``; ``nn.Flatten``). Each sample's output
    then depends only on that sample's input, which :func:`mlp_ntk` relies on. SB3's ``create_mlp`` networks
    (the ``qf0`` of a ``ContinuousCritic``, the ``q_net`` of DQN's ``QNetwork``) are plain MLPs.
    """
    if not isinstance(net, nn.Sequential):
        return None
    layers = []
    for module in net:
        if isinstance(module, nn.Linear):
            layers.append(module)
        elif any(True for _ in module.parameters()) or any(True for _ in module.buffers()):
            return None
    return layers or None


class KernelAndOutput(NamedTuple):
    """The NTK of a batch and the per-sample outputs it is the kernel of; for :func:`mlp_ntk` also the layer
    inputs and backward signals it was built from (reused by :func:`mlp_weighted_gradient`)."""

    kernel: th.Tensor  # [n, n], detached
    output: th.Tensor  # [n], still attached to the autograd graph
    layers: list[nn.Linear] | None = None
    layer_inputs: list[th.Tensor] | None = None  # A_{l-1} [n, in_l] per layer
    backward_signals: list[th.Tensor] | None = None  # G_l [n, out_l] per layer


def mlp_ntk(net: nn.Sequential, x: th.Tensor, cotangents: th.Tensor | None = None) -> KernelAndOutput:
    r"""Layerwise NTK of a plain MLP (:func:`plain_mlp_layers`) from one forward and one backward pass.

    For the scalar outputs ``Q_i = v_i . net(x_i)`` (``v_i`` = ``cotangents[i]``; with one output unit and
    ``cotangents=None``, ``Q_i = net(x_i)``), the gradient of ``Q_i`` with respect to layer l's weight
    ``W_l`` is the outer product ``g_{l,i} a_{l-1,i}^T`` of the backward signal ``g_{l,i} = dQ_i / dz_{l,i}``
    at the layer's output ``z_l`` and the layer's input ``a_{l-1,i}``; the bias gradient is ``g_{l,i}``.
    Since ``<g a^T, g' a'^T> = (g . g')(a . a')``, the kernel of Eq. 9 is

        K = sum_l (G_l G_l^T) * (A_{l-1} A_{l-1}^T + 1)                                   (* elementwise)

    where the rows of ``A_{l-1}`` [n, in_l] are the layer inputs, the rows of ``G_l`` [n, out_l] the backward
    signals and ``+1`` is the bias (dropped for layers without one). ``G_l`` for all samples comes from a
    single backward pass of ``sum_i Q_i``, because sample i's output depends on sample i's input only. The
    ``n x P`` Jacobian is never formed: the cost is one extra backward pass and ``n^2 (in_l + out_l)`` flops
    per layer. Equals :func:`jacobian_ntk` up to float round-off (tested).

    :param net: plain MLP
    :param x: inputs [n, in_features]
    :param cotangents: ``v`` [n, out_features]; e.g. one-hot actions to take Q(s, a) from a DQN network.
        ``None`` requires one output unit.
    :return: the kernel [n, n] (detached), the outputs ``Q`` [n] with their autograd graph (so that ``Q``
        can be differentiated again), and the layers with their ``A_{l-1}`` and ``G_l``.
    """
    layers = plain_mlp_layers(net)
    if layers is None:
        raise ValueError(
            f"mlp_ntk needs a plain MLP (nn.Sequential of nn.Linear and parameter-free layers), got {net!r}; "
            "use jacobian_ntk for other networks"
        )
    if x.ndim != 2 or x.shape[1] != layers[0].in_features:
        raise ValueError(f"x must have shape [n, {layers[0].in_features}], got {tuple(x.shape)}")
    if not all(p.requires_grad for layer in layers for p in layer.parameters()):
        raise ValueError("mlp_ntk differentiates every nn.Linear parameter: all must have requires_grad=True")
    layer_inputs, layer_outputs = [], []
    h = x
    for module in net:
        if isinstance(module, nn.Linear):
            layer_inputs.append(h.detach())
            h = module(h)
            layer_outputs.append(h)
        else:
            h = module(h)
    if cotangents is None:
        if h.shape[1] != 1:
            raise ValueError(f"the network has {h.shape[1]} outputs: pass cotangents [n, {h.shape[1]}]")
        q = h[:, 0]
    else:
        if cotangents.shape != h.shape:
            raise ValueError(f"cotangents must have shape {tuple(h.shape)}, got {tuple(cotangents.shape)}")
        q = (h * cotangents).sum(dim=1)
    # G_l = dQ_i / dz_{l,i} for every sample at once (one backward pass); keep the graph for the caller.
    backward_signals = list(th.autograd.grad(q.sum(), layer_outputs, retain_graph=True))
    kernel = x.new_zeros(x.shape[0], x.shape[0])
    with th.no_grad():
        for layer, a, g in zip(layers, layer_inputs, backward_signals):
            input_gram = a @ a.T
            if layer.bias is not None:
                input_gram += 1.0
            kernel += (g @ g.T) * input_gram
    return KernelAndOutput(kernel, q, layers, layer_inputs, backward_signals)


def mlp_weighted_gradient(
    layers: Sequence[nn.Linear],
    layer_inputs: Sequence[th.Tensor],
    backward_signals: Sequence[th.Tensor],
    weights: th.Tensor,
) -> list[th.Tensor]:
    """``sum_i w_i grad_theta Q_i`` of a plain MLP from the ``A_{l-1}``, ``G_l`` of :func:`mlp_ntk`, without
    another backward pass: ``(w * G_l)^T A_{l-1}`` for ``W_l`` and ``G_l^T w`` for ``b_l`` (see ``mlp_ntk``).

    It is the gradient of ``sum_i w_i Q_i`` (tested against autograd) at the cost of one matrix product per
    layer. Returns one tensor per parameter, in the order of ``[p for layer in layers for p in
    layer.parameters()]`` (weight, then bias).
    """
    n = weights.shape[0]
    _check_vector(weights, n, "weights")
    out: list[th.Tensor] = []
    for layer, a, g in zip(layers, layer_inputs, backward_signals):
        weighted = g * weights[:, None]
        out.append(weighted.T @ a)
        if layer.bias is not None:
            out.append(weighted.sum(dim=0))
    return out


def jacobian_ntk(
    q_single: Callable[..., th.Tensor],
    params: dict[str, th.Tensor],
    *inputs: Any,
    chunk_size: int | None = None,
) -> th.Tensor:
    """NTK of any network from per-sample Jacobians (Eq. 9), with ``torch.func``: ``vmap(jacrev(q_single))``.

    Works for any architecture (CNN features, normalisation layers in evaluation mode, non-sequential
    heads) but materialises the per-sample gradients (n x P numbers); for plain MLPs use :func:`mlp_ntk`.
    ``K = sum_p J_p J_p^T`` is accumulated parameter tensor by parameter tensor, never concatenated.

    :param q_single: ``q_single(params, *sample_inputs) -> scalar`` for ONE sample (no batch dimension);
        typically built with ``torch.func.functional_call``
    :param params: the parameters to differentiate, name -> tensor
    :param inputs: batched inputs (tensors, or dicts of tensors), each with leading dimension n, or ``None``
    :param chunk_size: passed to ``vmap`` to bound memory
    :return: the kernel [n, n]
    """
    detached = {name: p.detach() for name, p in params.items()}
    in_dims = (None, *(None if x is None else 0 for x in inputs))
    jacobians = vmap(jacrev(q_single), in_dims=in_dims, chunk_size=chunk_size)(detached, *inputs)
    kernel: th.Tensor | None = None
    for jac in jacobians.values():
        flat = jac.reshape(jac.shape[0], -1)
        kernel = flat @ flat.T if kernel is None else kernel + flat @ flat.T
    if kernel is None:
        raise ValueError("jacobian_ntk got no parameters to differentiate")
    return kernel


# --------------------------------------------------------------------------------------------------------------
# Diagnostics (§5.1, Fig. 1 and 3)
# --------------------------------------------------------------------------------------------------------------


def ntk_diagonal(kernel: th.Tensor) -> th.Tensor:
    """The on-diagonal entries ``K_ii = ||grad_theta Q(s_i, a_i)||^2`` [n] (§5.1, Fig. 1 bottom): how fast Q
    moves at each sample under a gradient step (large entries: fast learning, and overshooting, §3.2)."""
    _check_square(kernel)
    return th.diagonal(kernel)


def ntk_row_ratio(kernel: th.Tensor) -> th.Tensor:
    """The row ratios ``R_i = (1/N) sum_{j != i} |K_ij| / K_ii`` [N] (§5.1), with N the size of K.

    The average off-diagonal magnitude of row i relative to its diagonal entry: how much an update on
    sample i generalises to the other samples of the batch. Fig. 1 reports their mean over i.
    """
    n = _check_square(kernel)
    diagonal = th.diagonal(kernel)
    off_diagonal = kernel.abs().sum(dim=1) - diagonal.abs()
    return off_diagonal / (n * diagonal)


def cosine_alignment(q_before: th.Tensor, q_after: th.Tensor, targets: th.Tensor) -> th.Tensor:
    """``cos(Q' - Q, y - Q)`` (§5.2, Fig. 3; PreQN's acceptance criterion, Eq. 24): how well an update's change
    of the Q-values on a batch points towards the targets ``y``. 1 is a tabular-like update (Eq. 12).

    All arguments are [n]; returns a scalar tensor. If either difference is zero, the result is 0.
    """
    if q_before.ndim != 1:
        raise ValueError(f"q_before must be a vector [n], got shape {tuple(q_before.shape)}")
    for name, x in (("q_after", q_after), ("targets", targets)):
        _check_vector(x, q_before.shape[0], name)
    change, wanted = q_after - q_before, targets - q_before
    denominator = change.norm() * wanted.norm()
    return (change @ wanted) / denominator.clamp_min(th.finfo(denominator.dtype).tiny)


# --------------------------------------------------------------------------------------------------------------
# PreQN's preconditioned update (§4, Eqs. 22-24; Alg. 1 lines 11-13)
# --------------------------------------------------------------------------------------------------------------


#: Solvers of ``K Z = Delta`` accepted by :func:`ntk_lstsq` and PreQN's ``lstsq_method``.
LSTSQ_METHODS = ("eigh", "cholesky")
#: Power iterations that estimate K's largest eigenvalue for the ``"cholesky"`` solver's ridge.
POWER_ITERATIONS = 10


def largest_eigenvalue(kernel: th.Tensor, iterations: int = POWER_ITERATIONS) -> th.Tensor:
    """Estimate of the largest eigenvalue of a symmetric PSD ``kernel`` by power iteration from the all-ones
    vector (a lower bound: the Rayleigh quotient of the last iterate); a 0-d tensor, no host synchronisation."""
    vector = th.ones(kernel.shape[0], dtype=kernel.dtype, device=kernel.device)
    for _ in range(iterations):
        vector = kernel @ vector
        vector = vector / vector.norm().clamp_min(th.finfo(kernel.dtype).tiny)
    return vector @ (kernel @ vector)


def ntk_lstsq(kernel: th.Tensor, delta: th.Tensor, rtol: float | None = None, method: str = "eigh") -> th.Tensor:
    """Solve ``K Z = Delta`` for PreQN's step (Eq. 22, Alg. 1 line 11); K symmetric positive semi-definite.

    ``method="eigh"`` (default, the paper's least squares): the minimum-norm least-squares solution
    ``Z = K^+ Delta``. K may be rank deficient (e.g. more samples than parameters, §4, or duplicated samples):
    we use its eigendecomposition ``K = U diag(lambda) U^T`` (``torch.linalg.eigh``, same result on CPU and
    CUDA; ``torch.linalg.lstsq`` on CUDA only has the full-rank ``gels`` driver) and invert only the eigenvalues
    above the cutoff ``rtol * lambda_max``; the others, including small negative ones produced by round-off,
    count as zero. This is ``torch.linalg.pinv(K, hermitian=True, rtol=rtol)`` applied to ``Delta``.

    ``method="cholesky"`` (faster: ~6x cheaper than ``eigh`` on the 256 x 256 kernels of a HalfCheetah batch on CPU):
    the ridge-regularised solution ``Z = (K + r I)^-1 Delta`` by a Cholesky factorisation, with the ridge ``r``
    relative to K's largest eigenvalue (estimated by :func:`largest_eigenvalue`), like ``eigh``'s cutoff.
    Eigenvalues well above ``r`` are solved as by ``eigh``; those near or below it are damped instead of dropped
    (``K Z``, the change of Q, is shrunk there, never amplified). With ``rtol=None`` it tries
    ``r = eps * lambda_max`` and, if round-off makes that factorisation fail (K's numerically-zero eigenvalues
    are about ``n eps lambda_max`` in size and of either sign), ``r = n eps * lambda_max``, ``eigh``'s own
    cutoff; a given ``rtol`` tries ``r = rtol * lambda_max`` only. If no factorisation succeeds it returns the
    ``"eigh"`` solution with the default cutoff.

    :param kernel: K [n, n]
    :param delta: TD errors [n]
    :param rtol: relative threshold (see above); ``None`` derives it from ``n`` and the ``eps`` of K's dtype
        (1.2e-7 for float32). ``n * eps`` is the default cutoff of ``torch.linalg.pinv`` and of LAPACK-style
        ``lstsq``: eigenvalues below it are at the level of K's round-off, and inverting them would only
        amplify noise.
    :param method: ``"eigh"`` or ``"cholesky"``
    :return: Z [n]
    """
    n = _check_square(kernel)
    _check_vector(delta, n, "delta")
    check_choice("method", method, LSTSQ_METHODS)
    eps = th.finfo(kernel.dtype).eps
    if method == "cholesky":
        scale = largest_eigenvalue(kernel)
        for relative_ridge in (eps, n * eps) if rtol is None else (rtol,):
            damped = kernel.clone()
            damped.diagonal().add_(relative_ridge * scale)
            factor, info = th.linalg.cholesky_ex(damped)
            if int(info) == 0:
                return th.cholesky_solve(delta.unsqueeze(1).to(kernel.dtype), factor).squeeze(1)
        rtol = None
    if rtol is None:
        rtol = n * eps
    eigenvalues, eigenvectors = th.linalg.eigh(kernel)
    cutoff = rtol * eigenvalues.abs().max()
    inverse = th.where(eigenvalues > cutoff, 1.0 / eigenvalues, th.zeros_like(eigenvalues))
    return eigenvectors @ (inverse * (eigenvectors.T @ delta))


def preconditioned_direction(
    ntk: KernelAndOutput,
    params: Sequence[th.Tensor],
    delta: th.Tensor,
    rtol: float | None = None,
    method: str = "eigh",
) -> tuple[list[th.Tensor], th.Tensor]:
    """PreQN's proposed update direction ``sum_i Z_i grad_theta Q(s_i, a_i) = Phi K^+ Delta`` (Eqs. 22-23, 28).

    ``Z = K^+ Delta`` (:func:`ntk_lstsq`); the weighted sum of gradients is never formed sample by sample: for
    a kernel from :func:`mlp_ntk` it is :func:`mlp_weighted_gradient` (one matrix product per layer, reusing the
    kernel's backward pass), otherwise one backward pass of ``sum_i Z_i Q_i``. To first order the step
    changes the Q-values of the batch by ``Phi^T Phi Z = K K^+ Delta``, i.e. by ``Delta`` when K has full rank.

    :param ntk: the NTK of Q on the batch and ``Q`` [n] with its autograd graph (:func:`mlp_ntk`,
        :meth:`QFunction.ntk_and_q`)
    :param params: the parameters theta of Q
    :param delta: TD errors [n]
    :param rtol: eigenvalue cutoff (or ridge) of :func:`ntk_lstsq`
    :param method: solver of :func:`ntk_lstsq`, ``"eigh"`` or ``"cholesky"``
    :return: the direction (one tensor per parameter, zeros for parameters Q does not depend on) and Z [n]
    """
    n = _check_square(ntk.kernel)
    _check_vector(ntk.output, n, "ntk.output")
    z = ntk_lstsq(ntk.kernel, delta, rtol, method)
    if ntk.layers is not None and ntk.layer_inputs is not None and ntk.backward_signals is not None:
        layer_params = [p for layer in ntk.layers for p in layer.parameters()]
        by_id = dict(
            zip(map(id, layer_params), mlp_weighted_gradient(ntk.layers, ntk.layer_inputs, ntk.backward_signals, z))
        )
        if all(id(p) in by_id for p in params):
            return [by_id[id(p)] for p in params], z
    direction = th.autograd.grad(ntk.output, list(params), grad_outputs=z.to(ntk.output.dtype), allow_unused=True)
    return [th.zeros_like(p) if d is None else d for p, d in zip(params, direction)], z


class LineSearchResult(NamedTuple):
    """Outcome of :func:`backtracking_linesearch`."""

    accepted: bool
    step_size: float  # the accepted alpha_q * factor^k (0.0 when rejected)
    backtracks: int  # k: how many times the step was shrunk (max_backtracks when rejected)
    alignment: float  # cos(Q' - Q, Delta) of the accepted step (of the last one tried when rejected)
    q_after: th.Tensor | None  # Q_theta'(B) of the accepted step, None when rejected


def backtracking_linesearch(
    evaluate: Callable[[float], th.Tensor],
    q_before: th.Tensor,
    delta: th.Tensor,
    step_size: float,
    eta: float,
    factor: float = 0.5,
    max_backtracks: int = 10,
) -> LineSearchResult:
    """PreQN's line search (§4 Eq. 24, Alg. 1 line 13): shrink the step exponentially until it is aligned.

    Tries ``alpha = step_size * factor^k`` for ``k = 0, 1, ..., max_backtracks`` and accepts the first with
    ``cos(Q_theta'(B) - Q_theta(B), Delta) >= eta``. If none passes, the step is rejected.

    :param evaluate: ``evaluate(alpha) -> Q_{theta + alpha d}(B)`` [n], for the proposed direction d
    :param q_before: ``Q_theta(B)`` [n]
    :param delta: TD errors ``T*Q_theta(B) - Q_theta(B)`` [n]
    :param step_size: alpha_q, the first (largest) step
    :param eta: alignment threshold in (0, 1]
    :param factor: shrink factor in (0, 1)
    :param max_backtracks: cap on the number of shrinkings (>= 0)
    """
    targets = q_before + delta
    alignment = float("nan")
    for k in range(max_backtracks + 1):
        alpha = step_size * factor**k
        q_after = evaluate(alpha)
        alignment = float(cosine_alignment(q_before, q_after, targets))
        if alignment >= eta:
            return LineSearchResult(True, alpha, k, alignment, q_after)
    return LineSearchResult(False, 0.0, max_backtracks, alignment, None)


# --------------------------------------------------------------------------------------------------------------
# SB3 critics and Q-networks
# --------------------------------------------------------------------------------------------------------------


class _QHead(nn.Module):
    """``(obs, actions, cotangents) -> Q [n]`` for one Q-network of an SB3 critic / DQN network / plain net."""

    def __init__(self, net: nn.Module, kind: str, index: int) -> None:
        super().__init__()
        self.net = net
        self.kind = kind
        self.index = index

    def head(self) -> nn.Module:
        if self.kind == "critic":
            return self.net.q_networks[self.index]  # type: ignore[index,return-value]
        if self.kind == "q_network":
            return self.net.q_net  # type: ignore[return-value]
        return self.net

    def head_input(self, obs: Obs, actions: th.Tensor | None) -> th.Tensor:
        if self.kind == "plain":
            assert isinstance(obs, th.Tensor)
            return obs if actions is None else th.cat([obs, actions], dim=1)
        features = self.net.extract_features(obs, self.net.features_extractor)  # type: ignore[operator]
        if self.kind == "critic":
            assert actions is not None
            return th.cat([features, actions], dim=1)
        return features

    def forward(self, obs: Obs, actions: th.Tensor | None, cotangents: th.Tensor | None) -> th.Tensor:
        out = self.head()(self.head_input(obs, actions))
        return out[:, 0] if cotangents is None else (out * cotangents).sum(dim=1)


class QFunction:
    """Q(s, a) of an SB3 critic or Q-network as a function of its own trainable parameters.

    Supported networks (the ``net`` argument of :func:`q_function`):

    * a ``ContinuousCritic`` (TD3, DDPG, SAC, PreQN; anything with ``q_networks`` and ``extract_features``):
      ``Q(s, a) = q_networks[critic_index](cat(features(s), a))``. Its parameters are those of that Q-network,
      plus the features extractor's unless ``share_features_extractor`` (then the actor trains it, not the
      critic);
    * DQN's ``QNetwork`` (anything with ``q_net`` and ``extract_features``): ``Q(s, a) = q_net(features(s))[a]``
      with integer actions; the parameters are all of the network's;
    * any other ``nn.Module`` mapping ``x`` [n, d] to [n, 1]: ``Q = net(cat(obs, actions))``, or ``net(obs)``
      when ``actions`` is ``None``.

    The layerwise kernel (:func:`mlp_ntk`) is used when the Q-network is a plain MLP and the features
    extractor has no trainable parameters (SB3's ``FlattenExtractor``, ``CombinedExtractor`` on vector
    observations); otherwise :func:`jacobian_ntk`. The network is used in its current train/eval mode.
    """

    def __init__(self, net: nn.Module, critic_index: int = 0) -> None:
        if hasattr(net, "q_networks") and hasattr(net, "extract_features"):
            kind = "critic"
            n_critics = len(net.q_networks)  # type: ignore[arg-type]
            if not 0 <= critic_index < n_critics:
                raise ValueError(f"Invalid critic_index={critic_index}: the critic has {n_critics} Q-networks")
        elif hasattr(net, "q_net") and hasattr(net, "extract_features"):
            kind = "q_network"
        else:
            kind = "plain"
        self.module = _QHead(net, kind, critic_index)
        self.kind = kind
        head = self.module.head()
        named = {f"net.{name}": p for name, p in net.named_parameters() if p.requires_grad}
        if kind == "critic":
            prefix = next(name for name, module in net.named_children() if module is head)
            keep = [f"net.{prefix}."]
            if not getattr(net, "share_features_extractor", False):
                keep.append("net.features_extractor.")
            named = {name: p for name, p in named.items() if name.startswith(tuple(keep))}
        if not named:
            raise ValueError(f"{type(net).__name__} has no trainable parameters")
        #: the trainable parameters theta of Q, named for ``torch.func.functional_call`` on :attr:`module`
        self.params: dict[str, th.Tensor] = dict(named)
        head_params = {id(p) for p in head.parameters()}
        self.layerwise = plain_mlp_layers(head) is not None and all(id(p) in head_params for p in named.values())
        self.n_actions: int | None = None
        if kind == "q_network":
            action_space: Any = getattr(net, "action_space", None)
            if not hasattr(action_space, "n"):
                raise ValueError(f"{type(net).__name__} has no discrete action_space: cannot select Q(s, a)")
            self.n_actions = int(action_space.n)

    def cotangents(self, actions: th.Tensor | None, dtype: th.dtype) -> th.Tensor | None:
        """One-hot actions [n, n_actions] for a DQN network (Q(s, a) = q_net(s) . onehot(a)), else ``None``."""
        if self.kind != "q_network":
            return None
        if actions is None:
            raise ValueError("a DQN network needs the actions to give Q(s, a)")
        assert self.n_actions is not None
        return nn.functional.one_hot(actions.long().reshape(-1), self.n_actions).to(dtype)

    def _dtype(self) -> th.dtype:
        return next(iter(self.params.values())).dtype

    def __call__(
        self, obs: Obs, actions: th.Tensor | None = None, params: dict[str, th.Tensor] | None = None
    ) -> th.Tensor:
        """Q(s_i, a_i) [n] with the network's parameters, or with ``params`` (``functional_call``) if given."""
        cotangents = self.cotangents(actions, self._dtype())
        if params is None:
            return self.module(obs, actions, cotangents)
        return functional_call(self.module, params, (obs, actions, cotangents))

    def ntk_and_q(self, obs: Obs, actions: th.Tensor | None = None, method: str = "auto") -> KernelAndOutput:
        """The NTK [n, n] of Q on the batch and Q [n] (with its autograd graph)."""
        if method not in NTK_METHODS:
            raise ValueError(f"Invalid method={method!r}: expected one of {NTK_METHODS}")
        if method == "layerwise" and not self.layerwise:
            raise ValueError("the layerwise kernel needs a plain-MLP Q-network without trainable features")
        cotangents = self.cotangents(actions, self._dtype())
        if self.layerwise and method != "jacobian":
            with th.no_grad():
                x = self.module.head_input(obs, actions)
            return mlp_ntk(self.module.head(), x, cotangents)  # type: ignore[arg-type]
        kernel = jacobian_ntk(self._q_single, dict(self.params), obs, actions, cotangents)
        return KernelAndOutput(kernel, self.module(obs, actions, cotangents))

    def ntk(self, obs: Obs, actions: th.Tensor | None = None, method: str = "auto") -> th.Tensor:
        """The NTK [n, n] of Q on the batch (Eq. 9)."""
        return self.ntk_and_q(obs, actions, method).kernel.detach()

    def _q_single(self, params: dict[str, th.Tensor], obs: Obs, actions: Any, cotangents: Any) -> th.Tensor:
        def batch(x: Any) -> Any:
            if x is None:
                return None
            if isinstance(x, dict):
                return {key: value.unsqueeze(0) for key, value in x.items()}
            return x.unsqueeze(0)

        return functional_call(self.module, params, (batch(obs), batch(actions), batch(cotangents)))[0]


def q_function(model: BaseAlgorithm | nn.Module, critic_index: int = 0) -> QFunction:
    """:class:`QFunction` of an SB3 algorithm (its ``critic``, or DQN's ``q_net``), critic or Q-network."""
    net: Any = model
    if isinstance(model, BaseAlgorithm):
        net = getattr(model, "critic", None)
        if net is None:
            net = getattr(model, "q_net", None)
        if not isinstance(net, nn.Module):
            raise ValueError(f"{type(model).__name__} has neither a critic nor a q_net")
    return QFunction(net, critic_index)


def batch_ntk(
    model: BaseAlgorithm | nn.Module,
    obs: Obs,
    actions: th.Tensor | None = None,
    critic_index: int = 0,
    method: str = "auto",
) -> th.Tensor:
    """The NTK [n, n] of an SB3 model's Q-function on a batch of (s, a) pairs (Eq. 9, §5.1).

    :param model: an SB3 algorithm (TD3, DDPG, SAC, DQN, PreQN...), critic, Q-network or plain network,
        see :class:`QFunction`
    :param obs: observations [n, ...] (as the network expects them, e.g. from the replay buffer)
    :param actions: actions [n, action_dim] (continuous) or [n] / [n, 1] integers (DQN)
    :param critic_index: which Q-network of a multi-critic (TD3, SAC: 0 or 1)
    :param method: ``"auto"`` (layerwise when possible), ``"layerwise"`` or ``"jacobian"``
    """
    return q_function(model, critic_index).ntk(obs, actions, method)
