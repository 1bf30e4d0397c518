"""Static sparsity: one-shot random masks for any parameter pytree, and keeping pruned weights at 0.

The single mask implementation used by every agent (PAPER.md §2):

* :func:`allocate` decides each tensor's keep-density — ``erk`` (Erdős–Rényi-Kernel: density
  proportional to ``sum(shape)/prod(shape)``, scaled so the kept total is ``(1-S)`` of the budget)
  or ``uniform`` (every prunable tensor at ``S``).
* :func:`make_mask` draws the mask once (``exact`` count or i.i.d. ``bernoulli``).
* :func:`keep_masked` is an optax transformation that zeroes the update of pruned weights; chained
  after AdamW, decoupled weight decay cannot move them either (:func:`sparse_adamw`).

What is prunable: tensors with two or more dimensions (dense and conv kernels) not named in
``always_dense``. 1-D tensors (biases, LayerNorm scale/bias) are never pruned, whatever ``S`` — the
paper's code pruned LayerNorm at S >= ~0.98, a defect we do not copy. Mask leaves of unprunable
tensors are the scalar ``True`` (broadcasts, costs no memory).
"""

from __future__ import annotations

import contextlib
import functools
import math
import zlib
from typing import Any, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparserl import sparse_kernel

PyTree = Any
_MASK_STREAM = 0x5A_5E  # separates the mask RNG stream from the init stream of the same seed


def leaf_name(path) -> str:
    parts = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                parts.append(str(getattr(p, attr)))
                break
    return "/".join(parts)


def named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(leaf_name(path), leaf) for path, leaf in leaves]


def is_prunable(name: str, shape: tuple[int, ...], always_dense: Iterable[str] = ()) -> bool:
    return len(shape) >= 2 and not any(name == d or name.startswith(d + "/") for d in always_dense)


def allocate(shapes: dict[str, tuple[int, ...]], sparsity: float, method: str = "erk",
             budget: str = "all", always_dense: Iterable[str] = ()) -> dict[str, float]:
    """Keep-density (fraction of weights kept) per tensor name.

    ``budget='all'`` counts every parameter (biases, LayerNorm) toward the total, as the paper's
    code does; ``budget='kernels'`` counts only tensors with >= 2 dims (always-dense kernels
    included), so exactly ``(1-S)`` of all kernel weights are kept.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity}: must be in [0, 1)")
    always_dense = tuple(always_dense)
    prunable = {n for n, s in shapes.items() if is_prunable(n, s, always_dense)}
    density = {n: 1.0 for n in shapes}
    if sparsity == 0.0 or not prunable:
        return density
    if method == "uniform":
        return {n: (1.0 - sparsity if n in prunable else 1.0) for n in shapes}
    if method != "erk":
        raise ValueError(f"sparsity.method={method!r}: must be erk or uniform")
    if budget not in ("all", "kernels"):
        raise ValueError(f"sparsity.budget={budget!r}: must be all or kernels")

    counted = {n: s for n, s in shapes.items() if budget == "all" or len(s) >= 2}
    size = {n: math.prod(s) for n, s in shapes.items()}
    score = {n: sum(shapes[n]) / size[n] for n in prunable}
    keep_total = (1.0 - sparsity) * sum(size[n] for n in counted)
    dense = set(counted) - prunable  # fixed dense tensors spend budget first
    while True:
        free = [n for n in prunable if n not in dense]
        if not free:
            break
        remaining = keep_total - sum(size[n] for n in dense)
        eps = remaining / sum(score[n] * size[n] for n in free)
        if eps <= 0:
            raise ValueError(f"sparsity={sparsity}: the always-dense parameters alone exceed the "
                             f"{1 - sparsity:.3g} keep budget; lower the sparsity or use sparsity.budget=kernels")
        top = max(score[n] for n in free)
        if eps * top <= 1.0:
            for n in free:
                density[n] = eps * score[n]
            break
        dense.update(n for n in free if score[n] == top)  # saturated: make dense and rescale
    return density


_kept_log: list[tuple[int, float]] | None = None  # (size, kept) of every draw, while counting_draws() is active


@contextlib.contextmanager
def counting_draws():
    """Record ``(size, kept)`` of every mask drawn inside the block, also under ``jax.eval_shape``,
    so model sizes can be counted from abstract shapes without drawing 100M-entry masks."""
    global _kept_log
    previous, _kept_log = _kept_log, []
    try:
        yield _kept_log
    finally:
        _kept_log = previous


def draw(key: jax.Array, shape: tuple[int, ...], density: float, method: str = "exact") -> jax.Array:
    """A boolean mask of ``shape`` keeping about ``density`` of the entries."""
    if density >= 1.0:
        return jnp.ones(shape, bool)
    n = math.prod(shape)
    if _kept_log is not None:
        _kept_log.append((n, density * n if method == "bernoulli" else float(round(density * n))))
    if method == "bernoulli":
        return jax.random.bernoulli(key, density, shape)
    if method != "exact":
        raise ValueError(f"sparsity.draw={method!r}: must be exact or bernoulli")
    keep = int(round(density * n))
    kept = jax.random.permutation(key, n)[:keep]
    return jnp.zeros((n,), bool).at[kept].set(True).reshape(shape)


def module_key(mask_seed: int, module: str) -> jax.Array:
    """The mask key of one module: separable from the init seed, distinct per module."""
    base = jax.random.fold_in(jax.random.PRNGKey(mask_seed), _MASK_STREAM)
    return jax.random.fold_in(base, zlib.crc32(module.encode()) & 0x7FFFFFFF)


def make_mask(key: jax.Array, params: PyTree, sparsity: float, method: str = "erk",
              budget: str = "all", draw_method: str = "exact", always_dense: Iterable[str] = ()) -> PyTree:
    """One mask per parameter pytree: boolean arrays for prunable tensors, scalar True elsewhere."""
    always_dense = tuple(always_dense)
    named = named_leaves(params)
    shapes = {n: tuple(x.shape) for n, x in named}
    density = allocate(shapes, sparsity, method, budget, always_dense)
    leaves = []
    for i, (name, x) in enumerate(named):
        if is_prunable(name, shapes[name], always_dense) and density[name] < 1.0:
            leaves.append(draw(jax.random.fold_in(key, i), shapes[name], density[name], draw_method))
        else:
            leaves.append(jnp.ones((), bool))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), leaves)


def apply_mask(tree: PyTree, mask: PyTree) -> PyTree:
    """Pruned entries set to 0. A leaf stored compact (:func:`is_compact`: kept values only) passes as is."""
    return jax.tree_util.tree_map(
        lambda x, m: x if is_compact(x, m) else jnp.where(m, x, jnp.zeros((), x.dtype)), tree, mask)


def is_compact(x, m) -> bool:
    """Whether parameter-shaped leaf ``x`` of a pruned kernel (mask leaf ``m``, >= 2-D) is stored compact:
    its kept values only, one axis fewer than its mask (see "Sparse compute" below). Static: shapes only."""
    return jnp.ndim(m) >= 2 and jnp.ndim(x) < jnp.ndim(m)


def keep_masked(mask: PyTree) -> optax.GradientTransformation:
    """Zero the updates of pruned weights. Chain it *after* the optimizer (incl. weight decay)."""

    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return apply_mask(updates, mask), state

    return optax.GradientTransformation(init, update)


def kernels_only(params: PyTree, mask: PyTree | None = None) -> PyTree:
    """Weight-decay mask: decay kernels, not biases or LayerNorm parameters (with ``mask``: kernels
    stored compact, 1-D, count as kernels)."""
    if mask is None:
        return jax.tree_util.tree_map(lambda x: x.ndim >= 2, params)
    return jax.tree_util.tree_map(lambda x, m: x.ndim >= 2 or is_compact(x, m), params, mask)


def sparse_adamw(lr: float, weight_decay: float, mask: PyTree, decay_on: str = "all") -> optax.GradientTransformation:
    """AdamW whose final update is masked, so pruned weights stay exactly zero.

    ``decay_on='all'`` decays every parameter (biases and LayerNorm scale/bias too), as the reference's
    ``optax.adamw`` without a mask does; ``'kernels'`` decays tensors with >= 2 dims only."""
    if decay_on not in ("all", "kernels"):
        raise ValueError(f"weight_decay_on={decay_on!r}: must be all or kernels")
    decay_mask = functools.partial(kernels_only, mask=mask) if decay_on == "kernels" else None
    return optax.chain(optax.adamw(lr, weight_decay=weight_decay, mask=decay_mask), keep_masked(mask))


# ----------------------------------------------------------------------------------------------
# Statistics


def stats(params: PyTree, mask: PyTree) -> dict[str, Any]:
    """Total / non-zero (kept) parameters and per-tensor sparsity; kernels are shaped (in, out)."""
    layers, total, kept = [], 0, 0
    for (name, x), (_, m) in zip(named_leaves(params), named_leaves(mask)):
        size = int(np.prod(x.shape))
        nonzero = size if np.ndim(m) == 0 else int(np.asarray(m).sum())
        total += size
        kept += nonzero
        layers.append({"name": name, "shape": list(map(int, x.shape)), "params": size,
                       "nonzero": nonzero, "sparsity": 1.0 - nonzero / size})
    return {"total_params": total, "nonzero_params": kept,
            "sparsity": 1.0 - kept / total if total else 0.0, "layers": layers}


# ----------------------------------------------------------------------------------------------
# Sparse compute (``sparsity.compute``): which pruned kernels multiply with the kept weights only
#
# A module carries the :class:`sparse_kernel.Layout` of each pruned 2-D kernel (:func:`layouts`, part of
# the agent state: stacked over seeds, checkpointed). A kernel that the mode computes sparsely is also
# *stored* compact in the training state: the parameter leaf is its (K,) kept values in layout order,
# and so are the optimizer's moments or traces and the target network's copy (:func:`to_storage`).
# AdamW, Polyak averaging, ObGD's traces and the norms then cost what the kept weights cost, not the
# dense in x out (at 10% kept they were the larger part of a sparse update), and the gradient of the
# sparse product is the compact array itself: no dense gradient is ever written. Everything else
# reads one format, masked-dense (pruned entries exactly 0): checkpoints, diagnostics, topology
# updates convert with :func:`to_dense` (exact: only kept values move), so a checkpoint resumes in
# any mode. :func:`bind` hands the networks a :class:`SparseKernel` for each compact leaf (and, for a
# masked-dense leaf in a sparse mode, the kept values gathered from it, differentiably).

COMPUTE_MODES = ("masked", "sparse", "auto")
# ``auto``'s model, from ``make bench`` (section sparse_compute) on the 2-core AVX2 CPU with compact
# storage: whole SAC updates at batch 256 were faster sparse at every measured point — critic width
# 512 / 1024 / 2048 at S = 0.8 (1.3-2.0x), 0.9 (1.9-2.7x) and 0.95 (2.4-4.1x) — and Stream AC's batch-1
# step at width 1024 / 2048, S = 0.9 (3.5-3.9x). So auto computes sparsely every kernel keeping at most
# 20% of its entries (S >= 0.8, the sparsest measured loss-free region's edge) that is large enough
# for the fixed cost of a call not to dominate (at least 2^16 entries: Stream AC's default 128 x 128
# stays masked, a 256 x 256 kernel goes sparse).
AUTO_MAX_DENSITY = 0.2
AUTO_MIN_SIZE = 1 << 16  # in*out below this: masked (a dense product of this size takes microseconds)


class SparseKernel(NamedTuple):
    """A pruned (in, out) kernel as its kept values (layout order) and their layout."""
    values: jax.Array
    layout: sparse_kernel.Layout


class FixedSparseKernel(SparseKernel):
    """A :class:`SparseKernel` that a loss holds fixed (``bind(..., fixed=True)``): its products
    compute the input gradient only (e.g. the critic inside the actor's loss)."""
    __slots__ = ()


def _kept(m) -> int:
    try:
        return int(np.asarray(m).sum())
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):  # jax.eval_shape, jit
        return int(np.prod(m.shape))  # an abstract mask (jax.eval_shape): the largest layout, an upper bound


def layouts(params: PyTree, mask: PyTree) -> PyTree:
    """A :class:`sparse_kernel.Layout` for each pruned 2-D kernel (mask leaf a 2-D boolean array), None
    for every other leaf (dense tensors, convolution kernels). Pure function of the mask; a mask that
    changes with its per-tensor count kept (dynamic sparsity) is re-laid out by calling it again."""
    def one(x, m):
        if jnp.ndim(m) == 2 and jnp.ndim(x) == 2:
            return sparse_kernel.layout(m, _kept(m))
        return None
    return jax.tree_util.tree_map(one, params, mask)


def sparse_layer(shape: tuple[int, ...], nnz: int, compute: str) -> bool:
    """Whether ``compute`` multiplies a kernel of ``shape`` keeping ``nnz`` weights sparsely (static:
    decided at trace time from shapes). ``auto``: only on CPU with the kernel built, and only where
    the model above predicts a gain — so never slower than masked by that model."""
    if compute == "masked":
        return False
    reason = sparse_kernel.unavailable_reason()
    if reason is not None:
        if compute == "sparse":
            sparse_kernel.warn_fallback(reason)
        return False
    if compute == "sparse":
        return True
    size = int(np.prod(shape))
    return size >= AUTO_MIN_SIZE and nnz <= AUTO_MAX_DENSITY * size


def bind(params: PyTree, layout_tree: PyTree, compute: str, fixed: bool = False) -> PyTree:
    """``params`` as the networks compute with them (:func:`sparserl.networks.dense`): a compact leaf
    becomes a :class:`SparseKernel`; a masked-dense kernel that ``compute`` multiplies sparsely too (its
    kept values gathered); every other leaf is unchanged. Differentiable in ``params``: a compact
    leaf's gradient is compact, a dense one's is dense (non-zero at kept positions only). ``fixed``: the
    parameters are not differentiated (:class:`FixedSparseKernel`: no weight gradient is computed)."""
    if compute not in COMPUTE_MODES:
        raise ValueError(f"sparsity.compute={compute!r}: must be one of {', '.join(COMPUTE_MODES)}")
    if layout_tree is None:
        return params

    kind = FixedSparseKernel if fixed else SparseKernel

    def one(x, lay):
        if lay is None:
            return x
        if _stored_compact(x, lay):
            return kind(x, lay)
        if not sparse_layer(x.shape[-2:], lay.rows.shape[-1], compute):
            return x
        return kind(sparse_kernel.compact(x, lay), lay)
    return jax.tree_util.tree_map(one, params, layout_tree, is_leaf=lambda t: t is None)


def _stored_compact(x, lay) -> bool:
    """Whether leaf ``x`` with layout ``lay`` is compact: (..., K) against the dense kernel's (..., in, out)."""
    return lay is not None and x.ndim < lay.rows.ndim + 1


def _stores_compact(lay, x, compute: str) -> bool:
    return (lay is not None and not _stored_compact(x, lay)
            and sparse_layer(x.shape[-2:], lay.rows.shape[-1], compute))


def to_storage(params: PyTree, layout_tree: PyTree, compute: str) -> PyTree:
    """The training-state form of masked-dense ``params`` under ``compute``: each kernel the mode
    multiplies sparsely as its compact kept values (layout order), every other leaf as is. Pure;
    shapes decide (so it runs under ``jit``/``vmap``); leaves already compact pass through."""
    if layout_tree is None:
        return params
    return jax.tree_util.tree_map(
        lambda x, lay: sparse_kernel.compact(x, lay) if _stores_compact(lay, x, compute) else x,
        params, layout_tree, is_leaf=lambda t: t is None)


def to_dense(params: PyTree, layout_tree: PyTree) -> PyTree:
    """Masked-dense ``params``: compact leaves expanded (pruned entries exactly 0), others as is."""
    if layout_tree is None:
        return params
    return jax.tree_util.tree_map(
        lambda x, lay: sparse_kernel.expand(x, lay) if _stored_compact(x, lay) else x,
        params, layout_tree, is_leaf=lambda t: t is None)


def map_params_like(tree: PyTree, params: PyTree, fn) -> PyTree:
    """``fn`` applied to every subtree of ``tree`` (an optimizer state) shaped like ``params`` — the
    moments of AdamW, the traces of ObGD — and nothing else."""
    params_def = jax.tree_util.tree_structure(params)
    is_params_like = lambda node: jax.tree_util.tree_structure(node) == params_def  # noqa: E731
    return jax.tree_util.tree_map(lambda node: fn(node) if is_params_like(node) else node, tree,
                                  is_leaf=is_params_like)
