"""What produced a run: ``provenance.json`` in its run directory, one entry per session (the start and
every resume), so a result can be traced to the code, libraries, machine and job that computed it."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

FILE = "provenance.json"
LIBRARIES = ("sparserl", "jax", "jaxlib", "optax", "numpy", "mujoco", "dm-control", "gymnasium")
# Set by `sparserl sweep` for the runs it starts; a run started by hand is "direct".
EXECUTOR_ENV = "SPARSERL_EXECUTOR"


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit of the checkout sparserl is imported from (``+dirty`` with local changes), if any."""
    source = Path(__file__).resolve().parent.parent
    if not (source / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def job_id() -> str | None:
    """The scheduler's id of this job (Slurm: ``ARRAYJOB_TASK`` for an array task)."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}"
    return os.environ.get("SLURM_JOB_ID") or None


def session(event: str) -> dict:
    """One entry: what this process is, where it runs, with what."""
    import jax

    device = jax.devices()[0]
    return {
        "event": event, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {name: _version(name) for name in LIBRARIES}, "python": platform.python_version(),
        "git_commit": git_commit(), "host": socket.gethostname(), "platform": device.platform,
        "device_kind": getattr(device, "device_kind", device.platform), "device_count": jax.device_count(),
        "executor": os.environ.get(EXECUTOR_ENV, "direct"), "job_id": job_id(),
        "restart_count": int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
    }


def record(run_dir: Path, event: str) -> None:
    """Append this session to ``provenance.json`` (``event``: start or resume); a fresh file on start."""
    path = Path(run_dir) / FILE
    entries: list = []
    if event != "start":
        try:
            entries = json.loads(path.read_text())["sessions"]
        except (OSError, ValueError, KeyError, TypeError):
            entries = []  # missing or damaged: the history starts here
    entries.append(session(event))
    tmp = path.with_name(FILE + ".tmp")
    tmp.write_text(json.dumps({"sessions": entries}, indent=1) + "\n")
    tmp.replace(path)


def read(run_dir: Path) -> list[dict]:
    try:
        return json.loads((Path(run_dir) / FILE).read_text())["sessions"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
