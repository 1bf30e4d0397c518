"""Graceful stop: the signals a scheduler sends before it preempts or times out a job.

Slurm sends ``--signal=SIG@N`` N seconds before a time limit, submitit asks for SIGUSR2, preemption
and ``scancel`` send SIGTERM, a person presses Ctrl-C (SIGINT). While :func:`handling` is active,
the first of these only *records* the request; the training loops look at :func:`requested` after
every agent step, finish that step, write a checkpoint (mid-episode included), record the stop in
the run directory (``interrupted.json``; ``sparserl ls`` shows ``interrupted``) and raise
:class:`Interrupted`. The command exits with :data:`EXIT_INTERRUPTED`; rerunning it resumes exactly.

A second SIGINT aborts at once (a person who presses Ctrl-C twice means it); repeated scheduler
signals are ignored, the first one is being served.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL (sysexits.h): stopped cleanly, try again -- the same command resumes
MARKER = "interrupted.json"

_requested: int | None = None  # the first stop signal received while handling() is active


class Interrupted(Exception):
    """A run stopped on a signal after writing its checkpoint."""

    def __init__(self, signum: int, env_step: int, run_dirs: list[Path]):
        self.signum, self.env_step, self.run_dirs = signum, env_step, run_dirs
        names = ", ".join(str(d) for d in run_dirs)
        super().__init__(f"stopped by {signal.Signals(signum).name} at env step {env_step} with a checkpoint "
                         f"written ({names}); run the same command again to resume")


def requested() -> int | None:
    """The stop signal received, or None."""
    return _requested


def _on_signal(signum, frame) -> None:
    global _requested
    if _requested == signal.SIGINT and signum == signal.SIGINT:
        raise KeyboardInterrupt  # Ctrl-C twice: abort now
    if _requested is None:
        _requested = signum
        again = " (Ctrl-C again aborts without one)" if signum == signal.SIGINT else ""
        # os.write: safe inside a signal handler, unlike print (which may hold the stream's lock)
        os.write(2, f"\nsparserl: {signal.Signals(signum).name} received: stopping after this agent step "
                    f"with a checkpoint{again}\n".encode())


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Record stop signals instead of dying of them, for the duration of the block (main thread only:
    Python delivers signals there; elsewhere, e.g. in a Ray worker thread, signals keep their handlers)."""
    global _requested
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGUSR2) is _on_signal:
        yield  # elsewhere than the main thread, or already handling (the outer block resets)
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    _requested = None
    for s in STOP_SIGNALS:
        signal.signal(s, _on_signal)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _requested = None


def mark(run_dir: Path, signum: int, agent_step: int, env_step: int) -> None:
    """Record in the run directory why and where the run stopped (removed when it resumes)."""
    record = {"signal": signal.Signals(signum).name, "agent_step": agent_step, "env_step": env_step,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = Path(run_dir) / (MARKER + ".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(Path(run_dir) / MARKER)


def stopped(signum: int, agent_step: int, env_step: int, run_dirs: list[Path]) -> Interrupted:
    """Record the stop in every run directory (the loops call this after their checkpoint) and return
    the exception that ends the run."""
    for run_dir in run_dirs:
        mark(run_dir, signum, agent_step, env_step)
    return Interrupted(signum, env_step, list(run_dirs))


def unmark(run_dir: Path) -> None:
    (Path(run_dir) / MARKER).unlink(missing_ok=True)


def read_mark(run_dir: Path) -> dict | None:
    try:
        record = json.loads((Path(run_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None
