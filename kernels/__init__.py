"""Fused PEAR loss kernels (installed as ``pear_mega.kernels``)."""
