"""Triton kernels of msff, installed as ``msff.kernels``."""
