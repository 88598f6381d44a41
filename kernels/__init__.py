"""Fused PEAR loss kernels (installed as ``pear_mega.kernels``).

``fused_pear_loss`` is the public entry point; the Triton module is imported lazily on first use
so that importing this package stays cheap and ``TRITON_INTERPRET`` can still be set before Triton
loads.
"""

from pear_mega.pear import PearLossOutput

from .pear_loss import fused_pear_loss

__all__ = ["fused_pear_loss", "PearLossOutput"]
