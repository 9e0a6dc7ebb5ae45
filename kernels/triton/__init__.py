"""The Triton path of every op but `linear_divergence_loss`, one module per op, mirroring `kernels.torch_ops`.

Imported on first use by `kernels` (not at `import kernels`): `triton.jit` reads TRITON_INTERPRET when a kernel
is defined, and the import needs a triton wheel.
"""
