"""Fused PEAR loss kernels (installed as ``pear_mega.kernels``).

``fused_pear_loss`` (SFT) and ``fused_pear_kd_loss`` (distillation to stored teacher top-K) are the
public entry points, ``pear_log_weights`` the PEAR weight scan they share; the Triton modules are
imported lazily on first use so that importing this package stays cheap and ``TRITON_INTERPRET`` can
still be set before Triton loads.
"""

from pear_mega.kd import KDConfig, KDLossOutput
from pear_mega.pear import PearLossOutput

from .kd_loss import fused_pear_kd_loss
from .pear_loss import fused_pear_loss, loss_coefficients, pear_log_weights

__all__ = [
    "fused_pear_loss", "PearLossOutput", "fused_pear_kd_loss", "KDConfig", "KDLossOutput", "pear_log_weights",
    "loss_coefficients",
]  # fmt: skip
