"""``sparserl sweep``: expand an experiment preset into runs and execute them, locally or on Ray.

A preset (bundled: ``sparserl/presets/experiments/*.yaml``) is a grid::

    description: one line
    base: {agent: sac, env_steps: 1000000}         # config keys set for every run
    grid:                                          # axes; the sweep is their Cartesian product
      env: [humanoid-run, dog-run]                 # an axis named by a config key: its values
      model:                                       # any other axis: dicts of keys set together,
        - {label: 4.5M, critic.width: 512}         #   with an optional short label
        - {label: 109M, actor.width: 1024, critic.width: 2048, critic.blocks: 3}
      actor.sparsity+critic.sparsity: [0.0, 0.9]   # a tied axis: each value sets both keys
      seed: [0, 1, 2, 3, 4]
    scales:                                        # variants merged over the full-scale definition:
      small: {base: {env_steps: 100000}, grid: {env: [cartpole-swingup]}}   # base updated, axes replaced
      smoke: {base: {env_steps: 2000}, grid: {seed: [0]}}                   # (an axis set to null is removed)

Every grid point except its seed is one *point*; its runs are ``SWEEP_DIR/<point>/seed<k>``, the
same layout as a multi-seed ``sparserl train``. The sweep directory also holds ``sweep.yaml`` (the
expanded grid, read by ``sparserl report``), ``logs/`` (one log per process) and
``sweep_status.json`` (finished / failed / skipped, rewritten as runs end).

Runs are separate processes (``sparserl train``): a crash or a NaN stops one run, not the sweep, and
the run's log path is reported. Rerunning the same command skips finished runs and resumes
interrupted ones from their last checkpoint; runs that stopped on a numerical fault are reported
as failed and left alone unless ``retry_failed=true`` (which starts them over).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from sparserl import backend, config, runs
from sparserl.config import ConfigError

SCALES = ("full", "small", "smoke")
EXECUTORS = ("local", "ray", "slurm")
PRESET_DIR = config.PRESET_DIR / "experiments"  # bundled experiment presets (package data)

# Keys of the sweep itself (everything else on the command line is a config key for every run).
SWEEP_KEYS = {
    "scale": "full (paper scale), small (about an hour on a 2-core CPU) or smoke (about a minute)",
    "executor": "local (a process pool on this machine), ray, or slurm (one job array; see docs/cluster.md)",
    "address": "Ray cluster address for executor=ray: local (start one here), auto, or ray://host:port",
    "workers": "local executor: runs at once (auto: CPU cores, or 1 with a GPU)",
    "group_seeds": "auto|true|false: train a point's seeds in one process (vmapped on GPU; auto = with a GPU)",
    "cpus_per_run": "Ray and Slurm: CPUs each run declares (default 1)",
    "gpus_per_run": "GPUs each run gets (default 0; below 1, e.g. 0.25, runs share a GPU: JAX's memory is capped to the share)",
    "sweep_dir": "where runs go (default runs/sweeps/<preset>-<scale>)",
    "retry_failed": "true: start runs that stopped on a numerical fault over (default false)",
    "slurm.partition": "executor=slurm: partition (default: the cluster's default)",
    "slurm.account": "executor=slurm: account to charge (default: yours)",
    "slurm.time": "executor=slurm: time limit per job in minutes (default 1440); longer runs requeue and resume",
    "slurm.mem_gb": "executor=slurm: memory per job in GB (default 8)",
    "slurm.parallelism": "executor=slurm: array tasks running at once (default 64)",
    "slurm.signal_lead": "executor=slurm: seconds before the time limit that Slurm signals a checkpoint (default 180)",
    "slurm.sbatch": "executor=slurm: extra sbatch options, e.g. \"--qos=high --constraint=a100\"",
}


@dataclasses.dataclass(frozen=True)
class Point:
    """One configuration of the grid, with the seeds it is trained with."""

    name: str  # directory name under the sweep directory
    labels: dict[str, str]  # axis -> label of its value at this point
    values: dict[str, Any]  # flat config keys -> values (base and axes; no seed)
    seeds: tuple[int, ...]

    def run_dir(self, sweep_dir: Path, seed: int) -> Path:
        return sweep_dir / self.name / f"seed{seed}"

    def config(self, seed: int, sweep_dir: Path) -> config.Config:
        return config.build({**self.values, "seed": seed, "run_dir": str(self.run_dir(sweep_dir, seed))})


@dataclasses.dataclass(frozen=True)
class Sweep:
    preset: str
    scale: str
    description: str
    axes: tuple[str, ...]  # the axes that vary (seed excluded)
    points: tuple[Point, ...]

    @property
    def num_runs(self) -> int:
        return sum(len(p.seeds) for p in self.points)


# ----------------------------------------------------------------------------------------------
# Presets and grid expansion


def resolve_preset(name: str) -> Path:
    """A preset path, or the name of a bundled experiment preset (``scaling``, ``sparsity_sweep`` ...)."""
    path = Path(name)
    if path.is_file():
        return path
    bundled = PRESET_DIR / f"{name}.yaml"
    if bundled.is_file():
        return bundled
    known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"preset {name!r}: no such file or bundled experiment{config.suggest(name, known)} "
                      f"(bundled: {', '.join(known)})")


def bundled_presets() -> list[Path]:
    return sorted(PRESET_DIR.glob("*.yaml"))


def load(path: str | Path, scale: str = "full") -> dict[str, Any]:
    """The preset's ``description``, ``base`` and ``grid`` at ``scale`` (variants merged)."""
    path = Path(path)
    if scale not in SCALES:
        raise ConfigError(f"scale={scale!r}: must be one of {', '.join(SCALES)}")
    what = f"preset {str(path)!r}"
    data = config.read_yaml(path, what) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: expected a mapping with keys description, base, grid, scales "
                          f"(got a {type(data).__name__})")
    unknown = set(data) - {"description", "base", "grid", "scales"}
    if unknown:
        raise ConfigError(f"{what}: top-level keys are description, base, grid, scales "
                          f"(got {', '.join(sorted(map(str, unknown)))})")

    def mapping(value: Any, where: str) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{what}: {where} must be a mapping (got a {type(value).__name__})")
        return value

    base = config.flatten_unique(mapping(data.get("base"), "base"), f"{what}: base")
    grid = {str(k): v for k, v in mapping(data.get("grid"), "grid").items()}
    scales = mapping(data.get("scales"), "scales")
    if scale != "full":
        variant = scales.get(scale)
        if variant is None:
            raise ConfigError(f"scale={scale}: preset {str(path)!r} defines no such variant "
                              f"(has: full, {', '.join(map(str, scales))})")
        variant = mapping(variant, f"scales.{scale}")
        base.update(config.flatten_unique(mapping(variant.get("base"), f"scales.{scale}.base"),
                                          f"{what}: scales.{scale}.base"))
        for axis, values in mapping(variant.get("grid"), f"scales.{scale}.grid").items():
            if values is None:
                grid.pop(str(axis), None)
            else:
                grid[str(axis)] = values
    return {"description": data.get("description", ""), "base": base, "grid": grid}


def _axis_values(axis: str, values: Any, keys: dict) -> list[tuple[str, dict[str, Any]]]:
    """(label, {config key: value}) for each value of an axis.

    An axis named by several config keys joined with ``+`` (``actor.sparsity+critic.sparsity``) is a
    tied axis: each of its values sets every one of those keys.
    """
    if not isinstance(values, list) or not values:
        raise ConfigError(f"grid.{axis}: expected a non-empty list of values")
    tied = tied_keys(axis)
    for k in tied:
        if k not in keys:
            raise ConfigError(f"grid.{axis}: {k!r} is not a config key{config.suggest(k, keys)}")
    out = []
    for v in values:
        if isinstance(v, dict):
            v = dict(v)
            label = str(v.pop("label", ",".join(f"{k}={config.format_value(x)}" for k, x in v.items())))
            out.append((label, config.flatten(v)))
        elif tied:
            out.append((config.format_value(v), {k: v for k in tied}))
        elif axis in keys:
            out.append((config.format_value(v), {axis: v}))
        else:
            raise ConfigError(f"grid.{axis}: not a config key{config.suggest(axis, keys)}; an axis with another "
                              f"name must list dicts of config keys (e.g. - {{label: big, critic.width: 2048}})")
    labels = [label for label, _ in out]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"grid.{axis}: values must have distinct labels (got {labels})")
    return out


def tied_keys(axis: str) -> tuple[str, ...]:
    """The config keys of a tied axis ``a+b`` (every value sets all of them); () for other axes."""
    return tuple(k.strip() for k in axis.split("+")) if "+" in axis else ()


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-._=+" else "_" for c in text)


def expand(path: str | Path, scale: str = "full", overrides: dict[str, Any] | None = None) -> Sweep:
    """The grid of a preset at ``scale``, with ``overrides`` (config keys) applied to every run.

    An override naming an axis replaces that axis (a YAML list such as ``[a, b]`` gives several
    values); ``seed``/``seeds`` choose the seeds. Every run's config is built (validated) here.
    """
    preset = load(path, scale)
    keys = config.schema()
    grid = dict(preset["grid"])
    overrides = dict(overrides or {})
    if "seeds" in overrides:  # seeds=0,1,2 on the command line chooses the seed axis
        raw = str(overrides.pop("seeds"))
        try:
            grid["seed"] = [int(s) for s in raw.split(",") if s.strip()]
        except ValueError:
            raise ConfigError(f"seeds={raw!r}: expected integers separated by commas, e.g. 0,1,2") from None
    for key, raw in list(overrides.items()):
        value = raw
        if isinstance(raw, str) and raw.strip().startswith("["):
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                raise ConfigError(f"{key}={raw}: malformed or unterminated list; write e.g. {key}=[a,b]") from None
        if key in grid or key == "seed":
            grid[key] = value if isinstance(value, list) else [value]
            del overrides[key]
        elif isinstance(value, list):
            raise ConfigError(f"{key}={raw}: a list of values is only allowed for an axis of the grid "
                              f"(axes: {', '.join(grid)})")
        else:
            tied = next((a for a in grid if key in tied_keys(a)), None)
            if tied:  # setting one key of a tied axis would silently untie it
                raise ConfigError(f"{key}={raw}: set together with {' and '.join(k for k in tied_keys(tied) if k != key)} "
                                  f"by the grid axis {tied}; replace that axis instead ({tied}=[{raw}])")
    for key in ("run_dir", "name", "num_seeds"):
        if key in overrides or key in preset["base"]:
            raise ConfigError(f"{key}: set by the sweep for each run; use sweep_dir= for where runs go")
    seeds = grid.pop("seed", [preset["base"].get("seed", 0)])
    seeds = [int(s) if isinstance(s, str) and s.isdigit() else s for s in seeds] if isinstance(seeds, list) else seeds
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ConfigError(f"grid.seed={seeds!r}: expected a list of distinct non-negative integers")
    axes = {axis: _axis_values(axis, values, keys) for axis, values in grid.items()}
    varying = tuple(a for a, vals in axes.items() if len(vals) > 1)
    base = {k: v for k, v in preset["base"].items() if k != "seed"}
    points, names = [], set()
    for combo in itertools.product(*axes.values()):
        values, labels = dict(base), {}
        for axis, (label, settings) in zip(axes, combo):
            values.update(settings)
            labels[axis] = label
        values.update(overrides)
        name = ",".join(f"{a}={_safe(labels[a])}" for a in varying) or "default"
        if name in names:
            raise ConfigError(f"grid: two points are both named {name!r}; give axis values distinct labels")
        names.add(name)
        point = Point(name, labels, values, tuple(seeds))
        for s in seeds:  # validate every run before anything runs
            point.config(s, Path("."))
        points.append(point)
    return Sweep(Path(path).stem, scale, preset["description"], varying, tuple(points))


# ----------------------------------------------------------------------------------------------
# Dry run: sizes and cost of every point, without training


def point_cost(point: Point) -> dict[str, Any]:
    """Total and non-zero parameters and FLOPs of one point, from abstract shapes (nothing allocated)."""
    from sparserl import inspection

    return inspection.abstract_cost(point.config(point.seeds[0], Path(".")))


def dry_run(sweep: Sweep, rate_gflops: float | None, out: Callable[[str], None] = print) -> list[dict]:
    rows = []
    for p in sweep.points:
        cost = point_cost(p)
        total_flops = cost["total_flops"] * len(p.seeds)
        hours = total_flops / (rate_gflops * 1e9) / 3600 if rate_gflops else None
        rows.append({"point": p.name, "seeds": len(p.seeds), **cost, "sweep_flops": total_flops, "hours": hours})
    width = max([len("point")] + [len(r["point"]) for r in rows])
    out(f"{sweep.preset} ({sweep.scale}): {len(rows)} points x seeds = {sweep.num_runs} runs"
        + (f" — {sweep.description}" if sweep.description else ""))
    out(f"{'point':<{width}}  {'seeds':>5}  {'params':>13}  {'non-zero':>13}  {'GFLOP/update':>12}  {'PFLOP (all seeds)':>17}"
        + ("  est. hours" if rate_gflops else ""))
    for r in rows:
        out(f"{r['point']:<{width}}  {r['seeds']:>5}  {r['total_params']:>13,}  {r['nonzero_params']:>13,}  "
            f"{r['flops_per_update'] / 1e9:>12.2f}  {r['sweep_flops'] / 1e15:>17.3f}"
            + (f"  {r['hours']:>10.2f}" if rate_gflops else ""))
    total = sum(r["sweep_flops"] for r in rows)
    line = f"total: {total / 1e15:.3f} PFLOP of updates"
    if rate_gflops:
        line += f", about {total / (rate_gflops * 1e9) / 3600:.1f} device-hours at {rate_gflops:.0f} GFLOP/s achieved"
    out(line)
    return rows


def dry_run_slurm(sweep: Sweep, sweep_dir: Path, opts: dict, out: Callable[[str], None] = print) -> list[Job]:
    """What ``executor=slurm`` would submit now: the array's sbatch options and each task's command
    (runs already finished, failed or queued are left out, as the real submission would)."""
    from sparserl import slurm

    params = slurm.parameters(slurm.parse(opts["slurm_options"]), opts["cpus_per_run"], opts["gpus_per_run"])
    sweep_dir = sweep_dir.resolve()
    jobs, _ = plan(sweep, sweep_dir, bool(opts["group_seeds"]), opts["retry_failed"], slurm.queued_runs(sweep_dir))
    out(slurm.describe(params, len(jobs)))
    for i, job in enumerate(jobs):
        out(f"  task {i}: {' '.join(job.command(sweep_dir))}  > {job.log}")
    return jobs


def rate_from_bench(path: str | Path) -> float:
    """The achieved update GFLOP/s of a ``make bench`` JSON (mean over its model sizes)."""
    try:
        data = json.loads(Path(path).read_bytes().decode("utf-8"))
        rates = [float(u["achieved_gflops"]) for u in data["updates"]]
        if not rates or not all(math.isfinite(r) and r > 0 for r in rates):
            raise ValueError("no positive achieved_gflops")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())[:80]
        raise ConfigError(f"--bench {str(path)!r}: not a benchmark JSON from `make bench` ({reason})") from None
    return sum(rates) / len(rates)


# ----------------------------------------------------------------------------------------------
# Execution


@dataclasses.dataclass
class Job:
    """One process: one seed, or several seeds of a point trained together."""

    point: Point
    seeds: tuple[int, ...]
    log: Path
    fresh: bool = False  # start over (retry_failed)

    @property
    def label(self) -> str:
        return f"{self.point.name}/" + ("seed" + ",".join(map(str, self.seeds)))

    def command(self, sweep_dir: Path) -> list[str]:
        spec = sweep_dir / self.point.name / "point.yaml"
        args = [sys.executable, "-m", "sparserl.cli", "train", str(spec), "progress=false"]
        if len(self.seeds) == 1:
            args += [f"seed={self.seeds[0]}", f"run_dir={self.point.run_dir(sweep_dir, self.seeds[0])}"]
        else:
            args += [f"seeds={','.join(map(str, self.seeds))}", f"run_dir={sweep_dir / self.point.name}"]
        if self.fresh:
            args.append("overwrite=true")
        return args


def has_gpu() -> bool:
    """Whether a CUDA JAX could use a GPU here — decided without initialising JAX in this process
    (which would take the GPU's memory away from the runs)."""
    import importlib.util

    return shutil.which("nvidia-smi") is not None and any(
        importlib.util.find_spec(m) is not None for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins"))


def plan(sweep: Sweep, sweep_dir: Path, group_seeds: bool, retry_failed: bool,
         queued: frozenset[str] = frozenset()) -> tuple[list[Job], dict[str, list[str]]]:
    """Jobs to run, and the runs skipped (finished / failed / running elsewhere / ``queued``: a
    scheduler still holds their job), by status."""
    from sparserl import rundir

    jobs, skipped = [], {"finished": [], "failed": [], "running": [], "queued": []}
    for p in sweep.points:
        todo: dict[str, list[int]] = {}  # by status: seeds trained together must all start or all resume
        fresh = []
        for s in p.seeds:
            run_dir = p.run_dir(sweep_dir, s)
            status = runs.run_status(run_dir) if (run_dir / "config.yaml").is_file() else "new"
            if f"{p.name}/seed{s}" in queued and status != "finished":
                status = "queued"
            if status in ("finished", "running", "queued") or (status == "failed" and not retry_failed):
                skipped[status].append(f"{p.name}/seed{s}")
                continue
            if status == "failed":
                fresh.append(s)
            else:  # new or interrupted: refuses a directory holding a different config, before anything runs
                todo.setdefault(rundir.check(p.config(s, sweep_dir)), []).append(s)
        for seeds in todo.values():
            if group_seeds and len(seeds) > 1:
                jobs.append(Job(p, tuple(seeds), sweep_dir / "logs" / f"{p.name}.seed{'_'.join(map(str, seeds))}.log"))
            else:
                jobs += [Job(p, (s,), sweep_dir / "logs" / f"{p.name}.seed{s}.log") for s in seeds]
        jobs += [Job(p, (s,), sweep_dir / "logs" / f"{p.name}.seed{s}.log", fresh=True) for s in fresh]
    return jobs, skipped


def _child_env(executor: str, gpus_per_run: float) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("MUJOCO_GL", "egl")
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # several runs may share one GPU
    env["SPARSERL_EXECUTOR"] = executor  # recorded in each run's provenance.json
    if 0 < gpus_per_run < 1:
        # runs side by side on one GPU: each may grow to its share (with headroom for CUDA's own use),
        # never to JAX's default 75% that would starve the others
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.95 * gpus_per_run:.3f}"
    return backend.child_env(env)


def run_job(command: list[str], log_path: str, env: dict[str, str]) -> int:
    """Run one training process with its output to ``log_path``; its exit code."""
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, check=False).returncode


def _final_return(sweep_dir: Path, job: Job) -> str:
    values = []
    for s in job.seeds:
        try:
            values.append(json.loads((job.point.run_dir(sweep_dir, s) / "summary.json").read_text())["final_return"])
        except (OSError, ValueError, KeyError):
            pass
    return ", ".join(f"{v:.1f}" for v in values) if values else "?"


class Progress:
    """The sweep's outcome so far: printed as runs end and kept in ``sweep_status.json`` (rewritten
    atomically at every change, so a look at it mid-sweep is current)."""

    def __init__(self, sweep_dir: Path, skipped: list[str], total_jobs: int, out: Callable[[str], None]):
        self.sweep_dir, self.total_jobs, self.out = sweep_dir, total_jobs, out
        self.result: dict[str, list[str]] = {"finished": [], "failed": [], "interrupted": [], "skipped": skipped}
        self.failed_logs: dict[str, str] = {}
        self.slurm_jobs: dict[str, str] = {}  # run -> Slurm job id, with the job's last seen state
        self.started = time.perf_counter()
        self.path = sweep_dir / "sweep_status.json"

    def record(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        data = {**self.result, "failed_logs": self.failed_logs}
        if self.slurm_jobs:
            data["slurm_jobs"] = self.slurm_jobs
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.path)

    def finish(self, job: Job, code: int, done: int) -> None:
        from sparserl import interrupt

        names = [f"{job.point.name}/seed{s}" for s in job.seeds]
        elapsed = time.perf_counter() - self.started
        if code == 0:
            self.result["finished"] += names
            self.out(f"[{done}/{self.total_jobs}] finished {job.label}: final_return "
                     f"{_final_return(self.sweep_dir, job)} ({elapsed:.0f} s into the sweep)")
        elif code == interrupt.EXIT_INTERRUPTED:  # stopped by a signal with a checkpoint: resumable
            self.result["interrupted"] += names
            self.out(f"[{done}/{self.total_jobs}] interrupted {job.label} (checkpoint written; rerun the sweep "
                     f"to resume); log: {job.log}")
        else:
            self.result["failed"] += names
            for n in names:
                self.failed_logs[n] = str(job.log)
            self.out(f"[{done}/{self.total_jobs}] FAILED {job.label} (exit {code}); log: {job.log}")
        self.record()

    def summary(self) -> None:
        r = self.result
        self.out(f"sweep done: {len(r['finished'])} finished, {len(r['failed'])} failed, {len(r['interrupted'])} "
                 f"interrupted, {len(r['skipped'])} skipped ({time.perf_counter() - self.started:.0f} s); "
                 f"status: {self.path}")
        for name, log in self.failed_logs.items():
            self.out(f"  failed: {name} — log: {log}")


def execute(sweep: Sweep, sweep_dir: Path, executor: str = "local", workers: int | None = None,
            group_seeds: bool | None = None, retry_failed: bool = False, address: str = "local",
            cpus_per_run: float = 1.0, gpus_per_run: float = 0.0,
            out: Callable[[str], None] = print, slurm_options: dict | None = None) -> dict[str, list[str]]:
    """Run every unfinished run of ``sweep`` under ``sweep_dir``; returns finished/failed/interrupted/
    skipped lists."""
    if executor not in EXECUTORS:
        raise ConfigError(f"executor={executor!r}: must be one of {', '.join(EXECUTORS)}")
    gpu = has_gpu()
    group_seeds = gpu if group_seeds is None else group_seeds
    from sparserl import preflight

    preflight.check_output_dir(sweep_dir, "sweep_dir")  # before anything is written
    sweep_dir = sweep_dir.resolve()
    slurm_params, queued = None, frozenset()
    if executor == "slurm":
        from sparserl import slurm

        slurm_params = slurm.parameters(slurm.parse(slurm_options or {}), cpus_per_run, gpus_per_run)
        queued = slurm.queued_runs(sweep_dir)
    jobs, skipped = plan(sweep, sweep_dir, group_seeds, retry_failed, queued)  # refuses occupied run dirs
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(sweep, sweep_dir)
    progress = Progress(sweep_dir, [n for names in skipped.values() for n in names], len(jobs), out)
    for status, names in skipped.items():
        if names:
            out(f"skipping {len(names)} {status} run(s)" + (" (retry_failed=true starts them over)" if status == "failed" else ""))
    if not jobs:
        out(f"nothing to run: all {sweep.num_runs} runs of {sweep_dir} are finished, failed, running or queued")
        progress.record()
        return progress.result
    env = _child_env(executor, gpus_per_run)
    out(f"{len(jobs)} process(es) for {sum(len(j.seeds) for j in jobs)} run(s) under {sweep_dir} "
        f"(executor={executor}); logs in {sweep_dir / 'logs'}")
    for job in jobs:
        spec = sweep_dir / job.point.name / "point.yaml"
        spec.parent.mkdir(parents=True, exist_ok=True)
        spec.write_text(yaml.safe_dump(job.point.values, sort_keys=False))
    if executor == "local":
        n = workers or (max(1, int(1 / gpus_per_run)) if gpu and 0 < gpus_per_run < 1 else 1 if gpu
                        else max(1, os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(n, len(jobs))) as pool:
            futures = {pool.submit(run_job, j.command(sweep_dir), str(j.log), env): j for j in jobs}
            for done, fut in enumerate(concurrent.futures.as_completed(futures), 1):
                progress.finish(futures[fut], fut.result(), done)
    elif executor == "ray":
        _execute_ray(jobs, sweep_dir, env, address, cpus_per_run, gpus_per_run, progress.finish)
    else:
        _execute_slurm(jobs, sweep_dir, env, slurm_params, progress)
    progress.summary()
    return progress.result


def _execute_slurm(jobs: list[Job], sweep_dir: Path, env: dict[str, str], params: dict, progress: Progress) -> None:
    """One job array (see :mod:`sparserl.slurm`); waits for it, keeping ``sweep_status.json`` current
    (each run's job id and state). If this process is stopped, the jobs go on: rerunning the sweep
    command skips the runs whose jobs are still queued or running."""
    from sparserl import slurm

    submitted = slurm.submit(jobs, [j.command(sweep_dir) for j in jobs], [str(j.log) for j in jobs], env,
                             sweep_dir / "slurm", params)
    ids = slurm.read_job_ids(sweep_dir)
    for sub, job in zip(submitted, jobs):
        for s in job.seeds:
            ids[f"{job.point.name}/seed{s}"] = sub.job_id
    slurm.write_job_ids(sweep_dir, ids)
    progress.out(f"submitted job array {submitted[0].job_id.split('_')[0]} ({len(submitted)} tasks); "
                 f"submitit logs in {sweep_dir / 'slurm'}")

    def on_poll(states: dict[str, str]) -> None:
        label = {sub.job_id: job.label for sub, job in zip(submitted, jobs)}
        seen = {label[i]: f"{i} {state}" for i, state in states.items()}
        if seen != {k: v for k, v in progress.slurm_jobs.items() if k in seen}:
            progress.slurm_jobs.update(seen)
            progress.record()

    slurm.wait(submitted, jobs, progress.finish, on_poll)


def _execute_ray(jobs: list[Job], sweep_dir: Path, env: dict[str, str], address: str,
                 cpus: float, gpus: float, finish: Callable[[Job, int, int], None]) -> None:
    """Each job a Ray task declaring its CPU/GPU needs; every task writes into the shared sweep dir."""
    try:
        import ray
    except ImportError:
        raise ConfigError("executor=ray: Ray is not installed; pip install 'sparserl[ray]'") from None
    started_here = not ray.is_initialized()
    if started_here:
        kwargs = {"address": None if address == "local" else address, "include_dashboard": False,
                  "log_to_driver": False}
        if address == "local":
            kwargs["num_cpus"] = max(os.cpu_count() or 1, int(cpus))
        ray.init(**kwargs)
    try:
        task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(run_job)
        refs = {task.remote(j.command(sweep_dir), str(j.log), env): j for j in jobs}
        done = 0
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                done += 1
                try:
                    code = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a lost worker is one failed run, not a failed sweep
                    refs[ref].log.parent.mkdir(parents=True, exist_ok=True)
                    with open(refs[ref].log, "a") as f:
                        f.write(f"ray task failed: {e}\n")
                    code = -1
                finish(refs[ref], code, done)
    finally:
        if started_here:
            ray.shutdown()


def write_manifest(sweep: Sweep, sweep_dir: Path) -> None:
    """``sweep.yaml``: the expanded grid, so a report can label runs by their axes."""
    data = {"preset": sweep.preset, "scale": sweep.scale, "description": sweep.description, "axes": list(sweep.axes),
            "points": [{"name": p.name, "labels": p.labels, "values": p.values, "seeds": list(p.seeds)}
                       for p in sweep.points]}
    (sweep_dir / "sweep.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def split_args(args: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """``key=value`` arguments split into sweep options and config overrides."""
    values = config.parse_overrides(args)
    options = {k: v for k, v in values.items() if k in SWEEP_KEYS}
    return options, {k: v for k, v in values.items() if k not in SWEEP_KEYS}


def parse_options(options: dict[str, str], preset: str) -> dict[str, Any]:
    """Typed sweep options with defaults, each checked (one-line ConfigError)."""
    def choice(key, allowed, default):
        v = options.get(key, default)
        if v not in allowed:
            raise ConfigError(f"{key}={v!r}: must be one of {', '.join(allowed)}")
        return v

    def number(key, default, kind=float, low=0.0):
        raw = options.get(key)
        if raw is None or raw == "auto":
            return default
        try:
            v = kind(raw)
        except ValueError:
            raise ConfigError(f"{key}={raw!r}: expected a {'whole ' if kind is int else ''}number") from None
        if not math.isfinite(v):
            raise ConfigError(f"{key}={raw!r}: must be a finite number")
        if v < low:
            raise ConfigError(f"{key}={raw!r}: must be at least {low:g}")
        return v

    scale = choice("scale", SCALES, "full")
    group = choice("group_seeds", ("auto", "true", "false"), "auto")
    return {
        "scale": scale,
        "executor": choice("executor", EXECUTORS, "local"),
        "address": options.get("address", "local"),
        "workers": number("workers", None, int, 1),
        "group_seeds": None if group == "auto" else group == "true",
        "cpus_per_run": number("cpus_per_run", 1.0),
        "gpus_per_run": number("gpus_per_run", 0.0),
        "retry_failed": choice("retry_failed", ("true", "false"), "false") == "true",
        "slurm_options": {k: v for k, v in options.items() if k.startswith("slurm.")},
        "sweep_dir": Path(options.get("sweep_dir") or Path("runs") / "sweeps" / f"{Path(preset).stem}-{scale}"),
    }
