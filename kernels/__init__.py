"""Triton kernels, one op per module. No model knowledge lives here."""
