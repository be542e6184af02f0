"""SSAQ: Single-Scaler Asymmetric Q-learning (HANQ paper §3.1, Alg. 1), a configuration of HANQ."""

from __future__ import annotations

from typing import Any

from sb3_hanq.hanq.hanq import HANQ

# Alg. 1: one learned scalar omega_scale (initialised to 1) multiplying Q_theta(s, a); no bias, no exp,
# no normalisation. kappa = 0 (SSAQ); kappa > 0 is the paper's HSSAQ (§6).
SSAQ_POLICY_DEFAULTS: dict[str, Any] = dict(
    predictor="scalar", positive_scale=False, predictor_bias=False, main_norm="none", meta_norm="none"
)


class SSAQ(HANQ):
    """SSAQ (HANQ paper Alg. 1): DQN without a target network whose Q(s, a) term is scaled by one learned
    scalar omega (init 1): loss ``mean_B (omega Q_theta(s,a) - sg[r + gamma (1-d) max_a' Q_theta(s',a')])^2``.

    Same arguments as :class:`~sb3_hanq.HANQ`, with SSAQ's defaults: ``hyper_lr=0`` (pass ``hyper_lr > 0``
    for HSSAQ) and the policy defaults ``SSAQ_POLICY_DEFAULTS`` (any of which ``policy_kwargs`` overrides).
    """

    def __init__(self, policy: Any, env: Any, **kwargs: Any) -> None:
        kwargs.setdefault("hyper_lr", 0.0)
        super().__init__(policy, env, **kwargs)

    @classmethod
    def _complete_policy_kwargs(cls, policy_kwargs: dict[str, Any], hyperparams: dict[str, Any]) -> dict[str, Any]:
        """HANQ's completion of ``policy_kwargs`` after filling in ``SSAQ_POLICY_DEFAULTS``."""
        return super()._complete_policy_kwargs({**SSAQ_POLICY_DEFAULTS, **policy_kwargs}, hyperparams)
