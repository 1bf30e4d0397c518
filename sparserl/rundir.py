"""The run directory of one seed, the same for every training loop (replay agents and streaming).

What a run directory holds: ``config.yaml`` (fully resolved), ``model.json`` (parameter counts and
per-layer sparsity), ``metrics.csv``, ``diagnostics.csv``, ``checkpoints/``, ``summary.json`` (the
run finished), ``curves.png``, ``error.txt`` (it stopped on a numerical fault), ``RUNNING`` (locked
by the process training it; see :class:`sparserl.runs.RunLock`), and optionally ``cosine_*.npy``,
``videos/``, ``tensorboard/``, ``wandb/``, ``diagnose/``, ``report/``.

The rules that keep a user's data safe live here:

* A loop first *claims* its directories (:func:`claimed`): an exclusive kernel lock, then the
  status is decided again under that lock, so two processes started at once on one directory
  cannot both train it.
* Starting over (``overwrite=true``, or a run without a usable checkpoint) removes only the files
  listed above. A directory holding anything else is refused by ``overwrite=true`` and is never
  emptied: sparserl deletes its own files, nothing else.
* Metrics rows are appended and flushed one by one; rows written after the checkpoint a run
  resumes from are truncated, then recomputed identically.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from sparserl import agents, checkpoint, provenance, runs
from sparserl.config import Config, ConfigError, flatten, to_yaml

BASE_COLUMNS = ("env_step", "agent_step", "episodes", "train_return", "eval_return", "eval_return_std",
                "eval_episodes")
NORM_COLUMNS = ("actor_param_norm", "critic_param_norm")  # at the row's step (a pass over memory: not per update)
TAIL_COLUMNS = ("steps_per_s", "wall_time")  # timing: the only columns that differ between identical runs
# Keys that do not change what a run computes: a run directory may be resumed with other values.
RUN_CONTROL_KEYS = ("progress", "overwrite", "resume", "run_dir", "name", "seeds", "num_seeds", "seed_parallel",
                    "keep_checkpoints", "log.tensorboard", "log.wandb", "log.wandb_project", "log.wandb_mode",
                    "video.every", "video.size")

OWN_FILES = frozenset({"config.yaml", "model.json", "metrics.csv", "diagnostics.csv", "summary.json", "curves.png",
                       "error.txt", "interrupted.json", "provenance.json", runs.RUNNING_MARKER})
OWN_DIRS = frozenset({"checkpoints", "videos", "tensorboard", "wandb", "diagnose", "report"})
OWN_TEMPORARY = frozenset(f + ".tmp" for f in OWN_FILES)  # an atomic write interrupted by a kill


class NumericalFault(RuntimeError):
    """A NaN/inf appeared in a loss, the parameters, an action or the physics; the run stopped, its
    last good checkpoint (if any) kept."""


def metric_columns(cfg: Config) -> tuple[str, ...]:
    norms = (("encoder_param_norm",) if cfg.pixels else ()) + NORM_COLUMNS
    return BASE_COLUMNS + agents.get(cfg.agent).METRICS + norms + TAIL_COLUMNS


def _is_own(entry: Path) -> bool:
    name = entry.name
    if entry.is_dir() and not entry.is_symlink():
        return name in OWN_DIRS
    return name in OWN_FILES or name in OWN_TEMPORARY or (name.startswith("cosine_")
                                                           and name.endswith((".npy", ".npy.tmp")))


def foreign_entries(run_dir: Path) -> list[str]:
    """Names in ``run_dir`` that sparserl did not write (sorted)."""
    return sorted(p.name for p in run_dir.iterdir() if not _is_own(p))


def _differences(saved: dict, wanted: dict) -> list[str]:
    a, b = flatten(saved), flatten(wanted)
    return [f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in sorted(set(a) | set(b))
            if k not in RUN_CONTROL_KEYS and a.get(k) != b.get(k)]


def check(cfg: Config, locked: bool = False) -> str:
    """``new``, ``resume`` or ``finished`` for a single-seed config; refuses (ConfigError) a directory
    it must not touch. ``locked``: this process holds the directory's lock (see :func:`claimed`)."""
    run_dir = cfg.resolved_run_dir
    if run_dir.is_symlink() and not run_dir.exists():
        raise ConfigError(f"run_dir={str(run_dir)!r}: is a dangling symlink or a symlink loop; choose another run_dir=")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir={str(run_dir)!r}: is a file, not a directory; choose another run_dir=")
    if not run_dir.exists():
        return "new"
    entries = [p for p in run_dir.iterdir() if p.name != runs.RUNNING_MARKER]
    if not entries:
        return "new"
    if not locked and runs.is_locked(run_dir):  # not even overwrite=true may pull a run from under its process
        raise ConfigError(f"run_dir={str(run_dir)!r}: is being trained by another process (pid "
                          f"{runs.lock_owner(run_dir)}); wait for it to finish or stop it")
    foreign = foreign_entries(run_dir)
    if foreign and (cfg.overwrite or not (run_dir / "config.yaml").is_file()):
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise ConfigError(f"run_dir={str(run_dir)!r}: holds files that are not a sparserl run's ({shown}); sparserl "
                          f"never deletes them: choose another run_dir= or name=")
    if cfg.overwrite:
        return "new"
    hint = "pass overwrite=true to replace it, or choose another run_dir=/name="
    if not (run_dir / "config.yaml").is_file():  # only sparserl's own files, but no config: a run that never started
        raise ConfigError(f"run_dir={str(run_dir)!r}: holds an incomplete sparserl run (no config.yaml); {hint}")
    saved = runs.read_config(run_dir)  # one line naming config.yaml when it is not a readable mapping
    missing = sorted(set(flatten(cfg.to_dict())) - set(flatten(saved)) - set(RUN_CONTROL_KEYS))
    if missing:  # written before these keys existed: what the run computes may have changed since
        raise ConfigError(f"run_dir={str(run_dir)!r}: holds a run made by an older sparserl (its config.yaml lacks "
                          f"{', '.join(missing[:4])}{' and more' if len(missing) > 4 else ''}), whose algorithm may "
                          f"differ from this version's; finish it with the version that made it, or {hint}")
    diffs = _differences(saved, cfg.to_dict())
    if diffs:
        raise ConfigError(f"run_dir={str(run_dir)!r}: holds a run with a different config ({'; '.join(diffs[:3])}); "
                          f"rerun with the same config to resume it, or {hint}")
    if not cfg.resume:
        raise ConfigError(f"run_dir={str(run_dir)!r}: already holds this run and resume=false; {hint}")
    if runs.has_summary(run_dir):  # a damaged summary.json: the run resumes from its final checkpoint
        return "finished"
    if (run_dir / "error.txt").is_file():
        reason = (run_dir / "error.txt").read_text(errors="replace").strip().splitlines()[:1]
        raise ConfigError(f"run_dir={str(run_dir)!r}: stopped on a numerical fault ({''.join(reason)}); {hint}")
    return "resume"


@contextlib.contextmanager
def claimed(seed_cfgs: list[Config]) -> Iterator[list[str]]:
    """Lock every seed's run directory (creating it), decide each status again under the lock, and
    yield the statuses; on leaving, unlock, and remove directories this call created that are still
    empty (a run refused or stopped before writing anything leaves nothing behind)."""
    locks, created = [], []
    try:
        for c in seed_cfgs:
            run_dir = c.resolved_run_dir
            missing = run_dir  # this directory and its missing parents, deepest first
            while not missing.exists() and not missing.is_symlink() and missing != missing.parent:
                created.append(missing)
                missing = missing.parent
            try:
                locks.append(runs.RunLock(run_dir).acquire())
            except runs.RunLocked as e:
                raise ConfigError(str(e)) from None
            except OSError as e:
                raise ConfigError(f"run_dir={str(run_dir)!r}: cannot be written ({e.strerror or e}); "
                                  f"choose another run_dir=") from None
        yield [check(c, locked=True) for c in seed_cfgs]
    finally:
        for lock in locks:
            lock.release()
        for run_dir in sorted(created, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                run_dir.rmdir()  # only if still empty (deepest first, so empty parents go too)


def clear(run_dir: Path, keep_corrupt: bool) -> None:
    """Remove sparserl's own files from ``run_dir`` to start over (never anything else, never the
    lock); quarantined ``*.corrupt`` checkpoints stay unless overwriting."""
    for p in run_dir.iterdir():
        if not _is_own(p) or p.name == runs.RUNNING_MARKER:
            continue
        if p.name == "checkpoints" and keep_corrupt:
            for f in p.iterdir():
                if not f.name.endswith(".corrupt"):
                    f.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


def start(cfg: Config, stats: dict) -> None:
    """A fresh run directory: ``config.yaml``, ``model.json`` and the header of ``metrics.csv``."""
    run_dir = cfg.resolved_run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    clear(run_dir, keep_corrupt=not cfg.overwrite)  # overwrite=true, or a run without a usable checkpoint
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    (run_dir / "model.json").write_text(json.dumps(stats, indent=1))
    with open(run_dir / "metrics.csv", "w", newline="") as f:
        csv.writer(f).writerow(metric_columns(cfg))
    provenance.record(run_dir, "start")


def fmt(x) -> str:
    """A CSV cell: repr of floats (exact round trip), empty for None/NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return repr(float(x)) if isinstance(x, (float, np.floating)) else str(x)


class MetricsLog:
    """``metrics.csv`` of one run, appended row by row and flushed at once (a kill loses no row)."""

    def __init__(self, cfg: Config):
        self.columns = metric_columns(cfg)
        self.file = open(cfg.resolved_run_dir / "metrics.csv", "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.columns)

    def write(self, row: dict[str, Any]) -> dict[str, Any]:
        """Write ``row`` (missing columns empty); returns the scalars for the live loggers."""
        self.writer.writerow({k: fmt(row.get(k)) for k in self.columns})
        self.file.flush()
        return {k: row.get(k) for k in self.columns if k != "env_step"}

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a full disk must not hide the error that stopped the run
            self.file.close()


def truncate_csv(path: Path, rows: int) -> None:
    """Drop rows written after the checkpoint: they are recomputed, identically, on resume."""
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[: rows + 1]))


def numerical_fault(run_dir: Path, quantity: str, step: int, action_repeat: int) -> NumericalFault:
    """Write ``error.txt`` and return the exception that stops the run."""
    steps = checkpoint.complete_steps(run_dir / "checkpoints")
    kept = (f"last good checkpoint (env step {steps[-1] * action_repeat}) kept in {run_dir / 'checkpoints'}"
            if steps else "no checkpoint had been written yet")
    msg = f"non-finite {quantity} at agent step {step} (env step {step * action_repeat}); {kept}"
    (run_dir / "error.txt").write_text(msg + "\n")
    return NumericalFault(f"[{run_dir.name}] {msg}")


def write_summary(run_dir: Path, summary: dict, log: Callable[[str], None]) -> None:
    """``summary.json`` (atomically: it marks the run finished), then ``curves.png``."""
    tmp = run_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, run_dir / "summary.json")
    try:  # a picture is a convenience: failing to draw it must not lose the run
        runs.plot_curves(run_dir)
    except Exception as e:  # noqa: BLE001
        log(f"[{run_dir.name}] warning: could not draw curves.png ({e})")


class Timers:
    """Wall-time accounting per phase (env, act, update, eval, log, checkpoint)."""

    def __init__(self, seconds: dict[str, float] | None = None):
        self.seconds: dict[str, float] = dict(seconds or {})

    def add(self, phase: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - since
        return now
