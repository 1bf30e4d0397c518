"""Looking at run directories: ``sparserl ls`` and the ``curves.png`` of a run.

Everything here reads run directories only (config.yaml, metrics.csv, summary.json, error.txt and
the ``RUNNING`` marker a live run holds), never the state of another process.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import yaml

RUNNING_MARKER = "RUNNING"  # holds the pid of the process training this run; removed when it stops


def mark_running(run_dir: Path) -> None:
    (run_dir / RUNNING_MARKER).write_text(str(os.getpid()))


def clear_running(run_dir: Path) -> None:
    (run_dir / RUNNING_MARKER).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_status(run_dir: Path) -> str:
    """finished | failed | running | interrupted (killed, or stopped before finishing)."""
    if (run_dir / "summary.json").is_file():
        return "finished"
    if (run_dir / "error.txt").is_file():
        return "failed"
    marker = run_dir / RUNNING_MARKER
    if marker.is_file():
        try:
            if _alive(int(marker.read_text().strip())):
                return "running"
        except ValueError:
            pass
    return "interrupted"


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with open(path) as f:
        return list(csv.DictReader(f))


def find_runs(root: Path, max_depth: int = 4) -> list[Path]:
    """Run directories (those holding a config.yaml) at or below ``root``."""
    found = []

    def walk(d: Path, depth: int) -> None:
        if (d / "config.yaml").is_file():
            found.append(d)
            return
        if depth < max_depth:
            for child in sorted(p for p in d.iterdir() if p.is_dir()):
                walk(child, depth + 1)

    if root.is_dir():
        walk(root, 0)
    return found


def describe(run_dir: Path, root: Path | None = None) -> dict:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    rows = read_metrics(run_dir)
    last = rows[-1] if rows else {}
    a, c = cfg.get("actor", {}), cfg.get("critic", {})
    return {
        "name": str(run_dir.relative_to(root)) if root and run_dir != root else run_dir.name, "env": cfg.get("env", "?"), "agent": cfg.get("agent", "?"),
        "widths": f"a{a.get('width')}x{a.get('blocks')} c{c.get('width')}x{c.get('blocks')}",
        "sparsity": f"a{a.get('sparsity', 0):g} c{c.get('sparsity', 0):g}"
                    + (f" {cfg['init']}" if cfg.get("init", "dense") != "dense" else ""),
        "env_steps": f"{int(last['env_step']) if last else 0}/{cfg.get('env_steps', '?')}",
        "eval_return": f"{float(last['eval_return']):.1f}" if last.get("eval_return") else "-",
        "status": run_status(run_dir),
    }


COLUMNS = ("name", "env", "agent", "widths", "sparsity", "env_steps", "eval_return", "status")


def format_table(rows: list[dict]) -> str:
    widths = {k: max([len(k)] + [len(str(r[k])) for r in rows]) for k in COLUMNS}
    lines = ["  ".join(k.ljust(widths[k]) for k in COLUMNS)]
    lines += ["  ".join(str(r[k]).ljust(widths[k]) for k in COLUMNS) for r in rows]
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
