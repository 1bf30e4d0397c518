"""Command line: ``sparserl train | sweep | report | inspect | diagnose | ls | demo``.

User mistakes (unknown key, bad value, unknown env, occupied run directory) print one line
``sparserl: error: ...`` and exit with code 2, before anything is computed or written.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
from typing import Any

from sparserl import backend, preflight
from sparserl.config import PRESET_DIR, Config, ConfigError, from_args, parse_overrides
from sparserl.baselines import SOURCES as BASELINES
from sparserl.report import REPORT_OPTIONS
from sparserl.sweep import SWEEP_KEYS, bundled_presets

EXIT_USAGE = 2
MAX_PLASTICITY_STEPS = 10_000_000
MAX_INITS = 10_000
# The config keys `diagnose --simplicity` reads (anything else would be ignored silently).
SIMPLICITY_KEYS = ("arch", "critic.blocks", "seed", "sparsity.method", "sparsity.budget", "sparsity.draw")
EXIT_FAULT = 3  # a run stopped on NaN/inf; its last good checkpoint is kept
EXIT_DISK_FULL = 4  # the disk filled up; the previous checkpoint is kept, rerun to resume

TRAIN_EPILOG = textwrap.dedent("""\
    examples:
      sparserl train env=cartpole-balance env_steps=20000 critic.width=256
      sparserl train humanoid_run actor.sparsity=0.9 critic.sparsity=0.9 seed=1   # a bundled preset + overrides
      sparserl train agent=ddpg env=dog-trot critic.width=2048 critic.blocks=3 actor.sparsity=0.9 critic.sparsity=0.9
      sparserl train env=gym:HalfCheetah-v5 action_repeat=1
      sparserl train stream_ac env=gym:Walker2d-v5                              # streaming Stream AC(λ), sparse init
      sparserl train env=cartpole-balance seeds=0,1,2,3 run_dir=runs/cp   # runs/cp/seed0 ... seed3

    Rerunning the same command on an existing run directory resumes it from its last checkpoint.
    Exit codes: 0 done, 2 bad input (nothing written), 3 stopped on NaN/inf or a physics error (last good
    checkpoint kept), 4 out of disk space (previous checkpoint kept; free space and rerun to resume).

    Defaults follow the paper's code, except the exact mask draw (sparsity.draw=bernoulli is the
    paper's); the keys for the deliberate alternatives (docs/fidelity.md): ddpg.policy_noise=0
      (noiseless DDPG losses), update_every=N, weight_decay_on=kernels, diag_probe=fixed,
      drqv2.std_steps=N, sparsity.budget=kernels;
      `sparserl inspect ...` names the non-reference options a config uses.
    A run directory is never shared: overwrite=true replaces only a sparserl run (never other files),
    name= is a plain file name under runs/, and one process at a time trains a run directory.

    Bundled run presets (sparserl/presets/; or give any YAML file's path): """) + ", ".join(
    p.stem for p in sorted(PRESET_DIR.glob("*.yaml"))) + textwrap.dedent("""

    Every key, its default and allowed values: docs/config.md (or `sparserl inspect --keys`).""")

INSPECT_EPILOG = textwrap.dedent("""\
    examples:
      sparserl inspect                                  # default SAC on humanoid-run (4,394,923 params)
      sparserl inspect actor.sparsity=0.9 critic.sparsity=0.9 --json
      sparserl inspect critic.width=2048 critic.blocks=3 actor.width=1024 actor.sparsity=0.9 critic.sparsity=0.9 --no-flops""")

DIAGNOSE_EPILOG = textwrap.dedent("""\
    examples:
      sparserl diagnose runs/sac-humanoid-run-a128x1s0-c512x2s0-seed0
      sparserl diagnose runs/dense runs/sparse --plasticity --plasticity-steps 1000
      sparserl diagnose --simplicity arch=simba --widths 128,512,2048 --sparsities 0,0.8,0.9""")

SWEEP_EPILOG = textwrap.dedent("""\
    examples:
      sparserl sweep scaling_sac --dry-run                      # grid, parameter counts and FLOPs at full scale
      sparserl sweep scaling_sac scale=small --dry-run --bench benchmarks/results/cpu_2core.json
      sparserl sweep scaling_sac scale=smoke                    # about a minute, then: sparserl report runs/sweeps/scaling_sac-smoke
      sparserl sweep sparsity_sweep scale=small seeds=0,1,2 env=[cartpole-swingup,cartpole-balance]
      sparserl sweep my_grid.yaml executor=ray address=auto gpus_per_run=0.5
      sparserl sweep scaling_sac executor=slurm slurm.partition=gpu gpus_per_run=1 slurm.time=720   # a Slurm job array

    sweep options (everything else is a config key applied to every run; naming an axis replaces it):
    """) + "\n".join(f"      {k:<13} {v}" for k, v in SWEEP_KEYS.items()) + textwrap.dedent("""

    Rerunning a sweep skips finished runs and resumes interrupted ones.
    Bundled presets (sparserl/presets/experiments/): """) + ", ".join(p.stem for p in bundled_presets())

REPORT_EPILOG = textwrap.dedent("""\
    examples:
      sparserl report runs/sweeps/scaling_sac-smoke            # writes runs/sweeps/scaling_sac-smoke/report/
      sparserl report runs/sweeps/a runs/sweeps/b --out runs/report-ab
      sparserl report runs/sweeps/scaling_sac-small --bootstrap 5000
      sparserl report runs/sweeps/scaling_sac-small baselines=simba,bro   # published results beside yours

    report options (key=value after the directories):
    """) + "\n".join(f"      {k:<13} {v}" for k, v in REPORT_OPTIONS.items()) + textwrap.dedent("""

    Published baselines (DMC, released by the SimbaV2 authors, Apache-2.0; see docs/report.md): """) + ", ".join(
    BASELINES)

DEMO_EPILOG = textwrap.dedent("""\
    examples:
      sparserl demo                       # SAC learns cartpole-swingup, dense vs sparse, 2 seeds each (~2 min)
      sparserl demo workers=1             # one run at a time
      sparserl demo scale=smoke           # plumbing only (nothing learns), about a minute
      sparserl demo sweep_dir=/tmp/demo

    The bundled `demo` sweep preset defines the runs (sparserl sweep demo --dry-run shows them). A rerun
    skips finished runs; the output ends with the report's headline and every run's final return beside
    a uniform random policy's, measured on the task at the start.""")


def _split_args(args: list[str]) -> tuple[str | None, list[str]]:
    """An optional leading preset path (``*.yaml``/``*.yml``), then ``key=value`` overrides."""
    if args and ("=" not in args[0] or args[0].endswith((".yaml", ".yml"))):
        return args[0], args[1:]
    return None, args


def _config(args: list[str], base: dict[str, Any] | None = None) -> Config:
    preset, overrides = _split_args(args)
    prefix = [f"{k}={v}" for k, v in (base or {}).items()]
    return from_args(preset, prefix + overrides)


def cmd_train(ns) -> int:
    from sparserl import interrupt

    with interrupt.handling():  # from here on, a stop signal is a clean stop (exit 75), never a lost run
        return _train(_config(ns.overrides))


def _train(cfg: Config) -> int:
    from sparserl import checkpoint, interrupt, rundir, train

    train.check_run_dirs(cfg)
    preflight.check_model_fits(cfg)  # before anything is allocated or written
    try:
        summaries = train.train(cfg)
    except rundir.NumericalFault as e:
        print(f"sparserl: stopped: {e}", file=sys.stderr)
        return EXIT_FAULT
    except checkpoint.DiskFull as e:
        print(f"sparserl: stopped: {e}", file=sys.stderr)
        return EXIT_DISK_FULL
    except interrupt.Interrupted as e:
        print(f"sparserl: {e}", file=sys.stderr)
        return interrupt.EXIT_INTERRUPTED
    for c, summary in zip(cfg.per_seed(), summaries if isinstance(summaries, list) else [summaries]):
        print(f"final_return {summary['final_return']:.1f} ± {summary['final_return_ci95']:.1f} (95% CI, "
              f"{summary['final_eval_episodes']} episodes); run directory: {c.resolved_run_dir}")
    return 0


def cmd_inspect(ns) -> int:
    if ns.keys:
        from sparserl.config import reference_table

        print(reference_table())
        return 0
    from sparserl import inspection

    cfg = _config(ns.overrides)
    report = inspection.inspect(cfg, flops=not ns.no_flops)
    if ns.json:
        print(json.dumps(report, indent=1))
    else:
        print(inspection.format_table(report))
    return 0


def cmd_diagnose(ns) -> int:
    from pathlib import Path

    from sparserl import diagnose

    if not 1 <= ns.plasticity_steps <= MAX_PLASTICITY_STEPS:
        raise ConfigError(f"--plasticity-steps={ns.plasticity_steps}: must be an integer in [1, {MAX_PLASTICITY_STEPS:,}]")
    if ns.simplicity:
        try:
            widths = [int(w) for w in ns.widths.split(",")]
            sparsities = [float(x) for x in ns.sparsities.split(",")]
        except ValueError:
            widths, sparsities = [], []
        if not widths or not sparsities or any(w <= 0 for w in widths) or any(not 0 <= x < 1 for x in sparsities):
            raise ConfigError(f"--widths={ns.widths!r} --sparsities={ns.sparsities!r}: comma-separated positive "
                              f"integers and numbers in [0, 1), e.g. --widths 64,256 --sparsities 0,0.9")
        if not 1 <= ns.inits <= MAX_INITS:
            raise ConfigError(f"--inits={ns.inits}: must be an integer in [1, {MAX_INITS}]")
        preset, overrides = _split_args(ns.targets)
        unused = [k for k in parse_overrides(overrides) if k not in SIMPLICITY_KEYS]
        if unused:  # e.g. critic.width: the widths are --widths
            raise ConfigError(f"{unused[0]}: not used by --simplicity, which reads {', '.join(SIMPLICITY_KEYS)} "
                              f"(widths and sparsities: --widths, --sparsities)")
        base = _config(ns.targets, {"env": "cartpole-balance"})
        preflight.check_output_dir(Path(ns.out), "--out")  # before any work
        preflight.check_simplicity_fits(widths, base.critic.blocks, base.arch)
        rows = diagnose.simplicity_grid(widths, sparsities, base, ns.inits, Path(ns.out))
        print(f"{'width':>6} {'sparsity':>8} {'simplicity':>10}")
        for r in rows:
            print(f"{r['width']:>6} {r['sparsity']:>8g} {r['simplicity']:>10.4f}")
        print(f"plot: {Path(ns.out) / 'simplicity.png'}")
        return 0
    if not ns.targets:
        raise ConfigError("diagnose: give one or more RUN_DIRs, or --simplicity")
    from sparserl import runs

    for target in ns.targets:
        run_dir = Path(target)
        if not run_dir.is_dir():
            raise ConfigError(f"RUN_DIR {target!r}: " + ("not a directory" if run_dir.exists() else "no such directory"))
        if (run_dir / "config.yaml").exists():
            runs.read_config(run_dir)  # a damaged config.yaml: one line, before any work
        preflight.check_output_dir(run_dir / "diagnose", f"RUN_DIR {target!r}: diagnose/")
    for target in ns.targets:
        result = diagnose.diagnose_run(Path(target), ns.plasticity_steps if ns.plasticity else None)
        print(f"== {target} (env step {result['env_step']})")
        for k, v in result.items():
            if k not in ("run_dir", "env_step"):
                print(f"  {k:<36} {v:.6g}")
        print(f"  written: {Path(target) / 'diagnose'}/ (metrics.json, layer_norms.json, cosine_*.npy, cosine_*.png)")
    return 0


def cmd_ls(ns) -> int:
    from pathlib import Path

    from sparserl import runs

    root = Path(ns.runs_dir)
    if not root.is_dir():
        raise ConfigError(f"RUNS_DIR {ns.runs_dir!r}: " + ("not a directory" if root.exists() else "no such directory"))
    found = runs.find_runs(root)
    if not found:
        print(f"no runs under {root}")
        return 0
    print(runs.format_table([runs.describe(d, root) for d in found]))
    return 0


def cmd_sweep(ns) -> int:
    from pathlib import Path

    from sparserl import sweep

    path = sweep.resolve_preset(ns.preset)
    options, overrides = sweep.split_args(ns.overrides)
    opts = sweep.parse_options(options, str(path))
    grid = sweep.expand(path, opts["scale"], overrides)
    if ns.device_gflops is not None and not (math.isfinite(ns.device_gflops) and ns.device_gflops > 0):
        raise ConfigError(f"--device-gflops={ns.device_gflops}: must be a positive number of GFLOP/s")
    if (ns.bench or ns.device_gflops is not None) and not ns.dry_run:
        raise ConfigError(f"{'--bench' if ns.bench else '--device-gflops'}: only used with --dry-run")
    if opts["slurm_options"] and opts["executor"] != "slurm":
        raise ConfigError(f"{sorted(opts['slurm_options'])[0]}: only used with executor=slurm")
    if ns.dry_run:
        rate = sweep.rate_from_bench(ns.bench) if ns.bench else ns.device_gflops
        sweep.dry_run(grid, rate)
        if opts["executor"] == "slurm":
            sweep.dry_run_slurm(grid, Path(opts["sweep_dir"]), opts)
        return 0
    from sparserl import loggers

    for point in grid.points:  # e.g. log.wandb=true without credentials: refused here, not in every run's log
        loggers.check_available(point.config(point.seeds[0], Path(opts["sweep_dir"])))
    result = sweep.execute(grid, Path(opts["sweep_dir"]), opts["executor"], opts["workers"], opts["group_seeds"],
                           opts["retry_failed"], opts["address"], opts["cpus_per_run"], opts["gpus_per_run"],
                           slurm_options=opts["slurm_options"])
    print(f"report: sparserl report {opts['sweep_dir']}")
    return 1 if result["failed"] else 0


def cmd_report(ns) -> int:
    from pathlib import Path

    from sparserl import report

    if not report.MIN_BOOTSTRAP <= ns.bootstrap <= report.MAX_BOOTSTRAP:
        raise ConfigError(f"--bootstrap={ns.bootstrap}: use between {report.MIN_BOOTSTRAP} and "
                          f"{report.MAX_BOOTSTRAP:,} resamples")
    dirs, baseline_names = report.parse_args(ns.dirs)
    out = report.write_report(dirs, Path(ns.out) if ns.out else None, ns.bootstrap, baseline_names)
    print((out / "headline.txt").read_text(), end="")
    print(f"report: {out / 'report.html'}")
    return 0


def cmd_demo(ns) -> int:
    from sparserl import demo

    demo.run(ns.overrides)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line ``sparserl: error: ...`` (exit 2), like every other mistake."""

    def error(self, message: str):
        print(f"sparserl: error: {' '.join(message.split())} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sparserl",
        description="Train, sweep, report on and diagnose statically sparse deep-RL agents "
                    "(SAC, DDPG on SimBa networks; streaming Stream AC(λ)).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `sparserl COMMAND --help` for the options and examples of a command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train one agent", epilog=TRAIN_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train one agent and write runs/<name>/ (config.yaml, metrics.csv, "
                                   "model.json, summary.json).")
    p.add_argument("overrides", nargs="*", metavar="[PRESET.yaml] key=value",
                   help="an optional YAML preset, then config overrides")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", help="run an experiment preset's grid (local process pool or Ray)",
                       epilog=SWEEP_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Expand an experiment preset (a bundled NAME or a YAML path) into runs "
                                   "under one sweep directory and train them; finished runs are skipped, interrupted "
                                   "ones resumed, a failed run is reported with its log and the others carry on.")
    p.add_argument("preset", metavar="PRESET", help="bundled experiment name (e.g. scaling_sac) or a YAML path")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="sweep options and config overrides")
    p.add_argument("--dry-run", action="store_true", help="print the grid with parameter counts and FLOPs; run nothing")
    p.add_argument("--bench", metavar="JSON", help="with --dry-run: estimate hours from this `make bench` result")
    p.add_argument("--device-gflops", type=float, metavar="X",
                   help="with --dry-run: estimate hours at X achieved GFLOP/s (e.g. a GPU's measured rate)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="HTML report with IQM, CIs, scaling and learning curves of run directories",
                       epilog=REPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Read run directories (a sweep directory, or any directories holding runs) and "
                                   "write report.html, PNG figures and summary.csv.")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="sweep or run directories; then baselines=NAME,...")
    p.add_argument("--out", help="output directory (default: DIR/report for one DIR, else runs/report)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples for the CIs (default 2000)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("inspect", help="parameter counts, per-layer sparsity and FLOPs of a config",
                       epilog=INSPECT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Build the networks and masks of a config (no training) and print "
                                   "per-module totals, non-zero parameters and per-layer sparsity.")
    p.add_argument("overrides", nargs="*", metavar="[PRESET.yaml] key=value")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    p.add_argument("--no-flops", action="store_true", help="skip compiling the update for its FLOP count")
    p.add_argument("--keys", action="store_true", help="list every config key with default and meaning")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("diagnose", help="diagnostics of saved runs, plasticity probe, simplicity scores",
                       epilog=DIAGNOSE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Recompute srank, dormant ratios, norms and gradient interference from a run's "
                                   "last checkpoint (RUN_DIR/diagnose/), optionally the plasticity probe; or "
                                   "score the simplicity of fresh networks over widths x sparsities.")
    p.add_argument("targets", nargs="*", metavar="RUN_DIR | key=value",
                   help="run directories; with --simplicity, config overrides (arch=, critic.blocks=, sparsity.*)")
    p.add_argument("--plasticity", action="store_true", help="also fit a copy of the critic to random targets")
    p.add_argument("--plasticity-steps", type=int, default=500, help="steps of the plasticity probe (default 500)")
    p.add_argument("--simplicity", action="store_true", help="simplicity scores over --widths x --sparsities")
    p.add_argument("--widths", default="64,128,256,512", help="comma-separated widths (default 64,128,256,512)")
    p.add_argument("--sparsities", default="0,0.5,0.9", help="comma-separated sparsities (default 0,0.5,0.9)")
    p.add_argument("--inits", type=int, default=5, help="random initialisations averaged per point (default 5)")
    p.add_argument("--out", default="runs/simplicity", help="where --simplicity writes its plot and JSON")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("ls", help="table of the runs under a directory, with their status",
                       epilog="examples:\n  sparserl ls\n  sparserl ls runs/sweep1",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="List run directories (name, env, agent, widths, sparsities, env steps done, "
                                   "last eval return, status: running / finished / failed / interrupted).")
    p.add_argument("runs_dir", nargs="?", default="runs", metavar="RUNS_DIR", help="default: runs")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("demo", help="SAC learning in minutes, dense vs sparse, and its report",
                       epilog=DEMO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train SAC on cartpole-swingup with a dense and a 90%% sparse actor and critic "
                                   "(two seeds each; the bundled demo preset), then write its report.html.")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="sweep options and config overrides")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    # key=value after an option (`sweep P --dry-run scale=small`) belongs to the overrides too.
    if extra and hasattr(ns, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        ns.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return ns.func(ns)
    except ConfigError as e:
        print(f"sparserl: error: {' '.join(str(e).split())}", file=sys.stderr)  # always one line
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("sparserl: interrupted", file=sys.stderr)
        return 130


def console_main() -> int:
    """The ``sparserl`` command: :func:`main` in a process whose malloc uses huge pages."""
    try:
        backend.restart_with_huge_pages()
    except ConfigError as e:  # a bad SPARSERL_BACKEND
        print(f"sparserl: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return main()


if __name__ == "__main__":
    sys.exit(console_main())
