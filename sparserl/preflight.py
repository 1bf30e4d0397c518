"""Checks made before any work starts, so that a user mistake is one line (exit 2) and nothing is written.

* :func:`check_output_dir`: a directory the command will write into can be created and written
  (not a file, a dangling symlink, a symlink loop, a read-only filesystem or a path under a file).
* :func:`model_memory` / :func:`check_model_fits`: the memory the agent state of a config takes
  (parameters, masks, gradients, optimizer moments, target networks, and a rough allowance for the
  activations of one update) and the flat replay buffer, estimated from abstract shapes (nothing is
  allocated), against the memory available; refused with the sizes named before allocating.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from sparserl.config import Config, ConfigError

NAME_MAX = 255  # bytes of one path component on Linux filesystems


# ----------------------------------------------------------------------------------------------
# Output directories


def _symlink_problem(path: Path) -> str | None:
    """'a dangling symlink' / 'a symlink loop' for a broken symlink at ``path``, else None."""
    if not path.is_symlink():
        return None
    try:
        os.stat(path)
    except OSError as e:
        return "a symlink loop" if e.errno == errno.ELOOP else "a dangling symlink"
    return None


def check_output_dir(path: str | Path, what: str) -> None:
    """Raise a one-line ConfigError (``what`` names the option, e.g. ``--out``) unless ``path`` is an
    existing writable directory or one that can be created. Writes nothing: writability is probed
    by creating and removing a temporary directory in the nearest existing directory."""
    path = Path(path)
    shown = f"{what}={str(path)!r}"
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise ConfigError(f"{shown}: a path component is longer than {NAME_MAX} bytes")
    # the path itself, then its ancestors up to the first one that exists
    probe = path
    while True:
        problem = _symlink_problem(probe)
        if problem:
            where = "" if probe == path else f" ({str(probe)!r})"
            raise ConfigError(f"{shown}: is{' under' if probe != path else ''} {problem}{where}")
        if probe.exists():
            if not probe.is_dir():
                where = "is a file, not a directory" if probe == path else f"is under {str(probe)!r}, a file"
                raise ConfigError(f"{shown}: {where}")
            break
        if probe.parent == probe:
            break
        probe = probe.parent
    try:
        times = os.stat(probe)
        made = tempfile.mkdtemp(prefix=".sparserl-write-probe-", dir=probe)
    except OSError as e:
        reason = {errno.EROFS: "a read-only filesystem", errno.EACCES: "permission denied",
                  errno.EPERM: "permission denied", errno.ENOSPC: "no space left on the device"}.get(
            e.errno, e.strerror or type(e).__name__)
        where = "" if probe == path else f" (in {str(probe)!r})"
        raise ConfigError(f"{shown}: cannot be written{where}: {reason}") from None
    try:
        os.rmdir(made)
        os.utime(probe, ns=(times.st_atime_ns, times.st_mtime_ns))  # leave no trace of the probe
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------
# Memory


def available_memory() -> tuple[int | None, str]:
    """Bytes available to JAX arrays and what they are: the accelerator's free memory, or the
    host's MemAvailable on CPU (None where unknown)."""
    import jax

    from sparserl import replay

    if jax.default_backend() != "cpu":
        try:
            stats = jax.devices()[0].memory_stats() or {}
            if "bytes_limit" in stats:
                return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)), f"{jax.default_backend()} memory"
        except Exception:  # noqa: BLE001 - a backend without memory statistics: unknown
            return None, "accelerator memory"
        return None, "accelerator memory"
    return replay.mem_available(), "memory"


def _nbytes(tree) -> int:
    import jax

    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def _dims(cfg: Config) -> tuple[int, int]:
    from sparserl import envs

    env = envs.make_for(cfg, 0)
    return env.obs_dim, env.action_dim


def model_memory(cfg: Config, obs_dim: int | None = None, action_dim: int | None = None) -> dict[str, Any]:
    """Estimated bytes of one seed's training: ``state`` (parameters, masks, optimizer moments,
    target networks), ``grads`` (one gradient per parameter), ``activations`` (a rough allowance
    for one update's minibatch), ``model`` (their sum), ``replay`` (the flat replay buffer of state
    observations; 0 for pixels, which :mod:`sparserl.replay` checks, and for streaming agents) and
    ``params`` (number of parameters). From abstract shapes: nothing is allocated."""
    import jax

    from sparserl import agents, replay

    if obs_dim is None or action_dim is None:
        obs_dim, action_dim = _dims(cfg)
    # Masks of any sparsity have the shape of the dense ones; drawing them abstractly at 1e11
    # entries would overflow JAX's int32 indices, so the shapes come from the dense config.
    dense = dataclasses.replace(cfg, init="dense", actor=dataclasses.replace(cfg.actor, sparsity=0.0),
                                critic=dataclasses.replace(cfg.critic, sparsity=0.0),
                                encoder=dataclasses.replace(cfg.encoder, sparsity=0.0))
    try:
        state = jax.eval_shape(lambda: agents.get(cfg.agent).init(dense, obs_dim, action_dim))
    except (OverflowError, ValueError, TypeError, MemoryError) as e:
        raise ConfigError(f"actor.width={cfg.actor.width} critic.width={cfg.critic.width}: the networks are too "
                          f"large to build ({type(e).__name__}); lower the widths or blocks") from None
    modules = agents.modules(state)
    params = sum(math.prod(x.shape) for m in modules.values() for x in jax.tree_util.tree_leaves(m.params))
    grads = sum(_nbytes(m.params) for m in modules.values())
    batch = 1 if cfg.agent == "stream_ac" else cfg.batch_size
    hidden = 4 * (cfg.actor.width * (cfg.actor.blocks + 2) + cfg.critic.width * (cfg.critic.blocks + 2))
    activations = 3 * 4 * batch * hidden * (2 if cfg.critic.cdq else 1)
    if cfg.pixels:
        activations += 3 * 4 * batch * cfg.encoder.channels * (cfg.render.size // 2) ** 2 * cfg.encoder.layers
    if cfg.diag_every and cfg.agent != "stream_ac":  # diagnostics: per-sample gradients, the probe set's features
        activations = max(activations, min(cfg.diag_grad_samples, cfg.diag_probe_size) * grads
                          + 4 * cfg.diag_probe_size * hidden)
    flat_replay = 0
    if cfg.agent != "stream_ac" and not cfg.pixels:
        flat_replay = replay.capacity(cfg) * (2 * obs_dim + action_dim + 2) * 4
    state_bytes = _nbytes(state)
    largest = {name: max([math.prod(x.shape) for x in jax.tree_util.tree_leaves(m.params) if x.ndim >= 2] or [0])
               for name, m in modules.items()}
    return {"params": params, "state": state_bytes, "grads": grads, "activations": activations,
            "model": state_bytes + grads + activations, "replay": flat_replay, "largest_kernel": largest}


MAX_EXACT_MASK = 2**31 - 1  # sparsity.draw=exact permutes int32 indices: at most this many entries per tensor


def check_mask_sizes(cfg: Config, largest_kernel: dict[str, int]) -> None:
    """Refuse an exact-count mask over a tensor too large for its int32 permutation (before drawing it)."""
    if cfg.sparsity.draw != "exact":
        return
    for name, n in largest_kernel.items():
        key = f"{name}.sparsity"
        sparsity = getattr(getattr(cfg, name), "sparsity", 0.0)
        if sparsity > 0 and n > MAX_EXACT_MASK:
            raise ConfigError(f"{key}={sparsity:g}: a {name} tensor of {n:,} entries is too large for "
                              f"sparsity.draw=exact (at most {MAX_EXACT_MASK:,}); use sparsity.draw=bernoulli "
                              f"or smaller widths")


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB"


def check_model_fits(cfg: Config, obs_dim: int | None = None, action_dim: int | None = None,
                     num_seeds: int | None = None, available: int | None = None) -> dict[str, Any]:
    """Refuse (one-line ConfigError naming the sizes and the memory available) a config whose
    networks or flat replay buffer cannot fit, before anything is allocated. Returns the estimate
    of :func:`model_memory` (per seed). ``num_seeds``: seeds trained together (default: the config's)."""
    est = model_memory(cfg, obs_dim, action_dim)
    check_mask_sizes(cfg, est["largest_kernel"])
    n = len(cfg.seed_list) if num_seeds is None else num_seeds
    where = "memory"
    if available is None:
        available, where = available_memory()
    if available is None:
        return est
    seeds = f" for {n} seeds" if n > 1 else ""
    model, replay_bytes = n * est["model"], n * est["replay"]
    host_shared = where == "memory"  # on CPU the networks and the replay buffer share the host memory
    if model > available:
        raise ConfigError(
            f"actor.width={cfg.actor.width} critic.width={cfg.critic.width}: the networks ({est['params']:,} "
            f"parameters) need about {_gb(model)}{seeds} (parameters, gradients, optimizer moments, target, masks) "
            f"but only {_gb(available)} of {where} is available; lower the widths or blocks")
    if replay_bytes and replay_bytes + (model if host_shared else 0) > available:
        raise ConfigError(
            f"buffer_size={cfg.buffer_size}: the replay buffer needs {_gb(replay_bytes)}{seeds}"
            + (f" besides {_gb(model)} for the networks" if host_shared else "")
            + f" but only {_gb(available)} of {where} is available; lower buffer_size")
    return est


def simplicity_memory(widths: list[int], blocks: int, arch: str, grid: int = 64) -> int:
    """Estimated peak bytes of ``diagnose --simplicity`` at its largest width: one encoder + head
    (parameters and mask) and the activations of the ``grid x grid`` input points."""
    import jax

    from sparserl import networks

    width = max(widths)
    try:
        params = jax.eval_shape(lambda: networks.init_encoder(jax.random.PRNGKey(0), 2, width, blocks, arch))
    except (OverflowError, ValueError, TypeError, MemoryError) as e:
        raise ConfigError(f"--widths: width {width} is too large to build ({type(e).__name__})") from None
    return 2 * _nbytes(params) + 3 * 4 * grid * grid * 4 * width * (blocks + 2)


def check_simplicity_fits(widths: list[int], blocks: int, arch: str, available: int | None = None) -> None:
    need = simplicity_memory(widths, blocks, arch)
    where = "memory"
    if available is None:
        available, where = available_memory()
    if available is not None and need > available:
        raise ConfigError(f"--widths: width {max(widths)} needs about {_gb(need)} but only {_gb(available)} of "
                          f"{where} is available; use smaller --widths")
