"""Looking at run directories: ``sparserl ls`` and the ``curves.png`` of a run.

Everything here reads run directories (config.yaml, metrics.csv, summary.json, error.txt and
the lock on the ``RUNNING`` file that a live run holds); :class:`RunLock` is that lock.
"""

from __future__ import annotations

import csv
import fcntl
import os
import time
from pathlib import Path


RUNNING_MARKER = "RUNNING"  # locked (flock) by the process training this run, which writes its pid there
LOCK_WAIT_S = 1.0  # how long a claim waits out a momentary shared lock taken by a status probe (`ls`, sweeps)


class RunLocked(RuntimeError):
    """Another live process owns this run directory."""


class RunLock:
    """Exclusive ownership of a run directory: a kernel ``flock`` on its ``RUNNING`` file.

    The kernel drops the lock when its process dies however it dies (kill -9 included), so a marker
    left behind never blocks a resume, and a pid reused by another process means nothing: only a
    held lock counts. Two processes claiming one directory at the same moment: exactly one wins."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / RUNNING_MARKER
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() > deadline:
                    raise RunLocked(f"run_dir={str(self.path.parent)!r}: is being trained by another process "
                                    f"(pid {lock_owner(self.path.parent)}); wait for it to finish or stop it") from None
                time.sleep(0.05)
                continue
            # The previous owner may have unlinked the file between our open and our lock: then we
            # hold a lock on a file nobody else can see; start again on the file at the path.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still holding the lock (see acquire)
        os.close(self.fd)
        self.fd = None


def lock_owner(run_dir: Path) -> str:
    """The pid the lock's owner wrote into ``RUNNING`` ("?" when unreadable or gone)."""
    try:
        return (Path(run_dir) / RUNNING_MARKER).read_text().strip() or "?"
    except OSError:
        return "?"


def is_locked(run_dir: Path) -> bool:
    """Whether a live process holds the run's lock (probed with a shared lock taken and dropped at once)."""
    try:
        fd = os.open(Path(run_dir) / RUNNING_MARKER, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's shared lock
    return False


def run_status(run_dir: Path) -> str:
    """finished | failed | running | interrupted (killed, or stopped before finishing; a damaged
    ``summary.json`` does not make a run finished: resuming it writes the summary again)."""
    if has_summary(run_dir):
        return "finished"
    if (run_dir / "error.txt").is_file():
        return "failed"
    if is_locked(run_dir):
        return "running"
    return "interrupted"


def has_summary(run_dir: Path) -> bool:
    """Whether the run has a readable ``summary.json`` (it finished)."""
    from sparserl.config import ConfigError

    try:
        return read_summary(run_dir) is not None
    except ConfigError:
        return False


def read_csv(path: Path) -> list[dict]:
    """Rows of a CSV file written by a run ([] when absent); ConfigError when it is not readable
    UTF-8 CSV (a directory, binary garbage, NUL bytes)."""
    from sparserl.config import ConfigError

    if not path.exists() and not path.is_symlink():
        return []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        raise ConfigError(f"{str(path)!r}: unreadable ({reason})") from None


def read_metrics(run_dir: Path) -> list[dict]:
    return read_csv(run_dir / "metrics.csv")


def read_config(run_dir: Path) -> dict:
    """A run's saved ``config.yaml`` as a nested dict; ConfigError when it is not a readable YAML mapping."""
    from sparserl.config import ConfigError, read_yaml

    path = run_dir / "config.yaml"
    data = read_yaml(path, repr(str(path)))
    if not isinstance(data, dict):
        raise ConfigError(f"{str(path)!r}: not a sparserl config (a {type(data).__name__}, not a mapping of keys)")
    return data


def read_summary(run_dir: Path) -> dict | None:
    """A run's ``summary.json`` (None when absent); ConfigError when it is not a JSON object with a
    numeric ``final_return`` (and, if present, ``params`` of integer counts per module)."""
    import json

    from sparserl.config import ConfigError

    path = run_dir / "summary.json"
    if not path.exists() and not path.is_symlink():
        return None
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
        if not isinstance(data, dict):
            raise TypeError(f"a JSON {type(data).__name__}, not an object")
        if isinstance(data.get("final_return"), bool) or not isinstance(data.get("final_return"), (int, float)):
            raise TypeError("no numeric final_return")
        for m in (data.get("params") or {}).values():
            int(m["total_params"]), int(m["nonzero_params"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:80] or type(e).__name__
        raise ConfigError(f"{str(path)!r}: unreadable ({reason})") from None
    return data


def find_runs(root: Path, max_depth: int = 4) -> list[Path]:
    """Run directories (those holding a config.yaml) at or below ``root``; directories that cannot
    be listed are passed over."""
    found = []

    def walk(d: Path, depth: int) -> None:
        if (d / "config.yaml").is_file():
            found.append(d)
            return
        if depth < max_depth:
            try:
                children = sorted(p for p in d.iterdir() if p.is_dir())
            except OSError:
                return
            for child in children:
                walk(child, depth + 1)

    if root.is_dir():
        walk(root, 0)
    return found


def _last_row(rows: list[dict]) -> dict:
    """The last metrics row whose step (and return, when given) parse: a run killed mid-write may
    leave a partial last line."""
    for row in reversed(rows):
        try:
            int(float(row["env_step"]))
            if row.get("eval_return"):
                float(row["eval_return"])
            return row
        except (KeyError, TypeError, ValueError):
            continue
    return {}


def describe(run_dir: Path, root: Path | None = None) -> dict:
    """One row of ``sparserl ls``. A run whose config.yaml, metrics.csv or summary.json cannot be
    read is listed with status ``unreadable`` (and ``?`` where unknown) instead of breaking the listing."""
    from sparserl.config import ConfigError

    name = str(run_dir.relative_to(root)) if root and run_dir != root else run_dir.name
    try:
        cfg = read_config(run_dir)
        last = _last_row(read_metrics(run_dir))
        read_summary(run_dir)
        a, c = cfg.get("actor") or {}, cfg.get("critic") or {}
        return {
            "name": name, "env": cfg.get("env", "?"), "agent": cfg.get("agent", "?"),
            "widths": f"a{a.get('width')}x{a.get('blocks')} c{c.get('width')}x{c.get('blocks')}",
            "sparsity": f"a{float(a.get('sparsity', 0)):g} c{float(c.get('sparsity', 0)):g}"
                        + (f" {cfg['init']}" if cfg.get("init", "dense") != "dense" else ""),
            "env_steps": f"{int(float(last['env_step'])) if last else 0}/{cfg.get('env_steps', '?')}",
            "eval_return": f"{float(last['eval_return']):.1f}" if last.get("eval_return") else "-",
            "status": run_status(run_dir),
        }
    except (ConfigError, OSError, ValueError, TypeError, AttributeError, KeyError):
        return {"name": name, "env": "?", "agent": "?", "widths": "?", "sparsity": "?", "env_steps": "?",
                "eval_return": "-", "status": "unreadable"}


COLUMNS = ("name", "env", "agent", "widths", "sparsity", "env_steps", "eval_return", "status")


def _printable(value) -> str:
    text = str(value)
    return text if text.isprintable() else repr(text)[1:-1]  # a newline in a directory name stays on its row


def format_table(rows: list[dict]) -> str:
    rows = [{k: _printable(r[k]) for k in COLUMNS} for r in rows]
    widths = {k: max([len(k)] + [len(r[k]) for r in rows]) for k in COLUMNS}
    lines = ["  ".join(k.ljust(widths[k]) for k in COLUMNS)]
    lines += ["  ".join(r[k].ljust(widths[k]) for k in COLUMNS) for r in rows]
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display on servers and CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(run_dir: Path) -> Path:
    """``curves.png``: evaluation return and the main losses against env steps."""
    plt = pyplot()
    rows = read_metrics(run_dir)
    steps = [int(r["env_step"]) for r in rows]

    def series(key):
        pts = [(s, float(r[key])) for s, r in zip(steps, rows) if r.get(key)]
        return list(zip(*pts)) if pts else ([], [])

    panels = [("eval_return", "evaluation return"), ("critic_loss", "critic loss"), ("actor_loss", "actor loss")]
    if rows and "critic_loss" not in rows[0]:  # streaming agents (stream_ac): returns of training episodes
        panels = [("eval_return", "training-episode return"), ("abs_td_error", "|TD error|"), ("entropy", "policy entropy")]
    fig, axes = plt.subplots(1, len(panels), figsize=(12, 3.2))
    for ax, (key, title) in zip(axes, panels):
        x, y = series(key)
        ax.plot(x, y, marker="o", markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("env steps")
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name, fontsize=10)
    fig.tight_layout()
    path = run_dir / "curves.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
