"""Update throughput benchmark: achieved GFLOP/s of the jitted SAC update vs a plain matmul.

Measured in one process, so the ratio (``efficiency``) is meaningful on a shared, noisy machine:

* ``matmul_gflops``: fp32 matmul of the critic's largest layer shape (batch 256 x H x 4H);
* per critic width: ``flops_per_update`` (XLA cost analysis of one gradient step),
  ``updates_per_s``, ``achieved_gflops`` and ``efficiency = achieved / matmul``.

    python benchmarks/bench.py --out bench.json [--widths 512 1024 2048] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from sparserl import agents, config, inspection
from sparserl.agents.common import Batch, ObsStats

OBS_DIM, ACTION_DIM = 67, 21  # humanoid


def timed(fn, seconds: float) -> float:
    """Calls per second of ``fn`` (which must block), after one warm-up call."""
    fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 3:
        fn()
        calls += 1
    return calls / (time.perf_counter() - start)


def matmul_gflops(batch: int, width: int, seconds: float) -> float:
    a = jax.random.normal(jax.random.PRNGKey(0), (batch, width), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (width, 4 * width), jnp.float32)
    matmul = jax.jit(lambda a, b: a @ b)
    rate = timed(lambda: matmul(a, b).block_until_ready(), seconds)
    return rate * 2 * batch * width * 4 * width / 1e9


def update_benchmark(width: int, utd: int, seconds: float) -> dict:
    cfg = config.build({"critic.width": width, "utd": utd}, check_env=False)
    agent = agents.get(cfg.agent)
    state = agent.init(cfg, OBS_DIM, ACTION_DIM)
    flops = inspection.update_flops(cfg, state, OBS_DIM, ACTION_DIM)
    rng = np.random.default_rng(0)
    b = cfg.batch_size
    batches = Batch(*(jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in
                      [(utd, b, OBS_DIM), (utd, b, ACTION_DIM), (utd, b), (utd, b), (utd, b, OBS_DIM)]))
    stats = ObsStats(jnp.zeros(OBS_DIM), jnp.ones(OBS_DIM))
    update = jax.jit(agent.update, static_argnames="cfg", donate_argnums=0)
    holder = [state]

    def step():
        holder[0], metrics = update(holder[0], batches, stats, cfg=cfg)
        jax.block_until_ready(metrics)

    calls_per_s = timed(step, seconds)
    updates_per_s = calls_per_s * utd
    return {"critic_width": width, "total_params": int(sum(x.size for x in jax.tree_util.tree_leaves(
        (state.actor.params, state.critic.params)))), "flops_per_update": flops,
            "updates_per_s": updates_per_s, "achieved_gflops": updates_per_s * flops / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench.json")
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--seconds", type=float, default=5.0, help="timing window per measurement")
    parser.add_argument("--utd", type=int, default=2, help="gradient steps per jitted call")
    args = parser.parse_args()

    results = {"device": str(jax.devices()[0]), "jax": jax.__version__, "machine": platform.machine(),
               "matmul_gflops": matmul_gflops(256, max(args.widths), args.seconds), "updates": []}
    print(f"matmul 256x{max(args.widths)}x{4 * max(args.widths)}: {results['matmul_gflops']:.1f} GFLOP/s")
    print(f"{'critic':>8} {'params':>12} {'GFLOP/update':>13} {'updates/s':>10} {'GFLOP/s':>9} {'efficiency':>10}")
    for width in args.widths:
        r = update_benchmark(width, args.utd, args.seconds)
        r["efficiency"] = r["achieved_gflops"] / results["matmul_gflops"]
        results["updates"].append(r)
        print(f"{width:>8} {r['total_params']:>12,} {r['flops_per_update'] / 1e9:>13.2f} {r['updates_per_s']:>10.1f} "
              f"{r['achieved_gflops']:>9.1f} {r['efficiency']:>10.2f}", flush=True)
        with open(args.out, "w") as f:  # incremental: a kill keeps what was measured
            json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
