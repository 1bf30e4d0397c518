"""``sparserl report``: figures, tables and aggregate statistics of run directories.

Reads run directories only (``config.yaml``, ``summary.json``, ``metrics.csv``, ``diagnostics.csv``,
``cosine_*.npy``, and the sweep's ``sweep.yaml`` for axis labels) and writes, into one folder:

- ``summary.csv``: one row per run (variant, task, seed, parameters, non-zeros, final return, wall time);
- ``report.html``: self-contained page (figures are PNG files next to it; no server needed);
- ``evaluations.csv``: every run's evaluations as ``exp_name, env_name, seed, metric, env_step, value`` (the
  schema of the published baselines' files; ``exp_name`` is the variant);
- ``headline.txt``: the headline sentences (sparse vs dense at each model size), also at the top of the page;
- PNGs: scaling curves (vs total and vs non-zero parameters, dense dashed / sparse solid), sparsity
  sweep, aggregate (IQM over tasks) learning curves, performance profiles, learning curves with 95% CI bands
  (and published baselines, dotted), diagnostics over training, gradient-cosine heatmaps.

Statistics (docs/report.md). Per task: mean final return over seeds with a Student-t 95% CI (scipy). Across
tasks, on scores (DMC return / 1000): rliable's IQM, mean, median and optimality gap, probability of
improvement and performance profiles, with stratified-bootstrap 95% CIs (runs resampled within each task).
"""

from __future__ import annotations

import csv
import html
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparserl import config, runs
from sparserl.config import ConfigError

MIN_BOOTSTRAP, MAX_BOOTSTRAP = 100, 100_000  # resamples of the bootstrap CIs (--bootstrap)

# Keys that say how a run was executed, not what was trained: they never distinguish variants.
RUN_KEYS = {"seed", "seeds", "num_seeds", "seed_parallel", "run_dir", "name", "overwrite", "progress", "resume",
            "checkpoint_every", "keep_checkpoints"}

DMC_MAX_RETURN = 1000.0  # a DMC episode's return lies in [0, 1000]: the score divides by it
BOOTSTRAP_SEED = 0  # the CIs of one report are reproducible


# ----------------------------------------------------------------------------------------------
# Statistics: rliable's aggregates over (runs x tasks) score matrices, scipy's t intervals per task


def mean_ci(values, level: float = 0.95) -> tuple[float, float]:
    """Mean and the half-width of its Student-t CI (0 for a single value)."""
    from scipy import stats

    x = np.asarray(values, float)
    if x.size == 0:
        return float("nan"), float("nan")
    if x.size == 1:
        return float(x[0]), 0.0
    return float(x.mean()), float(stats.t.ppf(0.5 + level / 2, x.size - 1) * stats.sem(x))


def score(env: str, ret: float) -> float:
    """A run's score: DMC return / 1000 (0-1, as in the papers' aggregates); other tasks keep the raw return."""
    from sparserl.envs import GYM_PREFIX

    return ret if env.startswith(GYM_PREFIX) else ret / DMC_MAX_RETURN


def score_matrix(per_task: dict[str, list]) -> np.ndarray:
    """(runs x tasks [x steps]) matrix that rliable bootstraps. rliable needs the same number of runs per
    task: a task with more runs contributes its first ones (by seed) only."""
    n = min(len(v) for v in per_task.values())
    return np.stack([np.asarray(v[:n], float) for _, v in sorted(per_task.items())], axis=1)


def _aggregate_functions():
    from rliable import metrics

    return {"IQM": metrics.aggregate_iqm, "mean": metrics.aggregate_mean, "median": metrics.aggregate_median,
            "optimality gap": metrics.aggregate_optimality_gap}


AGGREGATES = ("IQM", "mean", "median", "optimality gap")


class _GlobalSeed:
    """rliable's stratified bootstrap draws from numpy's global generator: seed it for the call and put
    the caller's state back afterwards."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        self.saved = np.random.get_state()
        np.random.seed(self.seed)

    def __exit__(self, *exc):
        np.random.set_state(self.saved)


def interval_estimates(score_dict: dict, func, reps: int) -> tuple[dict, dict]:
    """rliable's point estimates and stratified-bootstrap 95% percentile CIs of ``func`` for each key."""
    from rliable import library

    with _GlobalSeed(BOOTSTRAP_SEED):
        return library.get_interval_estimates(score_dict, func, reps=reps)


def iqm(scores: np.ndarray, reps: int) -> tuple[float, float, float]:
    """rliable's IQM of a (runs x tasks) matrix with its stratified-bootstrap 95% CI: (point, low, high)."""
    from rliable import metrics

    point, ci = interval_estimates({"x": scores}, metrics.aggregate_iqm, reps)
    low, high = np.ravel(ci["x"])
    return float(point["x"]), float(low), float(high)


def aggregates(scores: np.ndarray, reps: int) -> dict[str, tuple[float, float, float]]:
    """IQM, mean, median and optimality gap of a (runs x tasks) matrix: (point, low, high) each."""
    funcs = _aggregate_functions()
    point, ci = interval_estimates({"x": scores}, lambda s: np.array([funcs[k](s) for k in AGGREGATES]), reps)
    return {k: (float(point["x"][i]), float(ci["x"][0][i]), float(ci["x"][1][i])) for i, k in enumerate(AGGREGATES)}


def probability_of_improvement(x: np.ndarray, y: np.ndarray, reps: int) -> tuple[float, float, float]:
    """P(X > Y): the chance that a run of X beats a run of Y on a random task of the shared set (rliable's
    Mann-Whitney form, ties count half), with its stratified-bootstrap CI (runs of X and Y drawn apart)."""
    from rliable import metrics

    point, ci = interval_estimates({"x,y": (x, y)}, metrics.probability_of_improvement, reps)
    low, high = np.ravel(ci["x,y"])
    return float(point["x,y"]), float(low), float(high)


def iqm_curve(scores: np.ndarray, reps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IQM at each step of a (runs x tasks x steps) matrix, with stratified-bootstrap CIs."""
    from scipy import stats

    # rliable's aggregate_iqm (scipy's 25% trimmed mean over all runs and tasks) at every step in one call.
    point, ci = interval_estimates(
        {"x": scores}, lambda s: stats.trim_mean(s.reshape(-1, s.shape[-1]), 0.25, axis=0), reps)
    return point["x"], ci["x"][0], ci["x"][1]


def _score_distribution(scores: np.ndarray, taus: np.ndarray) -> np.ndarray:
    # rliable's default profile (run_score_deviation: mean(scores > tau)) for every tau at once: its
    # np.vectorize form costs a Python call per tau and resample.
    return (np.asarray(scores).reshape(-1, 1) > np.asarray(taus).reshape(1, -1)).mean(axis=0)


def performance_profile(score_dict: dict[str, np.ndarray], taus: np.ndarray, reps: int) -> tuple[dict, dict]:
    """Fraction of runs scoring above each tau, with stratified-bootstrap CIs (rliable's score distribution)."""
    from rliable import library

    with _GlobalSeed(BOOTSTRAP_SEED):
        return library.create_performance_profile(score_dict, taus, custom_profile_func=_score_distribution,
                                                  reps=reps)


# ----------------------------------------------------------------------------------------------
# Reading runs


@dataclass
class Run:
    path: Path
    cfg: dict[str, Any]  # flat config
    status: str
    summary: dict | None
    metrics: list[dict]
    diagnostics: list[dict]
    labels: dict[str, str] = field(default_factory=dict)  # sweep axis labels, when under a sweep
    variant: str = ""

    @property
    def env(self) -> str:
        return str(self.cfg.get("env", "?"))

    @property
    def seed(self) -> int:
        return int(self.cfg.get("seed", 0))

    def _count(self, key: str) -> int | None:
        if not self.summary:
            return None
        return sum(int(m[key]) for m in self.summary.get("params", {}).values())

    @property
    def total_params(self) -> int | None:
        return self._count("total_params")

    @property
    def nonzero_params(self) -> int | None:
        return self._count("nonzero_params")

    @property
    def final_return(self) -> float | None:
        return float(self.summary["final_return"]) if self.summary else None

    @property
    def sparse(self) -> bool:
        return any(float(v) > 0 for k, v in self.cfg.items() if k.endswith(".sparsity") and v is not None)

    @property
    def critic_params(self) -> int | None:
        critic = (self.summary or {}).get("params", {}).get("critic")
        return int(critic["total_params"]) if critic else None

    @property
    def critic_nonzero(self) -> int | None:
        critic = (self.summary or {}).get("params", {}).get("critic")
        return int(critic["nonzero_params"]) if critic else None

    @property
    def final_step(self) -> int:
        """Env steps the run trained for (its summary's, else its config's budget)."""
        return int((self.summary or {}).get("env_steps") or self.cfg.get("env_steps") or 0)

    def evaluations(self) -> dict[int, float]:
        """env_step -> evaluation return, from metrics.csv."""
        return {int(float(row["env_step"])): float(row["eval_return"]) for row in self.metrics
                if row.get("eval_return") not in (None, "", "nan")}


def _sweep_labels(run_dir: Path) -> dict[str, str]:
    """Axis labels of a run under a sweep directory (SWEEP/<point>/seed<k>), from SWEEP/sweep.yaml."""
    manifest = run_dir.parent.parent / "sweep.yaml"
    if not manifest.is_file():
        return {}
    try:
        data = config.read_yaml(manifest, repr(str(manifest))) or {}
        for p in data.get("points", []):
            if p.get("name") == run_dir.parent.name:
                return {str(k): str(v) for k, v in (p.get("labels") or {}).items()}
    except (ConfigError, AttributeError, TypeError):  # a damaged manifest: label runs by their configs
        return {}
    return {}


def _warn(message: str) -> None:
    print(f"sparserl: warning: {message}", file=sys.stderr, flush=True)


def load_runs(dirs: list[Path], warn=_warn) -> list[Run]:
    """The runs under ``dirs``. A run whose files cannot be read (config.yaml, summary.json,
    metrics.csv, diagnostics.csv) is skipped with one ``warn`` line naming it; none readable is an error."""
    found: list[Path] = []
    for d in dirs:
        if not d.is_dir():
            raise ConfigError(f"{str(d)!r}: " + ("not a directory" if d.exists() else "no such directory"))
        found += runs.find_runs(d)
    if not found:
        raise ConfigError(f"no run directories (holding config.yaml) under {', '.join(map(str, dirs))}")
    out, skipped = [], []
    for path in dict.fromkeys(p.resolve() for p in found):
        try:
            cfg = config.flatten(runs.read_config(path))
            summary = runs.read_summary(path)
            run = Run(path, cfg, runs.run_status(path), summary, runs.read_csv(path / "metrics.csv"),
                      runs.read_csv(path / "diagnostics.csv"), _sweep_labels(path))
            run.env, run.seed, run.sparse  # noqa: B018 - these must parse
        except (ConfigError, OSError, ValueError, TypeError) as e:
            skipped.append(f"unreadable run {str(path)!r}: " + " ".join(str(e).replace(f"{str(path)}{os.sep}", "").split()))
            continue
        out.append(run)
    if not out:  # one line, naming the first
        more = f" (and {len(skipped) - 1} more unreadable run(s))" if len(skipped) > 1 else ""
        raise ConfigError(f"no readable run under {', '.join(map(str, dirs))}: {skipped[0]}{more}")
    for message in skipped:
        warn(f"skipping {message}")
    _name_variants(out)
    return out


def _name_variants(all_runs: list[Run]) -> None:
    """A variant is everything but the task and the seed: sweep axis labels where known, else the
    config keys that differ between runs."""
    varying = sorted(k for k in {k for r in all_runs for k in r.cfg}
                     if k not in RUN_KEYS and k != "env" and len({repr(r.cfg.get(k)) for r in all_runs}) > 1)
    for r in all_runs:
        if r.labels:
            r.variant = ",".join(f"{a}={v}" for a, v in r.labels.items() if a != "env") or "default"
        else:
            r.variant = ",".join(f"{k}={r.cfg.get(k)}" for k in varying) or "default"


# ----------------------------------------------------------------------------------------------
# Aggregation


def by(items, key) -> dict:
    out: dict = {}
    for it in items:
        out.setdefault(key(it), []).append(it)
    return out


def task_table(all_runs: list[Run]) -> list[dict]:
    """Per variant and task: mean final return over seeds with its 95% CI."""
    rows = []
    groups = by([r for r in all_runs if r.summary], lambda r: (r.variant, r.env))
    for (variant, env), rs in sorted(groups.items(), key=lambda kv: (kv[1][0].total_params, kv[0])):
        mean, ci = mean_ci([r.final_return for r in rs])
        rows.append({"variant": variant, "env": env, "seeds": len(rs), "mean": mean, "ci95": ci,
                     "params": rs[0].total_params, "nonzero": rs[0].nonzero_params})
    return rows


def _order(rs: list[Run]) -> tuple:
    return rs[0].total_params or 0, rs[0].variant


def final_scores(rs: list[Run]) -> dict[str, list[float]]:
    """task -> scores of the finished runs, ordered by seed."""
    return {env: [score(env, r.final_return) for r in sorted(g, key=lambda r: r.seed)]
            for env, g in by([r for r in rs if r.summary], lambda r: r.env).items()}


def aggregate_table(all_runs: list[Run], reps: int, baseline_scores: dict[str, dict] | None = None) -> list[dict]:
    """Per variant (and per requested baseline): IQM, mean, median and optimality gap of the scores over all
    tasks and seeds, with stratified-bootstrap 95% CIs."""
    rows = []
    groups = by([r for r in all_runs if r.summary], lambda r: r.variant)
    for variant, rs in sorted(groups.items(), key=lambda kv: _order(kv[1])):
        scores = score_matrix(final_scores(rs))
        rows.append({"variant": variant, "tasks": scores.shape[1], "runs": scores.size,
                     "params": int(np.mean([r.total_params for r in rs])),
                     "nonzero": int(np.mean([r.nonzero_params for r in rs])), **aggregates(scores, reps)})
    for name, per_task in (baseline_scores or {}).items():
        if per_task:
            scores = score_matrix(per_task)
            rows.append({"variant": f"baseline: {name}", "tasks": scores.shape[1], "runs": scores.size,
                         "params": None, "nonzero": None, **aggregates(scores, reps)})
    return rows


def _sparsity_text(r: Run) -> str:
    sp = {k.split(".")[0]: float(v) for k, v in sorted(r.cfg.items())
          if k.endswith(".sparsity") and v is not None and float(v) > 0}
    return f"{sp['critic']:g}" if list(sp) == ["critic"] else "(" + ", ".join(f"{m} {v:g}" for m, v in sp.items()) + ")"


def _topology_text(r: Run) -> str:
    """How a run's masks evolve (sparserl.topology): ``static``, or its dynamic topologies (``rigl``, or
    by module: ``actor set, critic rigl``)."""
    topo = {k.split(".")[0]: str(v) for k, v in sorted(r.cfg.items())
            if k.endswith(".topology") and v not in (None, "static")}
    if not topo:
        return "static"
    return next(iter(topo.values())) if len(set(topo.values())) == 1 else ", ".join(f"{m} {v}" for m, v in topo.items())


EQUAL_NONZERO_TOLERANCE = 0.15  # a dense critic within 15% of a sparse critic's non-zeros counts as "equal"


def comparison_pairs(all_runs: list[Run]) -> list[tuple[str, list[Run], list[Run]]]:
    """(label, sparse runs, dense runs): each sparse variant against each dense variant of the same model (same
    agent and total parameters), the paper's question at that size; then against each dense variant of the
    same agent whose critic has as many weights as the sparse critic keeps (the equal non-zero question)."""
    pairs = []
    done = [r for r in all_runs if r.summary]
    for (agent, _), rs in sorted(by(done, lambda r: (r.cfg.get("agent"), r.total_params)).items(),
                                 key=lambda kv: _order(kv[1])):
        variants = by(rs, lambda r: r.variant)
        dense = {v: g for v, g in variants.items() if not g[0].sparse}
        sparse = {v: g for v, g in variants.items() if g[0].sparse}
        # name the variants when the size and sparsity alone do not tell the comparisons apart
        ambiguous = len(dense) > 1 or len({_sparsity_text(g[0]) for g in sparse.values()}) < len(sparse)
        for sv, sg in sorted(sparse.items()):
            for dv, dg in sorted(dense.items()):
                size = human(sg[0].critic_params or sg[0].total_params)
                label = f"{agent} critic {size}" + (f" ({sv} vs {dv})" if ambiguous else "")
                pairs.append((label, sg, dg))
        pairs += _topology_pairs(agent, sparse)
    return pairs + _equal_nonzero_pairs(done)


def _topology_pairs(agent: str, sparse: dict[str, list[Run]]) -> list[tuple[str, list[Run], list[Run]]]:
    """Each dynamic-topology variant (SET, RigL) against each static variant of the same model and sparsity."""
    pairs = []
    for sv, sg in sorted(sparse.items()):
        if _topology_text(sg[0]) == "static":
            continue
        for tv, tg in sorted(sparse.items()):
            if _topology_text(tg[0]) == "static" and _sparsity_text(tg[0]) == _sparsity_text(sg[0]):
                size = human(sg[0].critic_params or sg[0].total_params)
                label = f"{agent} critic {size} sparse {_sparsity_text(sg[0])}: {_topology_text(sg[0])} vs static"
                pairs.append((label, sg, tg))
    return pairs


def _equal_nonzero_pairs(done: list[Run]) -> list[tuple[str, list[Run], list[Run]]]:
    pairs = []
    variants = sorted(by(done, lambda r: r.variant).items(), key=lambda kv: _order(kv[1]))
    for sv, sg in variants:
        s = sg[0]
        if not s.sparse or not s.critic_nonzero:
            continue
        for dv, dg in variants:
            d = dg[0]
            if d.sparse or not d.critic_params or d.cfg.get("agent") != s.cfg.get("agent") \
                    or d.critic_params == s.critic_params:  # same size: compared above
                continue
            if abs(d.critic_params - s.critic_nonzero) <= EQUAL_NONZERO_TOLERANCE * s.critic_nonzero:
                pairs.append((f"{s.cfg.get('agent')} critic {human(s.critic_params)} sparse vs critic "
                              f"{human(d.critic_params)} dense (equal non-zeros)", sg, dg))
    return pairs


def comparison_table(all_runs: list[Run], reps: int) -> list[dict]:
    """Per comparison: IQM of sparse and dense on the tasks both ran, and P(sparse > dense), with CIs."""
    from rliable import metrics

    rows = []
    for label, sparse, dense in comparison_pairs(all_runs):
        xs, ys = final_scores(sparse), final_scores(dense)
        shared = sorted(set(xs) & set(ys))
        if not shared:
            continue
        x, y = score_matrix({t: xs[t] for t in shared}), score_matrix({t: ys[t] for t in shared})
        names = (_topology_text(sparse[0]), "static") if dense[0].sparse else ("sparse", "dense")
        rows.append({"label": label, "sparsity": _sparsity_text(sparse[0]), "tasks": shared, "names": names,
                     "sparse_runs": x.shape[0], "dense_runs": y.shape[0], "sparse_iqm": iqm(x, reps),
                     "dense_iqm": iqm(y, reps), "p_improvement": probability_of_improvement(x, y, reps)})
    return rows


NO_COMPARISON = ("no sparse and dense variant of the same model (agent and total parameters) among these runs: "
                 "nothing to compare; the tables hold each variant's statistics")


def headlines(comparisons: list[dict]) -> list[str]:
    """The report's headline: one sentence per comparison, or the sentence saying there is none."""
    return [headline(row) for row in comparisons] or [NO_COMPARISON]


def headline(row: dict) -> str:
    """'sac critic 17M: sparse 0.9 IQM 0.81 [0.78, 0.84] vs dense 0.74 [0.70, 0.77]; P(sparse > dense) = ...'"""
    s, d, p = row["sparse_iqm"], row["dense_iqm"], row["p_improvement"]
    a, b = row.get("names", ("sparse", "dense"))  # (rigl, static) for a dynamic-topology comparison
    first = f"sparse {row['sparsity']}" if a == "sparse" else a
    return (f"{row['label']}: {first} IQM {s[0]:.2f} [{s[1]:.2f}, {s[2]:.2f}] vs {b} "
            f"{d[0]:.2f} [{d[1]:.2f}, {d[2]:.2f}]; P({a} > {b}) = {p[0]:.2f} [{p[1]:.2f}, {p[2]:.2f}] "
            f"({len(row['tasks'])} task{'s' * (len(row['tasks']) > 1)}, {row['sparse_runs']} vs {row['dense_runs']} "
            "runs per task" + (": one run cannot give an interval" if min(row["sparse_runs"], row["dense_runs"]) < 2
                               else "") + ")")


def baseline_final_scores(names: list[str], all_runs: list[Run]) -> tuple[dict[str, dict], list[str]]:
    """Per baseline: task -> per-seed scores at its evaluation nearest the user's budget on that task, for
    the tasks the user's runs cover; and the notes on missing tasks and differing budgets."""
    from sparserl import baselines

    budgets = {env: max(r.final_step for r in g) for env, g in by([r for r in all_runs if r.summary],
                                                                    lambda r: r.env).items()}
    out, notes = {}, []
    for name in names:
        have = set(baselines.tasks(name))
        missing = sorted(set(budgets) - have)
        if missing:
            notes.append(f"{name} has no published results on {', '.join(missing)}: its aggregates leave them out")
        out[name] = {env: [score(env, v) for v in baselines.scores_at(name, env, step)]
                     for env, step in sorted(budgets.items()) if env in have}
        for env in sorted(out[name]):
            nearest = baselines.nearest_step(name, env, budgets[env])
            if nearest != budgets[env]:
                notes.append(f"{name} on {env}: budgets differ: your runs end at {budgets[env]:,} env steps, "
                             f"its nearest evaluation is at {nearest:,} (it has evaluations "
                             f"{_step_range(baselines.steps(name, env))})")
    return out, notes


def _step_range(steps: list[int]) -> str:
    gaps = sorted({b - a for a, b in zip(steps, steps[1:])})
    every = f"every {gaps[0]:,} env steps" if len(gaps) == 1 else f"at {len(steps)} steps"
    return f"{every} from {steps[0]:,} to {steps[-1]:,}"


def write_evaluations_csv(all_runs: list[Run], path: Path) -> None:
    """Every run's evaluations in the schema of the published baselines' files (rliable-ready)."""
    from sparserl import baselines

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(baselines.COLUMNS)
        for r in sorted(all_runs, key=lambda r: (r.variant, r.env, r.seed)):
            for step, value in sorted(r.evaluations().items()):
                w.writerow([r.variant, r.env, r.seed, "avg_return", step, repr(value)])


def write_summary_csv(all_runs: list[Run], path: Path) -> None:
    axes = sorted({a for r in all_runs for a in r.labels})
    columns = ["variant", *axes, "env", "seed", "agent", "status", "total_params", "nonzero_params", "final_return",
               "final_return_std", "env_steps", "wall_time_s", "run_dir"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in sorted(all_runs, key=lambda r: (r.variant, r.env, r.seed)):
            s = r.summary or {}
            w.writerow({"variant": r.variant, **{a: r.labels.get(a, "") for a in axes}, "env": r.env, "seed": r.seed,
                        "agent": r.cfg.get("agent"), "status": r.status, "total_params": r.total_params,
                        "nonzero_params": r.nonzero_params, "final_return": s.get("final_return"),
                        "final_return_std": s.get("final_return_std"), "env_steps": s.get("env_steps"),
                        "wall_time_s": s.get("wall_time"), "run_dir": str(r.path)})


# ----------------------------------------------------------------------------------------------
# Figures


def _panels(n: int, plt, width: float = 4.2, height: float = 3.2):
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    width = max(width, 7.0 / cols)  # room for the title above a single panel
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()[:n]


def human(n: float) -> str:
    """4,394,923 -> 4.39M; 36,161 -> 36.2k."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def _family(r: Run) -> str:
    """What a scaling line connects: same agent and sparsities, different sizes."""
    sp = ",".join(f"{k.split('.')[0]} {float(v):g}" for k, v in sorted(r.cfg.items())
                  if k.endswith(".sparsity") and v is not None and float(v) > 0)
    return f"{r.cfg.get('agent')} " + (f"sparse ({sp})" if sp else "dense")


def _limit_to_runs(ax, values) -> None:
    """Keep the y-axis on the runs' own values: with 2-3 seeds a t-interval can be ten times wider than
    the data and would flatten every line (the tables give the intervals in full)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if v.size:
        pad = 0.1 * max(v.max() - v.min(), 1e-6 + 0.05 * abs(v.max()))
        ax.set_ylim(v.min() - pad, v.max() + pad)


def _decorate(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _no_crowded_ticks(fig, axes) -> None:
    """Tilt a panel's x tick labels when they would run into each other (measured on the drawn figure)."""
    fig.tight_layout()
    fig.canvas.draw()
    for ax in axes:
        boxes = [t.get_window_extent() for t in ax.get_xticklabels() if t.get_text() and t.get_visible()]
        if any(a.x1 + 2 > b.x0 for a, b in zip(boxes, boxes[1:])):
            ax.tick_params(axis="x", labelrotation=35)
            for t in ax.get_xticklabels():
                t.set_horizontalalignment("right")


def _legend_below(fig, axes) -> int:
    """One legend for the figure, under its panels, so that it never hides a curve; labels from every panel."""
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    if not labels:
        return 0
    width_in = fig.get_size_inches()[0]
    # columns that fit the figure's width at ~0.075 inch per character of the longest label (8 pt)
    ncol = max(1, min(len(labels), int(width_in / (0.6 + 0.075 * max(map(len, labels))))))
    fig.legend([handles[lab] for lab in labels], labels, loc="lower center", fontsize=8, frameon=False, ncol=ncol)
    return math.ceil(len(labels) / ncol)


def _save(fig, path: Path, legend_rows: int = 0) -> Path:
    """Lay out and write the figure; ``legend_rows`` of a legend under the panels get room of their own."""
    if legend_rows:
        width, height = fig.get_size_inches()
        room = 0.22 * legend_rows + 0.15
        fig.set_size_inches(width, height + room)
        fig.tight_layout(rect=(0, room / (height + room), 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


AGGREGATE_PANEL = "IQM over tasks (score)"


def _scaling_points(rs: list[Run], panel: str, x_of, reps: int) -> list[tuple]:
    """(x, y, low, high) per model size: mean final return with its t CI on a task's panel, the IQM score
    with its stratified-bootstrap CI on the aggregate panel."""
    points = []
    for x, grp in sorted(by(rs, x_of).items()):
        if panel == AGGREGATE_PANEL:
            points.append((x, *iqm(score_matrix(final_scores(grp)), reps)))
            continue
        vals = [r.final_return for r in grp if r.env == panel]
        if vals:
            y, ci = mean_ci(vals)
            points.append((x, y, y - ci, y + ci))
    return points


def plot_scaling(all_runs: list[Run], out: Path, x_key: str, reps: int) -> Path | None:
    """Final return vs parameters (log x), one line per family; per task and IQM over tasks."""
    done = [r for r in all_runs if r.summary]
    if len({r.total_params for r in done}) < 2:
        return None
    plt = runs.pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter  # after runs.pyplot() chose the backend

    envs_ = sorted({r.env for r in done})
    panels = envs_ + ([AGGREGATE_PANEL] if len(envs_) > 1 else [])
    fig, axes = _panels(len(panels), plt)
    x_of = (lambda r: r.total_params) if x_key == "total" else (lambda r: r.nonzero_params)
    for ax, panel in zip(axes, panels):
        drawn = []
        for family, rs in sorted(by(done, _family).items()):
            points = _scaling_points(rs, panel, x_of, reps)
            if not points:
                continue
            xs, ys, los, his = map(np.array, zip(*points))
            drawn += list(ys)
            ax.errorbar(xs, ys, yerr=[ys - los, his - ys], fmt=("-" if "sparse" in family else "--") + "o",
                        capsize=3, markersize=4, label=family)
        _limit_to_runs(ax, drawn if panel == AGGREGATE_PANEL else [r.final_return for r in done if r.env == panel])
        ax.set_xscale("log")
        ticks = sorted({x_of(r) for r in done})
        if len(ticks) <= 8:  # label the sizes that were run
            ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: human(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        _decorate(ax, panel, "total parameters" if x_key == "total" else "non-zero parameters",
                  "IQM score" if panel == AGGREGATE_PANEL else "final return")
    _no_crowded_ticks(fig, axes)
    legend_rows = _legend_below(fig, axes)
    fig.suptitle(f"final return vs {'total' if x_key == 'total' else 'non-zero'} parameters\n"
                 "(dense dashed, sparse solid; 95% CI; IQM panel: stratified bootstrap)", fontsize=10)
    return _save(fig, out / f"scaling_{x_key}.png", legend_rows)


def plot_sparsity(all_runs: list[Run], out: Path) -> Path | None:
    """Final return vs critic sparsity, one line per model size, per task."""
    done = [r for r in all_runs if r.summary and "critic.sparsity" in r.cfg]
    if len({float(r.cfg["critic.sparsity"]) for r in done}) < 2:
        return None
    plt = runs.pyplot()
    envs_ = sorted({r.env for r in done})
    fig, axes = _panels(len(envs_), plt)
    for ax, env in zip(axes, envs_):
        for size, rs in sorted(by([r for r in done if r.env == env], lambda r: r.total_params).items()):
            pts = [(s, *mean_ci([r.final_return for r in g])) for s, g in
                   sorted(by(rs, lambda r: float(r.cfg["critic.sparsity"])).items())]
            if len(pts) < 2:
                continue
            xs, ys, cis = map(np.array, zip(*pts))
            ax.errorbar(xs, ys, yerr=cis, fmt="-o", capsize=3, markersize=4, label=f"{human(size)} params")
        _limit_to_runs(ax, [r.final_return for r in done if r.env == env])
        _decorate(ax, env, "critic sparsity", "final return")
    legend_rows = _legend_below(fig, axes)
    fig.suptitle("sparsity sweep per model size (95% CI)", fontsize=10)
    return _save(fig, out / "sparsity.png", legend_rows)


def _curve(rs: list[Run], table: str, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Mean over runs and 95% CI half-width of a column, on the steps every run has."""
    series = []
    for r in rs:
        rows = getattr(r, table)
        pts = {int(float(row["env_step"])): float(row[key]) for row in rows if row.get(key) not in (None, "", "nan")}
        if pts:
            series.append(pts)
    if not series:
        return None
    steps = sorted(set.intersection(*(set(s) for s in series)))
    if not steps:
        return None
    stats = [mean_ci([s[t] for s in series]) for t in steps]
    return np.array(steps), np.array([m for m, _ in stats]), np.array([c for _, c in stats])


def _steps_axis(ax) -> None:
    """Env steps as 20k / 1.5M, at most 5 ticks: readable at 100% zoom."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: human(v)))


# Published baselines in dark neutral colours and their own markers: the colour cycle is the user's variants'.
BASELINE_STYLES = (("black", "."), ("dimgray", "x"), ("saddlebrown", "+"), ("darkslateblue", "^"))


def plot_baseline_overlay(ax, names: list[str], env: str, max_step: int, scale: float = 1.0) -> list[float]:
    """Each baseline's mean over seeds with a 95% t band, up to the runs' last step (dotted); the values drawn."""
    from sparserl import baselines

    drawn = []
    for i, name in enumerate(names):
        steps, values = baselines.curve(name, env, max_step)
        if not steps.size or not values.size:
            continue
        stats = [mean_ci(values[:, j] / scale) for j in range(steps.size)]
        m, ci = np.array([a for a, _ in stats]), np.array([c for _, c in stats])
        color, marker = BASELINE_STYLES[i % len(BASELINE_STYLES)]
        ax.plot(steps, m, ":", marker=marker, color=color, label=f"baseline: {name}")
        ax.fill_between(steps, m - ci, m + ci, color=color, alpha=0.12)
        drawn += [v for v, s in zip(m, steps) if s <= max_step]
    return drawn


def plot_curves(all_runs: list[Run], out: Path, baseline_names: list[str] = ()) -> Path | None:
    """Per task: evaluation return against env steps per variant, and the requested published baselines."""
    with_rows = [r for r in all_runs if r.metrics]
    if not with_rows:
        return None
    plt = runs.pyplot()
    envs_ = sorted({r.env for r in with_rows})
    fig, axes = _panels(len(envs_), plt)
    for ax, env in zip(axes, envs_):
        for variant, rs in sorted(by([r for r in with_rows if r.env == env], lambda r: r.variant).items(),
                                  key=lambda kv: _order(kv[1])):
            c = _curve(rs, "metrics", "eval_return")
            if c is None:
                continue
            x, m, ci = c
            line, = ax.plot(x, m, "-" if rs[0].sparse else "--", label=variant)
            ax.fill_between(x, m - ci, m + ci, color=line.get_color(), alpha=0.2)
        own = [v for r in with_rows if r.env == env for v in r.evaluations().values()]
        max_step = max(s for r in with_rows if r.env == env for s in r.evaluations()) if own else 0
        drawn = plot_baseline_overlay(ax, list(baseline_names), env, max_step)
        if max_step:
            ax.set_xlim(0, max_step)  # a baseline's curve runs on past the user's budget: keep to the runs'
        _limit_to_runs(ax, own + drawn)
        _steps_axis(ax)
        _decorate(ax, env, "env steps", "evaluation return")
    legend_rows = _legend_below(fig, axes)
    fig.suptitle("learning curves: mean over seeds, 95% CI band\n(dense dashed, sparse solid, published "
                 "baselines dotted)", fontsize=10)
    return _save(fig, out / "curves.png", legend_rows)


def aggregate_curve_scores(rs: list[Run]) -> tuple[np.ndarray, np.ndarray] | None:
    """The steps every run evaluated at, and the (runs x tasks x steps) score matrix there."""
    evals = {r.path: r.evaluations() for r in rs}
    steps = sorted(set.intersection(*(set(e) for e in evals.values()))) if evals else []
    if not steps:
        return None
    per_task = {env: [[score(env, evals[r.path][t]) for t in steps] for r in sorted(g, key=lambda r: r.seed)]
                for env, g in by(rs, lambda r: r.env).items()}
    return np.array(steps), score_matrix(per_task)


def baseline_curve_scores(name: str, envs_: list[str], max_step: int) -> tuple[np.ndarray, np.ndarray] | None:
    """A published baseline's (seeds x tasks x steps) score matrix on the given tasks, at its evaluation steps
    that all of them share up to the runs' last step; None when it lacks one of the tasks."""
    from sparserl import baselines

    curves = {env: baselines.curve(name, env, max_step) for env in envs_}
    if not curves or any(not steps.size or not values.size for steps, values in curves.values()):
        return None
    shared = sorted(set.intersection(*(set(steps.tolist()) for steps, _ in curves.values())))
    if len(shared) < 2:
        return None
    per_task = {env: [[score(env, v) for v in row] for row in values[:, np.isin(steps, shared)]]
                for env, (steps, values) in curves.items()}
    return np.array(shared), score_matrix(per_task)


def plot_aggregate_curves(all_runs: list[Run], out: Path, reps: int, baseline_names: list[str] = ()) -> Path | None:
    """IQM over tasks and seeds of the score at each evaluation step, per variant (and published baseline on
    the same tasks), with stratified-bootstrap 95% CI bands: the learning curves of the experiment in one panel."""
    with_rows = [r for r in all_runs if r.evaluations()]
    curves = []
    for variant, rs in sorted(by(with_rows, lambda r: r.variant).items(), key=lambda kv: _order(kv[1])):
        found = aggregate_curve_scores(rs)
        if found is not None and found[0].size > 1:
            curves.append((variant, "-" if rs[0].sparse else "--", found[0], *iqm_curve(found[1], reps)))
    if not curves:
        return None
    max_step = max(int(c[2][-1]) for c in curves)
    for name in baseline_names:
        found = baseline_curve_scores(name, sorted({r.env for r in with_rows}), max_step)
        if found is not None:
            curves.append((f"baseline: {name}", ":", found[0], *iqm_curve(found[1], reps)))
    baseline_style = dict(zip([c[0] for c in curves if c[1] == ":"], BASELINE_STYLES))
    plt = runs.pyplot()
    fig, axes = _panels(1, plt, width=7.5, height=3.6)
    ax = axes[0]
    for label, style, steps, m, lo, hi in curves:
        color, marker = baseline_style.get(label, (None, None))
        line, = ax.plot(steps, m, style, marker=marker, color=color, label=label)
        ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
    ax.set_xlim(0, max_step)  # a baseline's curve runs on past the runs' budget: keep to the runs'
    _limit_to_runs(ax, [v for c in curves if not c[0].startswith("baseline: ") for v in c[3]]
                   + [v for c in curves if c[0].startswith("baseline: ") for v, t in zip(c[3], c[2]) if t <= max_step])
    _steps_axis(ax)
    _decorate(ax, f"IQM over {len({r.env for r in with_rows})} task(s)", "env steps",
              "IQM score (DMC: return / 1000)")
    legend_rows = _legend_below(fig, axes)
    fig.suptitle("aggregate learning curves: IQM over tasks and seeds, stratified-bootstrap 95% CI band", fontsize=10)
    return _save(fig, out / "aggregate_curves.png", legend_rows)


def plot_profiles(all_runs: list[Run], out: Path, reps: int, baseline_scores: dict[str, dict] | None = None
                  ) -> Path | None:
    """Performance profiles: fraction of runs whose final score exceeds tau, per variant (and baseline)."""
    done = [r for r in all_runs if r.summary]
    score_dict = {v: score_matrix(final_scores(rs)) for v, rs in sorted(by(done, lambda r: r.variant).items(),
                                                                        key=lambda kv: _order(kv[1]))}
    score_dict.update({f"baseline: {n}": score_matrix(t) for n, t in (baseline_scores or {}).items() if t})
    if not score_dict:
        return None
    top = max(1.0, max(float(s.max()) for s in score_dict.values()))
    taus = np.linspace(0.0, top, 101)
    profiles, cis = performance_profile(score_dict, taus, reps)
    plt = runs.pyplot()
    fig, axes = _panels(1, plt, width=7.5, height=3.6)
    ax = axes[0]
    sparse = {r.variant: r.sparse for r in done}
    baseline_style = dict(zip([k for k in score_dict if k.startswith("baseline: ")], BASELINE_STYLES))
    for key in score_dict:
        color, _ = baseline_style.get(key, (None, None))
        line, = ax.plot(taus, profiles[key], ":" if color else "-" if sparse.get(key) else "--", color=color, label=key)
        ax.fill_between(taus, cis[key][0], cis[key][1], color=line.get_color(), alpha=0.15)
    ax.set_ylim(-0.02, 1.02)
    _decorate(ax, "performance profile (final scores)", "score τ (DMC: return / 1000)", "fraction of runs > τ")
    legend_rows = _legend_below(fig, axes)
    fig.suptitle("performance profiles with stratified-bootstrap 95% CI bands", fontsize=10)
    return _save(fig, out / "profiles.png", legend_rows)


DIAG_PANELS = (("critic_srank_post_ln", "critic srank (post-LN features)"),
               ("critic_dormant_post_act_tau0.1", "critic dormant ratio (τ=0.1, post-act)"),
               ("critic_param_norm", "critic parameter norm"),
               ("critic_feature_norm_pre_ln", "critic feature norm (pre-LN)"),
               ("actor_srank_post_ln", "actor srank (post-LN features)"),
               ("critic_grad_cos_mean_abs", "critic gradient |cosine| (mean off-diag)"))


def plot_diagnostics(all_runs: list[Run], out: Path) -> Path | None:
    with_diag = [r for r in all_runs if r.diagnostics]
    if not with_diag:
        return None
    keys = [(k, t) for k, t in DIAG_PANELS if any(k in r.diagnostics[0] for r in with_diag)]
    if not keys:
        return None
    plt = runs.pyplot()
    fig, axes = _panels(len(keys), plt)
    for ax, (key, title) in zip(axes, keys):
        for variant, rs in sorted(by(with_diag, lambda r: r.variant).items()):
            c = _curve(rs, "diagnostics", key)
            if c is None:
                continue
            x, m, ci = c
            line, = ax.plot(x, m, "-" if rs[0].sparse else "--", marker="o", markersize=3, label=variant)
            ax.fill_between(x, m - ci, m + ci, color=line.get_color(), alpha=0.2)
        _limit_to_runs(ax, [float(row[key]) for r in with_diag for row in r.diagnostics
                            if row.get(key) not in (None, "", "nan")])
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("env steps")
        _steps_axis(ax)
        ax.grid(alpha=0.3)
    legend_rows = _legend_below(fig, axes)
    fig.suptitle("diagnostics over training (mean over tasks and seeds, 95% CI)", fontsize=10)
    return _save(fig, out / "diagnostics.png", legend_rows)


def plot_cosines(all_runs: list[Run], out: Path) -> Path | None:
    """The last gradient-cosine matrices of one run per variant (first task, lowest seed)."""
    chosen = []
    for variant, rs in sorted(by(all_runs, lambda r: r.variant).items()):
        r = min(rs, key=lambda r: (r.env, r.seed))
        mats = {m: r.path / f"cosine_{m}.npy" for m in ("actor", "critic")}
        mats = {m: p for m, p in mats.items() if p.is_file()}
        if mats:
            chosen.append((variant, r, mats))
    if not chosen:
        return None
    plt = runs.pyplot()
    fig, axes = plt.subplots(len(chosen), 2, figsize=(7, 3.2 * len(chosen)), squeeze=False)
    for (variant, r, mats), row in zip(chosen, axes):
        for ax, module in zip(row, ("actor", "critic")):
            if module not in mats:
                ax.set_visible(False)
                continue
            im = ax.imshow(np.load(mats[module]), vmin=-1, vmax=1, cmap="RdBu_r")
            ax.set_title(f"{variant}\n{module} ({r.env}, seed {r.seed})", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle("per-sample gradient cosines at the last diagnostics step", fontsize=10)
    return _save(fig, out / "gradient_cosines.png")


# ----------------------------------------------------------------------------------------------
# HTML


def _fmt_int(x) -> str:
    return f"{x:,}" if isinstance(x, (int, np.integer)) else "-"


def _table(head: list[str], rows: list[list[Any]]) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>"


@dataclass
class Contents:
    """What report.html shows, computed before it is written."""
    title: str
    runs: list[Run]
    tasks: list[dict]
    aggregates: list[dict]
    comparisons: list[dict]
    notes: list[str]
    figures: list[tuple[str, Path]]


def _ci(point_low_high: tuple) -> str:
    point, low, high = point_low_high
    return f"{point:.3f} [{low:.3f}, {high:.3f}]"


def _headline_html(c: Contents) -> str:
    items = "".join(f"<li>{html.escape(line)}</li>" for line in headlines(c.comparisons))
    return ("<section id=\"headline\"><h2>Headline: sparse vs dense at each model size</h2><ul>" + items + "</ul>"
            "<p class=\"note\">Score = final evaluation return / 1000 (DMC). IQM and P(sparse &gt; dense) from rliable, "
            "95% stratified-bootstrap CIs over the tasks both variants ran.</p></section>")


def _tables_html(c: Contents) -> list[str]:
    parts = []
    if c.aggregates:
        parts.append("<h2>Aggregate over tasks: scores with stratified-bootstrap 95% CIs (rliable)</h2>")
        parts.append(_table(["variant", "tasks", "runs", "params", "non-zero", *AGGREGATES],
                            [[a["variant"], a["tasks"], a["runs"], _fmt_int(a["params"]), _fmt_int(a["nonzero"]),
                              *(_ci(a[k]) for k in AGGREGATES)] for a in c.aggregates]))
    if c.notes:
        parts.append("<h3>Published baselines: coverage</h3><ul class=\"note\">"
                     + "".join(f"<li>{html.escape(n)}</li>" for n in c.notes) + "</ul>")
    if c.comparisons:
        parts.append("<h2>Probability of improvement: sparse over dense, per model size</h2>")
        parts.append(_table(["comparison", "sparsity", "tasks", "runs per task (sparse / dense)", "sparse IQM",
                             "dense IQM", "P(sparse > dense)"],
                            [[row["label"], row["sparsity"], ", ".join(row["tasks"]),
                              f"{row['sparse_runs']} / {row['dense_runs']}", _ci(row["sparse_iqm"]),
                              _ci(row["dense_iqm"]), _ci(row["p_improvement"])] for row in c.comparisons]))
    if c.tasks:
        parts.append("<h2>Per task: mean final return over seeds (Student-t 95% CI)</h2>")
        parts.append(_table(["variant", "task", "seeds", "params", "non-zero", "mean", "± 95% CI"],
                            [[t["variant"], t["env"], t["seeds"], _fmt_int(t["params"]), _fmt_int(t["nonzero"]),
                              f"{t['mean']:.1f}", f"{t['ci95']:.1f}"] for t in c.tasks]))
    return parts


def render_html(c: Contents) -> str:
    counts = by(c.runs, lambda r: r.status)
    parts = [f"<h1>{html.escape(c.title)}</h1>", _headline_html(c),
             "<p>" + ", ".join(f"{len(v)} {k}" for k, v in sorted(counts.items())) + " run(s); generated from the run "
             "directories by <code>sparserl report</code>. Final return = mean of the final evaluation episodes; "
             "every evaluation is in <code>evaluations.csv</code>.</p>", *_tables_html(c)]
    for caption, path in c.figures:
        parts.append(f"<h2>{html.escape(caption)}</h2><img src=\"{html.escape(path.name)}\" alt=\"{html.escape(caption)}\">")
    parts.append("<h2>Every run</h2>")
    parts.append(_table(["variant", "task", "seed", "status", "params", "non-zero", "final return", "wall time", "run directory"],
                        [[r.variant, r.env, r.seed, r.status, _fmt_int(r.total_params), _fmt_int(r.nonzero_params),
                          f"{r.final_return:.1f}" if r.summary else "-",
                          f"{r.summary['wall_time']:.0f} s" if r.summary and "wall_time" in r.summary else "-", str(r.path)]
                         for r in sorted(c.runs, key=lambda r: (r.variant, r.env, r.seed))]))
    style = ("body{font-family:sans-serif;max-width:1300px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:0.85em}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f2f2f2}"
             "#headline{background:#f4f8ff;border:1px solid #b8cdf0;padding:0.3em 1em;font-size:1.05em}"
             ".note{color:#555;font-size:0.85em}img{max-width:100%;border:1px solid #eee}")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(c.title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def _figures(all_runs: list[Run], out: Path, reps: int, names: list[str], baseline_scores: dict) -> list[tuple[str, Path]]:
    return [(caption, p) for caption, p in (
        ("Scaling: final return vs total parameters", plot_scaling(all_runs, out, "total", reps)),
        ("Scaling: final return vs non-zero parameters", plot_scaling(all_runs, out, "nonzero", reps)),
        ("Sparsity sweep", plot_sparsity(all_runs, out)),
        ("Aggregate learning curves (IQM over tasks)", plot_aggregate_curves(all_runs, out, reps, names)),
        ("Performance profiles", plot_profiles(all_runs, out, reps, baseline_scores)),
        ("Learning curves", plot_curves(all_runs, out, names)),
        ("Diagnostics over training", plot_diagnostics(all_runs, out)),
        ("Gradient interference", plot_cosines(all_runs, out))) if p is not None]


REPORT_OPTIONS = {"baselines": "published baselines to set beside the runs, comma-separated (e.g. simba,bro)"}


def parse_args(tokens: list[str]) -> tuple[list[Path], list[str]]:
    """``sparserl report DIR... [baselines=simba,bro]``: the directories and the baseline names. A token
    ``key=value`` that is not an existing path is a report option (sweep point folders have '=' in them)."""
    from sparserl import baselines

    dirs, names = [], []
    for token in tokens:
        key, eq, value = token.partition("=")
        if not eq or Path(token).exists() or os.sep in key:
            dirs.append(Path(token))
        elif key == "baselines":
            names += [n.strip() for n in value.split(",") if n.strip()]
        else:
            raise ConfigError(f"{token!r}: unknown report option {key!r} (options: "
                              + ", ".join(f"{k}=..." for k in REPORT_OPTIONS) + ")")
    baselines.check(names)
    if not dirs:
        raise ConfigError("no directory given: sparserl report DIR... [baselines=NAME,...]")
    return dirs, names


def write_report(dirs: list[Path], out: Path | None = None, reps: int = 2000, baseline_names: list[str] = ()) -> Path:
    """Write report.html, its PNGs, summary.csv, evaluations.csv and headline.txt for the runs under ``dirs``
    (with the named published baselines beside them); returns the folder."""
    from sparserl import baselines, preflight

    if not MIN_BOOTSTRAP <= reps <= MAX_BOOTSTRAP:
        raise ConfigError(f"--bootstrap={reps}: use between {MIN_BOOTSTRAP} and {MAX_BOOTSTRAP:,} resamples")
    baselines.check(list(baseline_names))
    for d in dirs:
        if not d.is_dir():
            raise ConfigError(f"{str(d)!r}: " + ("not a directory" if d.exists() else "no such directory"))
    out = out or (dirs[0] / "report" if len(dirs) == 1 else Path("runs") / "report")
    preflight.check_output_dir(out, "--out")  # before reading anything
    all_runs = load_runs(dirs)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):  # a figure that no longer applies must not linger
        old.unlink()
    write_summary_csv(all_runs, out / "summary.csv")
    write_evaluations_csv(all_runs, out / "evaluations.csv")
    baseline_scores, notes = baseline_final_scores(list(baseline_names), all_runs)
    contents = Contents("sparserl report: " + ", ".join(d.name for d in dirs), all_runs, task_table(all_runs),
                        aggregate_table(all_runs, reps, baseline_scores), comparison_table(all_runs, reps), notes,
                        _figures(all_runs, out, reps, list(baseline_names), baseline_scores))
    (out / "headline.txt").write_text("".join(line + "\n" for line in headlines(contents.comparisons)))
    (out / "report.html").write_text(render_html(contents))
    return out
