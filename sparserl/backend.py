"""Which implementation runs where: every backend-dependent choice of sparserl, in one place.

A :class:`Backend` record names the form of each choice; :mod:`sparserl.networks` dispatches on
:func:`current` when it traces ``dense``, ``conv2d`` / ``conv_relu`` and ``conv_encoder``, so agents
and networks never look at the platform themselves.

* ``CPU`` (used when ``jax.default_backend()`` is ``cpu``): the XLA:CPU speed choices measured on the
  2-core AVX-512 benchmark machine (docs/agents.md "What keeps it near the matmul rate on a CPU",
  docs/visual.md "Encoder speed"): kernel gradients multiply a tile-wise transposed input
  (``matmul_grad='tiled_transpose'``, ~0.75 -> plain matmul rate for ``x.T @ g``); the pixel encoder
  runs as chunked matmuls with a space-to-depth first layer and a fused backward
  (``conv='chunked_s2d'``, 0.55 of the matmul rate against 0.14 for XLA's convolution); malloc backed
  by transparent huge pages; XLA:CPU's multi-output fusion.
* Both: whether ``sparsity.compute=sparse|auto`` may run pruned kernels through sparserl's C++ kernel
  (``sparse_kernel``: an XLA:CPU custom call, so ``CPU`` only; docs/sparse_compute.md).
* ``PLAIN`` (used on every other platform: GPU, TPU): the plain XLA forms, ``x @ kernel`` with
  autodiff's gradient and ``lax.conv_general_dilated``. Nothing here was measured on a GPU; the CPU
  forms work around XLA:CPU specifically (its matmul repacks a transposed operand; its convolution and
  elementwise passes run far below the FLOP and bandwidth limits), whereas a GPU matmul takes
  transposed operands as they are and its convolutions are library kernels, and the chunked encoder's
  ``lax.map`` / ``lax.scan`` over 4-8 images would run a GPU as a sequence of tiny kernels.

Override with the environment variable ``SPARSERL_BACKEND`` = ``auto`` (default: by platform),
``cpu`` or ``plain``, or in code with ``with backend.use("plain"): ...``; either must be in place
before the function is traced (``jax.jit`` caches the trace). Two choices act on the whole process
before JAX starts, so they follow the environment alone (the platform is not known yet; both only
affect CPU work and are harmless elsewhere): ``import sparserl`` appends the CPU backend's XLA flags to
``XLA_FLAGS`` (:func:`apply_xla_flags`), and the command-line entry points restart once with huge
pages (:func:`restart_with_huge_pages`, :mod:`sparserl.hugepages`). ``SPARSERL_BACKEND=plain``
turns both off, as do their own opt-outs ``SPARSERL_XLA_TUNING=0`` and ``SPARSERL_HUGE_PAGES=0``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping

from sparserl import hugepages
from sparserl.errors import ConfigError

ENV_VAR = "SPARSERL_BACKEND"
CHOICES = ("auto", "cpu", "plain")
MULTI_OUTPUT_FUSION = "--xla_backend_extra_options=xla_cpu_use_multi_output_fusion"


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    matmul_grad: str           # "tiled_transpose" | "plain": the dense layer's kernel gradient
    conv: str                  # "chunked_s2d" | "lax": the pixel encoder's convolutions
    huge_pages: bool           # malloc asks for transparent huge pages (command-line processes)
    xla_flags: tuple[str, ...]  # appended to XLA_FLAGS at ``import sparserl``
    sparse_kernel: bool        # sparsity.compute=sparse/auto may use the C++ kernel (sparserl/sparse_kernel.py)


CPU = Backend("cpu", matmul_grad="tiled_transpose", conv="chunked_s2d", huge_pages=True,
              xla_flags=(MULTI_OUTPUT_FUSION,), sparse_kernel=True)
# No sparse kernel off CPU (an XLA:CPU custom call): sparsity.compute=auto means masked there.
PLAIN = Backend("plain", matmul_grad="plain", conv="lax", huge_pages=False, xla_flags=(), sparse_kernel=False)
BACKENDS = {"cpu": CPU, "plain": PLAIN}

_forced: list[Backend] = []  # the stack of ``use`` overrides, innermost last


def requested(env: Mapping[str, str] | None = None) -> str:
    """The validated ``SPARSERL_BACKEND`` value (``auto`` when unset); a one-line ConfigError if bad."""
    value = (os.environ if env is None else env).get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ConfigError(f"{ENV_VAR}={value!r}: must be one of {', '.join(CHOICES)} "
                          "(auto: cpu on XLA:CPU, plain on GPU and TPU)")
    return value


def for_platform(platform: str) -> Backend:
    """The backend for a JAX platform name (``jax.default_backend()``): CPU on ``cpu``, else PLAIN."""
    return CPU if platform == "cpu" else PLAIN


def current() -> Backend:
    """The backend in force: a :func:`use` override, else ``SPARSERL_BACKEND``, else by platform."""
    if _forced:
        return _forced[-1]
    choice = requested()
    return BACKENDS[choice] if choice != "auto" else _by_platform()


def _by_platform() -> Backend:
    import jax  # deferred: ``import sparserl`` must not import JAX (see apply_xla_flags)

    return for_platform(jax.default_backend())


@contextlib.contextmanager
def use(choice: str | Backend) -> Iterator[Backend]:
    """Force a backend (``"cpu"``, ``"plain"``, ``"auto"`` or a record) for code traced inside."""
    if isinstance(choice, str):
        name = requested({ENV_VAR: choice})
        choice = BACKENDS[name] if name != "auto" else _by_platform()
    _forced.append(choice)
    try:
        yield choice
    finally:
        _forced.pop()


def process_backend(env: Mapping[str, str] | None = None, strict: bool = True) -> Backend:
    """The backend whose process-level options apply, from the environment alone: PLAIN only when
    asked for, since the platform is unknown before JAX starts (the options are harmless off CPU).
    ``strict=False`` reads a bad ``SPARSERL_BACKEND`` as ``auto`` instead of raising."""
    try:
        return PLAIN if requested(env) == "plain" else CPU
    except ConfigError:
        if strict:
            raise
        return CPU


def apply_xla_flags(env: dict[str, str] | None = None) -> None:
    """Append the process backend's XLA flags to ``XLA_FLAGS``. Must run before JAX initialises its
    first backend, hence from ``sparserl/__init__.py``. A flag whose name is already in ``XLA_FLAGS``
    is left out (a user's own setting wins); ``SPARSERL_XLA_TUNING=0`` leaves ``XLA_FLAGS`` alone."""
    env = os.environ if env is None else env
    if env.get("SPARSERL_XLA_TUNING", "1") == "0":
        return
    flags = env.get("XLA_FLAGS", "")
    for flag in process_backend(env, strict=False).xla_flags:  # a bad value fails later: current(), restart
        if flag.split("=")[0].lstrip("-") not in flags:
            flags = f"{flags} {flag}".strip()
    if flags != env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = flags


def restart_with_huge_pages() -> None:
    """For command-line entry points, first thing: check ``SPARSERL_BACKEND`` and, where the process
    backend wants huge pages, re-exec once with them (:func:`sparserl.hugepages.restart_with_huge_pages`)."""
    if process_backend().huge_pages:
        hugepages.restart_with_huge_pages()


def child_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a child process, with huge pages where its backend wants them."""
    return hugepages.child_env(env) if process_backend(env, strict=False).huge_pages else env
