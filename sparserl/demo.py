"""``sparserl demo``: a small dense vs sparse comparison that finishes in minutes on a 2-core CPU.

Three SAC agents on ``cartpole-balance``: a small dense network, a 4x wider dense network, and the
same wide network with 90% of its weights removed before training (static ERK mask). The demo
uses a higher learning rate and a smaller batch than the paper (3e-4, 128, UTD 1) so that the
short budget shows learning; everything else is the library's defaults.
"""

from __future__ import annotations

import json
from pathlib import Path

from sparserl import train
from sparserl.config import ConfigError, build, parse_overrides

DEMO_DEFAULTS = {
    "agent": "sac", "env": "cartpole-balance", "env_steps": 40_000, "warmup_steps": 1_000,
    "lr": 3e-4, "batch_size": 128, "utd": 1, "eval_every": 5_000, "eval_episodes": 5,
    "final_eval_episodes": 10, "actor.width": 64, "actor.blocks": 1, "overwrite": True,
}

VARIANTS = {
    "dense-small": {"critic.width": 64, "critic.blocks": 1, "critic.sparsity": 0.0},
    "dense-wide": {"critic.width": 256, "critic.blocks": 1, "critic.sparsity": 0.0},
    "sparse-wide": {"critic.width": 256, "critic.blocks": 1, "critic.sparsity": 0.9},
}


def run(overrides: list[str]) -> list[dict]:
    user = parse_overrides(overrides)
    root = Path(user.pop("run_dir", "runs/demo"))
    if "name" in user:
        raise ConfigError("name: not used by the demo; set run_dir=DIR for where its runs go")
    # Validate every variant before training any of them.
    configs = {name: build({**DEMO_DEFAULTS, **variant, **user, "run_dir": str(root / name)})
               for name, variant in VARIANTS.items()}
    rows = []
    for name, cfg in configs.items():
        print(f"== {name}: critic {cfg.critic.width}x{cfg.critic.blocks}, sparsity {cfg.critic.sparsity:g}, "
              f"{cfg.env_steps} env steps on {cfg.env}", flush=True)
        summary = train.train(cfg)
        critic = summary["params"]["critic"]
        rows.append({"variant": name, "critic": f"{cfg.critic.width}x{cfg.critic.blocks}",
                     "sparsity": cfg.critic.sparsity, "critic_params": critic["total_params"],
                     "critic_nonzero": critic["nonzero_params"], "final_return": summary["final_return"],
                     "ci95": summary["final_return_ci95"], "wall_time_s": summary["wall_time"]})
    table = format_table(rows)
    print("\n" + table)
    root.mkdir(parents=True, exist_ok=True)
    (root / "summary.md").write_text(table + "\n")
    (root / "summary.json").write_text(json.dumps(rows, indent=1))
    print(f"\nruns and this table: {root}/")
    return rows


def format_table(rows: list[dict]) -> str:
    head = "| variant | critic | sparsity | critic params | non-zero | final return (95% CI) | wall time |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['critic']} | {r['sparsity']:g} | {r['critic_params']:,} | "
                     f"{r['critic_nonzero']:,} | {r['final_return']:.1f} ± {r['ci95']:.1f} | {r['wall_time_s']:.0f} s |")
    return "\n".join(lines)
