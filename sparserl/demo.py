"""``sparserl demo``: SAC learning a task in a few minutes, dense vs sparse, then the report's headline.

Runs the bundled ``demo`` experiment preset (SAC on ``cartpole-swingup``, a dense and a 90% sparse
actor and critic, two seeds each) through the same sweep and report code a full experiment uses, so
``make demo`` ends with a ``report.html`` to open. Before training it measures what a uniform random
policy scores on the task, with the runs' action repeat, and at the end it sets every run's final
return beside that figure: the demo shows learning, not only the workflow. ``scale=smoke`` is the
plumbing-only variant the tests use (nothing learns in it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sparserl import envs, report, sweep
from sparserl.config import ConfigError

PRESET = "demo"
RANDOM_EPISODES = 5  # episodes of the random-policy rollout (a few seconds on a DMC task)
RANDOM_SEED = 0


def random_policy_return(env_name: str, action_repeat: int, episodes: int = RANDOM_EPISODES,
                         seed: int = RANDOM_SEED) -> float:
    """Mean return of uniform random actions in [-1, 1], each held for ``action_repeat`` env steps
    (what an agent that learned nothing would score in the runs' action space)."""
    env = envs.make(env_name, seed, action_repeat)
    rng = np.random.default_rng(seed)
    returns = []
    for _ in range(episodes):
        env.reset()
        total, done = 0.0, False
        while not done:
            _, reward, terminated, truncated = env.step(rng.uniform(-1.0, 1.0, env.action_dim))
            total += reward
            done = terminated or truncated
        returns.append(total)
    return float(np.mean(returns))


def random_baselines(grid: sweep.Sweep) -> dict[str, float]:
    """env -> random-policy return, measured once per (env, action repeat) of the grid's points."""
    configs = [p.config(p.seeds[0], Path(".")) for p in grid.points]
    tasks = sorted({(cfg.env, cfg.action_repeat) for cfg in configs})
    if len({env for env, _ in tasks}) < len(tasks):
        raise ConfigError("demo: one action_repeat per task (the random-policy figure is measured with it)")
    return {env: random_policy_return(env, repeat) for env, repeat in tasks}


def verdict_lines(sweep_dir: Path, random: dict[str, float]) -> list[str]:
    """One line per finished run: its final return beside the random policy's on its task."""
    lines = []
    for r in report.load_runs([sweep_dir]):
        if r.final_return is None:
            continue
        bar = random.get(r.env)
        above = "" if bar is None else f"  ({r.final_return - bar:+.0f} vs random {bar:.0f})"
        lines.append(f"  {r.path.parent.name}/{r.path.name}: final return {r.final_return:.1f}{above}")
    return lines


def run(args: list[str]) -> Path:
    options, overrides = sweep.split_args(args)
    path = sweep.resolve_preset(PRESET)
    opts = sweep.parse_options(options, str(path))
    sweep_dir = Path(options.get("sweep_dir") or Path("runs") / f"demo-{opts['scale']}")  # names the report
    grid = sweep.expand(path, opts["scale"], overrides)
    random = random_baselines(grid)
    tasks = ", ".join(f"{env} (a uniform random policy scores {ret:.0f}: mean of {RANDOM_EPISODES} episodes, "
                      f"measured just now)" for env, ret in random.items())
    print(f"== sparserl demo: {grid.description}\n== task: {tasks}\n"
          f"== {grid.num_runs} runs (scale={opts['scale']}) -> {sweep_dir}", flush=True)
    result = sweep.execute(grid, sweep_dir, opts["executor"], opts["workers"], opts["group_seeds"],
                           opts["retry_failed"], opts["address"], opts["cpus_per_run"], opts["gpus_per_run"])
    if not result["finished"] and not result["skipped"]:
        raise ConfigError(f"demo: every run failed; see the logs under {sweep_dir}/logs")
    out = report.write_report([sweep_dir])
    print("\n== headline (the report's): " + (out / "headline.txt").read_text().strip())
    print(f"== final returns on {', '.join(random)} (random policy: "
          f"{', '.join(f'{v:.0f}' for v in random.values())}):")
    print("\n".join(verdict_lines(sweep_dir, random)))
    print(f"\nopen the report: {out / 'report.html'}")
    return out
