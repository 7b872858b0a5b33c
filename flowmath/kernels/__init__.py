"""Private numba kernels for CPU hot loops.

Each kernel module holds the compiled kernel, the autograd primitive that exposes it with a VJP
written in ``autograd.numpy`` (so second derivatives work), and a plain-array reference twin
that tests compare against and that the CuPy path uses. Nothing here is public API.
"""
