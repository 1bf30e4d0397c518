"""Derive sparserl/data/baselines_dmc.csv.gz from the SimbaV2 authors' released per-seed results.

Usage: python scripts/make_baselines.py SOURCE_DIR   (SOURCE_DIR holds baseline/*.csv, scaling/param/*.csv and
LICENSE-SimbaV2-results, i.e. the ``results/`` folder of dojeon-ai/SimbaV2 at commit 14fafb2, Apache-2.0).

What it keeps: the DeepMind Control tasks (names mapped to sparserl's ``domain-task``, e.g. ``dog_trot`` and
``dog-trot`` both become ``dog-trot``, ``ball_in_cup-catch`` keeps its domain's underscores), the metric
``avg_return`` only, values rounded to 0.01. Rows keep the released schema
``exp_name, env_name, seed, metric, env_step, value`` with ``exp_name`` set to the baseline's short name
(``sparserl.baselines.SOURCES``, what ``sparserl report ... baselines=NAME`` takes). The gzip header carries no time stamp, so the
same source gives the same bytes. The license notice is copied beside the data file.
"""

from __future__ import annotations

import csv
import gzip
import io
import sys
from pathlib import Path

from sparserl import baselines, envs

ALIASES = {"cup_catch": "ball_in_cup-catch"}  # TD-MPC2's name for the DMC task


def dmc_name_map() -> dict[str, str]:
    """Spelling-insensitive key (lower case, '-' as '_') -> sparserl's DMC task name."""
    names = {name.lower().replace("-", "_"): name for name in envs.dmc_task_names()}
    return {**names, **ALIASES}


def derive_rows(source: Path) -> list[tuple]:
    names = dmc_name_map()
    rows = set()  # a set: a row released twice counts once
    for short, rel in baselines.SOURCES.items():
        with open(source / rel, newline="") as f:
            for r in csv.DictReader(f):
                env = names.get(r["env_name"].lower().replace("-", "_"))
                if env is None or r["metric"] != "avg_return":
                    continue
                rows.add((short, env, int(float(r["seed"])), "avg_return", int(float(r["env_step"])),
                          round(float(r["value"]), 2)))
    return sorted(rows)


def write(rows: list[tuple], path: Path) -> None:
    text = io.StringIO()
    w = csv.writer(text, lineterminator="\n")
    w.writerow(baselines.COLUMNS)
    w.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        gz.write(text.getvalue().encode())


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.splitlines()[2], file=sys.stderr)
        return 2
    source = Path(argv[0])
    rows = derive_rows(source)
    write(rows, baselines.DATA_FILE)
    notice = (f"{baselines.DATA_FILE.name} is derived from the per-seed evaluation results released by the SimbaV2\n"
              "authors (GitHub repository dojeon-ai/SimbaV2, commit 14fafb2, folder results/), under the Apache License 2.0\n"
              "below. Changes: DMC tasks and the avg_return metric only, task names mapped to sparserl's, values\n"
              "rounded to 0.01, exp_name replaced by a short baseline name (scripts/make_baselines.py).\n\n")
    baselines.LICENSE_FILE.write_text(notice + (source / "LICENSE-SimbaV2-results").read_text())
    print(f"{baselines.DATA_FILE}: {len(rows):,} rows, {baselines.DATA_FILE.stat().st_size / 1024:.0f} KiB, "
          f"{len({r[0] for r in rows})} baselines, {len({r[1] for r in rows})} tasks")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
