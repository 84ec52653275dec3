"""Compiled kernels for what XLA's ops do slowly on a backend (XLA FFI custom calls).

Each kernel is a C++ source in this package, compiled on first use with the machine's C++ compiler
into the cache directory (`build.py`) and registered with JAX; where it cannot be built, the caller
falls back to its XLA implementation (see `models.attention.resolve`).
"""
