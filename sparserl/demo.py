"""``sparserl demo``: the smoke scale of the ``scaling_sac`` experiment, then its report.

Four short SAC runs on ``cartpole-balance`` (a 16- and a 64-wide critic, each dense and 90%
sparse) through the same sweep and report code a full experiment uses, so ``make demo`` ends with
a ``report.html`` to open. At this budget (2,000 env steps) nothing learns: the demo shows the
workflow. ``sparserl demo scale=small`` runs the CPU-scale variant (about an hour), whose runs
do learn (see the README for its numbers).
"""

from __future__ import annotations

from pathlib import Path

from sparserl import report, sweep
from sparserl.config import ConfigError

PRESET = "scaling_sac"


def run(args: list[str]) -> Path:
    options, overrides = sweep.split_args(args)
    options.setdefault("scale", "smoke")
    if "sweep_dir" not in options:
        options["sweep_dir"] = str(Path("runs") / "demo" / options["scale"])
    path = sweep.resolve_preset(PRESET)
    opts = sweep.parse_options(options, str(path))
    grid = sweep.expand(path, opts["scale"], overrides)
    print(f"== sparserl demo: {PRESET} at scale={opts['scale']}: {grid.num_runs} runs -> {opts['sweep_dir']}", flush=True)
    result = sweep.execute(grid, Path(opts["sweep_dir"]), opts["executor"], opts["workers"], opts["group_seeds"],
                           opts["retry_failed"], opts["address"], opts["cpus_per_run"], opts["gpus_per_run"])
    if not result["finished"] and not result["skipped"]:
        raise ConfigError(f"demo: every run failed; see the logs under {opts['sweep_dir']}/logs")
    out = report.write_report([Path(opts["sweep_dir"])])
    print(f"\nopen the report: {out / 'report.html'}")
    return out
