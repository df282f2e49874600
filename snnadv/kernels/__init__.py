"""Fused multi-step neuron scans (see :mod:`snnadv.kernels.scan`)."""
