"""Sparse compute for pruned kernels: a C++ kernel registered with XLA:CPU through ``jax.ffi``.

A pruned kernel ``W`` (in, out) with a boolean mask keeping ``K`` weights is stored as its *compact*
values, a (K,) float32 array in column-major (CSC: by output unit, then input unit) order, plus a
:class:`Layout` of ordinary int32 arrays built from the mask by the pure function :func:`layout`.
``K`` is fixed per layer (the array shapes), so a mask that changes at run time with its density kept
(dynamic sparsity) only rebuilds the layout's *values*: nothing is compiled in.

:func:`matmul` ``(values, layout, x) = x @ W`` computes with the kept weights only, forward and
backward (``jax.custom_vjp``): the input gradient ``g @ W.T`` and the kernel gradient *at the kept
positions* (a (K,) array; pruned positions are never computed). Leading batch axes of ``x`` are
flattened; ``vmap`` (e.g. over seeds) passes a leading group axis to the kernel
(``vmap_method='expand_dims'``), which loops over it. The kernel (``csrc/sparse_matmul.cc``) is built
by the package's own build (``pip install`` / ``make install``; see setup.py); where it is missing it is
compiled on first use into ``~/.cache/sparserl`` (``SPARSERL_CACHE``), and where that fails too
:func:`available` is False and callers fall back to masked-dense compute with one warning line.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sparserl import backend

SOURCE = Path(__file__).parent / "csrc" / "sparse_matmul.cc"
LIBRARY_STEM = "_sparse_matmul"
_TARGETS = {"sparserl_spmm_forward": "SparserlSparseMatmulForward",
            "sparserl_spmm_backward": "SparserlSparseMatmulBackward",
            "sparserl_spmm_input_grad": "SparserlSparseMatmulInputGrad",
            "sparserl_gather": "SparserlGather", "sparserl_scatter": "SparserlScatter"}


class Layout(NamedTuple):
    """Where a pruned (in, out) kernel keeps its ``K`` weights, twice: by output unit (CSC; the order
    of the compact values) for the forward product and the kernel gradient, by input unit (CSR) for
    the input gradient. ``perm[k]`` is the compact (CSC) position of the k-th CSR entry."""
    col_ptr: jax.Array  # (out+1,) int32
    rows: jax.Array     # (K,) int32, input unit of each compact value
    row_ptr: jax.Array  # (in+1,) int32
    cols: jax.Array     # (K,) int32, output unit of each CSR entry
    perm: jax.Array     # (K,) int32
    flat: jax.Array     # (K,) int32, ``in_unit * out + out_unit`` of each compact value (dense <-> compact)


def layout(mask: jax.Array, nnz: int | None = None) -> Layout:
    """The layout of a boolean (in, out) mask keeping ``nnz`` weights (pure, jittable; ``nnz`` must be
    given under ``jit``, where the count cannot be read). CSC order sorts by (out, in), CSR by (in, out)."""
    n_in, n_out = mask.shape
    nnz = int(np.asarray(mask).sum()) if nnz is None else nnz
    csc = jnp.nonzero(mask.T.reshape(-1), size=nnz)[0].astype(jnp.int32)   # j * in + i, ascending
    csr = jnp.nonzero(mask.reshape(-1), size=nnz)[0].astype(jnp.int32)     # i * out + j, ascending
    col_counts = mask.sum(0, dtype=jnp.int32)
    row_counts = mask.sum(1, dtype=jnp.int32)
    zero = jnp.zeros((1,), jnp.int32)
    csc_rank = (jnp.cumsum(mask.T.reshape(-1), dtype=jnp.int32) - 1).reshape(n_out, n_in)
    rows_csr, cols_csr = csr // n_out, csr % n_out
    return Layout(col_ptr=jnp.concatenate([zero, jnp.cumsum(col_counts)]), rows=csc % n_in,
                  row_ptr=jnp.concatenate([zero, jnp.cumsum(row_counts)]), cols=cols_csr,
                  perm=csc_rank[cols_csr, rows_csr], flat=(csc % n_in) * n_out + csc // n_in)


def compact(kernel: jax.Array, lay: Layout) -> jax.Array:
    """The kept values of a dense (in, out) kernel, in layout order (its gradient: the dense kernel's,
    zero at pruned entries). With the kernel library loaded, both directions run in it (XLA:CPU's own
    gather and scatter are serial element loops, costlier here than the sparse products)."""
    if _load() is None:
        return _compact_ffi(kernel, lay)
    return kernel.reshape(-1)[lay.flat]


def expand(values: jax.Array, lay: Layout) -> jax.Array:
    """The dense (in, out) kernel of compact values: pruned entries exactly 0."""
    shape = (lay.row_ptr.shape[-1] - 1, lay.col_ptr.shape[-1] - 1)
    if _load() is None:
        return _scatter_call(values, lay, shape)
    return jnp.zeros(shape[0] * shape[1], values.dtype).at[lay.flat].set(values).reshape(shape)


def _scatter_call(values, lay: Layout, shape):
    out = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.ffi.ffi_call("sparserl_scatter", out, vmap_method="expand_dims")(values, lay.row_ptr, lay.cols, lay.perm)


@jax.custom_vjp
def _compact_ffi(kernel, lay: Layout):
    out = jax.ShapeDtypeStruct(lay.flat.shape, jnp.float32)
    return jax.ffi.ffi_call("sparserl_gather", out, vmap_method="expand_dims")(kernel, lay.row_ptr, lay.cols, lay.perm)


def _compact_ffi_fwd(kernel, lay):
    return _compact_ffi(kernel, lay), lay


def _compact_ffi_bwd(lay, g):
    shape = (lay.row_ptr.shape[-1] - 1, lay.col_ptr.shape[-1] - 1)
    return _scatter_call(g, lay, shape), _no_grad(lay)


_compact_ffi.defvjp(_compact_ffi_fwd, _compact_ffi_bwd)


def _no_grad(lay: Layout) -> Layout:
    return jax.tree_util.tree_map(lambda a: np.zeros(a.shape, jax.dtypes.float0), lay)


# ----------------------------------------------------------------------------------------------
# Building and loading the library


def _cache_dir() -> Path:
    return Path(os.environ.get("SPARSERL_CACHE", Path.home() / ".cache" / "sparserl"))


def compile_command(output: str | Path) -> list[str]:
    """The compiler call that builds the kernel (setup.py and the first-use build share it).
    ``-march=native``: the library is built on the machine that runs it (install or first use)."""
    import jax.ffi  # noqa: F401  (include_dir)

    return [os.environ.get("CXX", "g++"), "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC",
            f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(output)]


def _built_library() -> Path | None:
    """The library the package's build put beside this file, unless the source is newer (an editable
    install whose kernel source changed since: the first-use build then compiles the current one)."""
    found = sorted(glob.glob(str(Path(__file__).parent / f"{LIBRARY_STEM}*.so")))
    if not found or Path(found[0]).stat().st_mtime < SOURCE.stat().st_mtime:
        return None
    return Path(found[0])


def _cached_library() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes() + jax.__version__.encode()).hexdigest()[:16]
    return _cache_dir() / f"{LIBRARY_STEM}-{digest}.so"


def build_into_cache() -> Path:
    """Compile the kernel into the cache directory (once per source and JAX version); OSError on failure."""
    target = _cached_library()
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        result = subprocess.run(compile_command(tmp), capture_output=True, text=True)
        if result.returncode != 0:
            tmp.unlink(missing_ok=True)
            first = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise OSError(f"compiling {SOURCE.name} failed: {first}")
        os.replace(tmp, target)
    return target


@functools.lru_cache(maxsize=None)
def _load() -> str | None:
    """Register the kernel's FFI targets; None when loaded, else the one-line reason it is not."""
    try:
        path = _built_library() or build_into_cache()
        lib = ctypes.cdll.LoadLibrary(str(path))
        for target, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except (OSError, AttributeError, FileNotFoundError) as e:
        return f"{type(e).__name__}: {e}".splitlines()[0]
    return None


def unavailable_reason() -> str | None:
    """Why the sparse kernel cannot run here (None when it can): not a CPU backend, or no library."""
    if jax.default_backend() != "cpu":
        return f"no sparse kernel for the {jax.default_backend()} backend"
    if not backend.current().sparse_kernel:
        return f"backend {backend.current().name} runs no custom kernels"
    return _load()


def available() -> bool:
    return unavailable_reason() is None


@functools.lru_cache(maxsize=None)
def warn_fallback(reason: str) -> None:
    """One warning line per reason (not per layer)."""
    warnings.warn(f"sparserl: sparsity.compute falls back to masked: {reason}", RuntimeWarning, stacklevel=3)
    print(f"sparserl: warning: sparse compute unavailable ({reason}); computing masked-dense", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# The product and its gradients


def _forward_call(values, lay: Layout, x2):
    out = jax.ShapeDtypeStruct((x2.shape[0], lay.col_ptr.shape[-1] - 1), jnp.float32)
    return jax.ffi.ffi_call("sparserl_spmm_forward", out, vmap_method="expand_dims")(
        values, lay.col_ptr, lay.rows, x2)


def _backward_call(values, lay: Layout, x2, g2):
    outs = (jax.ShapeDtypeStruct(x2.shape, jnp.float32), jax.ShapeDtypeStruct(values.shape, jnp.float32))
    return jax.ffi.ffi_call("sparserl_spmm_backward", outs, vmap_method="expand_dims")(
        values, lay.col_ptr, lay.rows, lay.row_ptr, lay.cols, lay.perm, x2, g2)


@jax.custom_vjp
def _matmul2d(values, lay: Layout, x2):
    return _forward_call(values, lay, x2)


def _matmul2d_fwd(values, lay, x2):
    return _forward_call(values, lay, x2), (values, lay, x2)


def _matmul2d_bwd(residuals, g):
    values, lay, x2 = residuals
    dx, dvalues = _backward_call(values, lay, x2, g)
    return dvalues, _no_grad(lay), dx


_matmul2d.defvjp(_matmul2d_fwd, _matmul2d_bwd)


def _input_grad_call(values, lay: Layout, g2):
    out = jax.ShapeDtypeStruct((g2.shape[0], lay.row_ptr.shape[-1] - 1), jnp.float32)
    return jax.ffi.ffi_call("sparserl_spmm_input_grad", out, vmap_method="expand_dims")(
        values, lay.col_ptr, lay.rows, lay.row_ptr, lay.cols, lay.perm, g2)


@jax.custom_vjp
def _matmul2d_fixed(values, lay: Layout, x2):
    return _forward_call(values, lay, x2)


def _matmul2d_fixed_fwd(values, lay, x2):
    return _forward_call(values, lay, x2), (values, lay)


def _matmul2d_fixed_bwd(residuals, g):
    values, lay = residuals
    return jnp.zeros_like(values), _no_grad(lay), _input_grad_call(values, lay, g)


_matmul2d_fixed.defvjp(_matmul2d_fixed_fwd, _matmul2d_fixed_bwd)


def matmul(values: jax.Array, lay: Layout, x: jax.Array, weight_grad: bool = True) -> jax.Array:
    """``x @ W`` for the pruned kernel ``W`` of ``values`` (compact, float32) and ``lay``; ``x`` (..., in).
    ``weight_grad=False``: the kernel is held fixed (its gradient is zero, never computed; the input
    gradient is), e.g. the critic inside the actor's loss."""
    reason = _load()
    if reason is not None:
        raise RuntimeError(f"sparserl sparse kernel unavailable: {reason}")
    lead, n_in = x.shape[:-1], x.shape[-1]
    product = _matmul2d if weight_grad else _matmul2d_fixed
    y = product(values, lay, x.reshape(-1, n_in).astype(jnp.float32))
    return y.reshape(*lead, y.shape[-1])
