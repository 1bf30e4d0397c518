"""``sparserl report``: figures, tables and aggregate statistics of run directories.

Reads run directories only (``config.yaml``, ``summary.json``, ``metrics.csv``, ``diagnostics.csv``,
``cosine_*.npy``, and the sweep's ``sweep.yaml`` for axis labels) and writes, into one folder:

- ``summary.csv``: one row per run (variant, task, seed, parameters, non-zeros, final return, wall time);
- ``report.html``: self-contained page (figures are PNG files next to it; no server needed);
- PNGs: scaling curves (vs total and vs non-zero parameters, dense dashed / sparse solid), sparsity
  sweep, learning curves with 95% CI bands, diagnostics over training, gradient-cosine heatmaps.

Statistics. Per task: mean final return over seeds with a Student-t 95% CI. Across tasks: the
interquartile mean (IQM, the mean of the middle 50% of all runs' scores, as in rliable) with a
stratified-bootstrap 95% CI (runs resampled with replacement within each task). Scores are raw
returns: DMC returns share the 0–1000 range; for tasks on other scales read the per-task numbers.
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

# Two-sided 95% Student-t critical values by degrees of freedom (1.96 beyond the table).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


# ----------------------------------------------------------------------------------------------
# Statistics


def t_critical(df: int) -> float:
    if df < 1:
        return float("nan")
    if df in _T975:
        return _T975[df]
    larger = [d for d in _T975 if d > df]
    return _T975[min(larger)] if larger else 1.96


def mean_ci(values) -> tuple[float, float]:
    """Mean and the half-width of its Student-t 95% CI (0 for a single value)."""
    x = np.asarray(values, float)
    if x.size == 0:
        return float("nan"), float("nan")
    if x.size == 1:
        return float(x[0]), 0.0
    return float(x.mean()), float(t_critical(x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))


def iqm(scores) -> float:
    """Interquartile mean: drop the lowest and highest 25% (rounded down) of all scores, average the rest."""
    x = np.sort(np.asarray(scores, float).ravel())
    if x.size == 0:
        return float("nan")
    cut = int(0.25 * x.size)
    return float(x[cut:x.size - cut].mean())


def stratified_bootstrap_ci(scores_per_task: list, statistic=iqm, reps: int = 2000, seed: int = 0,
                            level: float = 0.95) -> tuple[float, float, float]:
    """The statistic of all scores and its percentile CI, resampling runs within each task."""
    tasks = [np.asarray(s, float).ravel() for s in scores_per_task if len(s)]
    if not tasks:
        return float("nan"), float("nan"), float("nan")
    point = statistic(np.concatenate(tasks))
    rng = np.random.default_rng(seed)
    # One index matrix per task: every replicate draws len(task) runs of that task with replacement.
    resampled = [t[rng.integers(0, t.size, size=(reps, t.size))] for t in tasks]
    stats = np.array([statistic(np.concatenate([r[i] for r in resampled])) for i in range(reps)])
    alpha = (1 - level) / 2
    return point, float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha))


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


def aggregate_table(all_runs: list[Run], reps: int) -> list[dict]:
    """Per variant: IQM over all tasks and seeds with a stratified-bootstrap 95% CI."""
    rows = []
    groups = by([r for r in all_runs if r.summary], lambda r: r.variant)
    for variant, rs in sorted(groups.items(), key=lambda kv: (kv[1][0].total_params, kv[0])):
        per_task = [[r.final_return for r in t] for t in by(rs, lambda r: r.env).values()]
        point, lo, hi = stratified_bootstrap_ci(per_task, iqm, reps)
        rows.append({"variant": variant, "tasks": len(per_task), "runs": len(rs), "iqm": point, "lo": lo, "hi": hi,
                     "params": int(np.mean([r.total_params for r in rs])),
                     "nonzero": int(np.mean([r.nonzero_params for r in rs]))})
    return rows


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


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_scaling(all_runs: list[Run], out: Path, x_key: str, reps: int) -> Path | None:
    """Final return vs parameters (log x), one line per family; per task and IQM over tasks."""
    done = [r for r in all_runs if r.summary]
    if len({r.total_params for r in done}) < 2:
        return None
    plt = runs.pyplot()
    from matplotlib.ticker import FuncFormatter, NullFormatter  # after runs.pyplot() chose the backend

    envs_ = sorted({r.env for r in done})
    fig, axes = _panels(len(envs_) + (len(envs_) > 1), plt)
    x_of = (lambda r: r.total_params) if x_key == "total" else (lambda r: r.nonzero_params)
    for ax, env in zip(axes, envs_ + (["IQM over tasks"] if len(envs_) > 1 else [])):
        for family, rs in sorted(by(done, _family).items()):
            points = []
            for x, grp in sorted(by(rs, x_of).items()):
                if env == "IQM over tasks":
                    y, lo, hi = stratified_bootstrap_ci([[r.final_return for r in t] for t in by(grp, lambda r: r.env).values()],
                                                        iqm, reps)
                else:
                    vals = [r.final_return for r in grp if r.env == env]
                    if not vals:
                        continue
                    y, ci = mean_ci(vals)
                    lo, hi = y - ci, y + ci
                points.append((x, y, lo, hi))
            if not points:
                continue
            xs, ys, los, his = map(np.array, zip(*points))
            style = "-" if "sparse" in family else "--"
            ax.errorbar(xs, ys, yerr=[ys - los, his - ys], fmt=style + "o", capsize=3, markersize=4, label=family)
        _limit_to_runs(ax, [r.final_return for r in done if env in (r.env, "IQM over tasks")])
        ax.set_xscale("log")
        ticks = sorted({x_of(r) for r in done})
        if len(ticks) <= 8:  # label the sizes that were run
            ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: human(v)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        _decorate(ax, env, "total parameters" if x_key == "total" else "non-zero parameters", "final return")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"final return vs {'total' if x_key == 'total' else 'non-zero'} parameters\n"
                 "(dense dashed, sparse solid; 95% CI; IQM panel: stratified bootstrap)", fontsize=10)
    return _save(fig, out / f"scaling_{x_key}.png")


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
        ax.legend(fontsize=7)
    fig.suptitle("sparsity sweep per model size (95% CI)", fontsize=10)
    return _save(fig, out / "sparsity.png")


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


def plot_curves(all_runs: list[Run], out: Path) -> Path | None:
    with_rows = [r for r in all_runs if r.metrics]
    if not with_rows:
        return None
    plt = runs.pyplot()
    envs_ = sorted({r.env for r in with_rows})
    fig, axes = _panels(len(envs_), plt)
    for ax, env in zip(axes, envs_):
        for variant, rs in sorted(by([r for r in with_rows if r.env == env], lambda r: r.variant).items()):
            c = _curve(rs, "metrics", "eval_return")
            if c is None:
                continue
            x, m, ci = c
            line, = ax.plot(x, m, "-" if rs[0].sparse else "--", label=variant)
            ax.fill_between(x, m - ci, m + ci, color=line.get_color(), alpha=0.2)
        _limit_to_runs(ax, [float(row["eval_return"]) for r in with_rows if r.env == env for row in r.metrics
                            if row.get("eval_return") not in (None, "", "nan")])
        _decorate(ax, env, "env steps", "evaluation return")
    axes[0].legend(fontsize=7)
    fig.suptitle("learning curves: mean over seeds, 95% CI band\n(dense dashed, sparse solid)", fontsize=10)
    return _save(fig, out / "curves.png")


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
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("diagnostics over training (mean over tasks and seeds, 95% CI)", fontsize=10)
    return _save(fig, out / "diagnostics.png")


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


def render_html(title: str, all_runs: list[Run], tasks: list[dict], agg: list[dict], figures: list[tuple[str, Path]]) -> str:
    counts = by(all_runs, lambda r: r.status)
    parts = [f"<h1>{html.escape(title)}</h1>",
             "<p>" + ", ".join(f"{len(v)} {k}" for k, v in sorted(counts.items())) + " run(s); generated from the run "
             "directories by <code>sparserl report</code>. Final return = mean of the final evaluation episodes.</p>"]
    if agg:
        parts.append("<h2>Aggregate over tasks: IQM with stratified-bootstrap 95% CI</h2>")
        parts.append(_table(["variant", "tasks", "runs", "params", "non-zero", "IQM", "95% CI"],
                            [[a["variant"], a["tasks"], a["runs"], _fmt_int(a["params"]), _fmt_int(a["nonzero"]),
                              f"{a['iqm']:.1f}", f"[{a['lo']:.1f}, {a['hi']:.1f}]"] for a in agg]))
    if tasks:
        parts.append("<h2>Per task: mean final return over seeds (Student-t 95% CI)</h2>")
        parts.append(_table(["variant", "task", "seeds", "params", "non-zero", "mean", "± 95% CI"],
                            [[t["variant"], t["env"], t["seeds"], _fmt_int(t["params"]), _fmt_int(t["nonzero"]),
                              f"{t['mean']:.1f}", f"{t['ci95']:.1f}"] for t in tasks]))
    for caption, path in figures:
        parts.append(f"<h2>{html.escape(caption)}</h2><img src=\"{html.escape(path.name)}\" alt=\"{html.escape(caption)}\">")
    parts.append("<h2>Every run</h2>")
    parts.append(_table(["variant", "task", "seed", "status", "params", "non-zero", "final return", "wall time", "run directory"],
                        [[r.variant, r.env, r.seed, r.status, _fmt_int(r.total_params), _fmt_int(r.nonzero_params),
                          f"{r.final_return:.1f}" if r.summary else "-",
                          f"{r.summary['wall_time']:.0f} s" if r.summary and "wall_time" in r.summary else "-", str(r.path)]
                         for r in sorted(all_runs, key=lambda r: (r.variant, r.env, r.seed))]))
    style = ("body{font-family:sans-serif;max-width:1300px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:0.85em}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}th{background:#f2f2f2}"
             "img{max-width:100%;border:1px solid #eee}")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")


def write_report(dirs: list[Path], out: Path | None = None, reps: int = 2000) -> Path:
    """Write report.html, its PNGs and summary.csv for the runs under ``dirs``; returns the folder."""
    from sparserl import preflight

    if not MIN_BOOTSTRAP <= reps <= MAX_BOOTSTRAP:
        raise ConfigError(f"--bootstrap={reps}: use between {MIN_BOOTSTRAP} and {MAX_BOOTSTRAP:,} resamples")
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
    tasks, agg = task_table(all_runs), aggregate_table(all_runs, reps)
    figures = [(caption, p) for caption, p in (
        ("Scaling: final return vs total parameters", plot_scaling(all_runs, out, "total", reps)),
        ("Scaling: final return vs non-zero parameters", plot_scaling(all_runs, out, "nonzero", reps)),
        ("Sparsity sweep", plot_sparsity(all_runs, out)),
        ("Learning curves", plot_curves(all_runs, out)),
        ("Diagnostics over training", plot_diagnostics(all_runs, out)),
        ("Gradient interference", plot_cosines(all_runs, out))) if p is not None]
    title = "sparserl report: " + ", ".join(d.name for d in dirs)
    (out / "report.html").write_text(render_html(title, all_runs, tasks, agg, figures))
    return out
