"""Published baselines shipped with sparserl: per-seed DMC evaluation returns of SimBa, SimbaV2, BRO, MR.Q,
TD-MPC2 and SAC released by the SimbaV2 authors (Apache-2.0, notice in ``data/BASELINES_LICENSE``).

``data/baselines_dmc.csv.gz`` is derived by ``scripts/make_baselines.py``; its rows have the released schema
``exp_name, env_name, seed, metric, env_step, value`` with ``exp_name`` a short baseline name (``simba``,
``bro``, ...) and ``env_name`` sparserl's DMC task name (``humanoid-run``). ``env_step`` counts environment
steps, as sparserl's ``env_step`` does.
"""

from __future__ import annotations

import csv
import gzip
from functools import lru_cache
from pathlib import Path

import numpy as np

from sparserl.errors import ConfigError

# short name (what ``baselines=`` takes) -> the released file it comes from. UTD = updates per agent step.
SOURCES = {
    "simba": "baseline/simba_utd2.csv",  # SimBa SAC, UTD 2: the paper's dense default
    "simbav2": "baseline/simbaV2_utd2.csv",
    "simbav2_utd8": "baseline/simbaV2_utd8.csv",
    "bro": "baseline/bro_utd10.csv",  # BRO's default replay ratio
    "bro_utd2": "baseline/bro_utd2.csv",
    "mrq": "baseline/mrq.csv",
    "tdmpc2": "baseline/tdmpc2.csv",
    "sac": "baseline/sac.csv",
    "simba_cwidth128": "scaling/param/simba_cwidth128.csv",  # SimBa with critic width 128 (default 512)
    "simba_cwidth256": "scaling/param/simba_cwidth256.csv",
    "simba_cwidth1024": "scaling/param/simba_cwidth1024.csv",
    "simbav2_cwidth128": "scaling/param/simbaV2_cwidth128.csv",
    "simbav2_cwidth256": "scaling/param/simbaV2_cwidth256.csv",
    "simbav2_cwidth1024": "scaling/param/simbaV2_cwidth1024.csv",
}
COLUMNS = ("exp_name", "env_name", "seed", "metric", "env_step", "value")
DATA_FILE = Path(__file__).parent / "data" / "baselines_dmc.csv.gz"
LICENSE_FILE = Path(__file__).parent / "data" / "BASELINES_LICENSE"


@lru_cache(maxsize=1)
def table() -> dict[str, dict[str, dict[int, dict[int, float]]]]:
    """baseline -> task -> seed -> {env_step: mean evaluation return}."""
    out: dict = {}
    with gzip.open(DATA_FILE, "rt", newline="") as f:
        for r in csv.DictReader(f):
            seeds = out.setdefault(r["exp_name"], {}).setdefault(r["env_name"], {})
            seeds.setdefault(int(r["seed"]), {})[int(r["env_step"])] = float(r["value"])
    return out


def check(requested: list[str]) -> None:
    """A baseline name not shipped is a user mistake: one line listing the available ones."""
    unknown = [n for n in requested if n not in SOURCES]
    if unknown:
        raise ConfigError(f"baselines={','.join(requested)}: unknown baseline {unknown[0]!r} "
                          f"(available: {', '.join(SOURCES)})")


def tasks(name: str) -> list[str]:
    return sorted(table()[name])


def steps(name: str, task: str) -> list[int]:
    """The evaluation steps every seed of the baseline has on the task."""
    seeds = table()[name].get(task, {})
    return sorted(set.intersection(*(set(s) for s in seeds.values()))) if seeds else []


def nearest_step(name: str, task: str, step: int) -> int | None:
    """The baseline's evaluation step nearest ``step`` (the earlier one on a tie); None if it lacks the task."""
    common = steps(name, task)
    return min(common, key=lambda s: (abs(s - step), s)) if common else None


def scores_at(name: str, task: str, step: int) -> np.ndarray:
    """Per-seed returns at the baseline's evaluation nearest ``step`` (empty if it lacks the task)."""
    nearest = nearest_step(name, task, step)
    if nearest is None:
        return np.zeros(0)
    return np.array([s[nearest] for _, s in sorted(table()[name][task].items())])


def curve(name: str, task: str, max_step: int) -> tuple[np.ndarray, np.ndarray]:
    """The baseline's evaluation steps before ``max_step`` and the first at or beyond it (so that its curve
    reaches the end of the user's runs), and the per-seed returns there, shape (seeds, steps)."""
    common = steps(name, task)
    kept = [s for s in common if s < max_step] + [s for s in common if s >= max_step][:1]
    values = [[seed[s] for s in kept] for _, seed in sorted(table()[name].get(task, {}).items())]
    return np.array(kept, dtype=np.int64), np.array(values, float).reshape(len(values), len(kept))
