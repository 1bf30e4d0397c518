"""GPU check (scripts/gpu_check.sh): SAC updates/s of the paper's three model sizes, dense and masked,
1 vs 8 vmapped seeds, and the pixel encoder, written as JSON. Made to finish in under 8 minutes on
one GPU; ``--tiny`` runs the same program on tiny shapes (a CPU smoke test of the script itself).

Models (humanoid-run presets): ``4.4M`` critic 512 x 2 blocks, actor 128; ``17M`` critic 1024 x 2,
actor 128; ``109M`` critic 2048 x 3, actor 1024. ``dense``: sparsity 0; ``masked``: sparsity 0.9,
``sparsity.compute=masked`` (a GPU runs masked-dense products: there is no sparse kernel off CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).parent))

import bench  # noqa: E402  (benchmarks/bench.py: random batches, timing)
from sparserl import agents, config, networks  # noqa: E402
from sparserl.agents.common import ObsStats  # noqa: E402

MODELS = {"4.4M": (512, 2, 128, 1), "17M": (1024, 2, 128, 1), "109M": (2048, 3, 1024, 1)}
TINY = {"4.4M": (32, 1, 16, 1), "17M": (64, 1, 16, 1), "109M": (128, 1, 32, 1)}


def update_rate(model: tuple, sparsity: float, seeds: int, seconds: float) -> dict:
    critic_w, critic_b, actor_w, actor_b = model
    cfg = config.build({"critic.width": critic_w, "critic.blocks": critic_b, "actor.width": actor_w,
                        "actor.blocks": actor_b, "critic.sparsity": sparsity, "actor.sparsity": sparsity,
                        "sparsity.compute": "masked", "utd": 1}, check_env=False)
    agent = agents.get(cfg.agent)
    states = [agent.init(config.build({**config.flatten(cfg.to_dict()), "seed": i}, check_env=False),
                         bench.OBS_DIM, bench.ACTION_DIM) for i in range(seeds)]
    state = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)
    del states
    batches = bench.random_batches((seeds, 1, cfg.batch_size))
    stats = ObsStats(jnp.zeros((seeds, bench.OBS_DIM)), jnp.ones((seeds, bench.OBS_DIM)))
    update = jax.jit(jax.vmap(lambda s, b, st: agent.update(s, b, st, cfg)), donate_argnums=0)
    holder = [state]
    start = time.perf_counter()

    def step():
        holder[0], metrics = update(holder[0], batches, stats)
        jax.block_until_ready(metrics)

    rate = bench.timed(step, seconds)
    params = sum(x.size for x in jax.tree_util.tree_leaves((holder[0].actor.params, holder[0].critic.params))) // seeds
    return {"seeds": seeds, "sparsity": sparsity, "params": int(params), "updates_per_s": rate,
            "seed_updates_per_s": rate * seeds, "seconds_incl_compile": time.perf_counter() - start}


def encoder_rate(batch: int, size: int, seconds: float) -> dict:
    params = networks.init_conv_encoder(jax.random.PRNGKey(0), 9, 32, 4)
    obs = jax.random.randint(jax.random.PRNGKey(1), (batch, size, size, 9), 0, 256).astype(jnp.uint8)
    grad = jax.jit(jax.grad(lambda p: networks.conv_encoder(p, obs).sum()))
    rate = bench.timed(lambda: jax.block_until_ready(grad(params)), seconds)
    return {"batch": batch, "size": size, "forward_backward_per_s": rate, "seconds_per_call": 1.0 / rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and windows (a CPU smoke test)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timing window per measurement")
    args = parser.parse_args()
    models, seeds, seconds = (TINY, (1, 2), 0.2) if args.tiny else (MODELS, (1, 8), args.seconds)
    results = {"device": str(jax.devices()[0]), "platform": jax.default_backend(), "jax": jax.__version__,
               "tiny": args.tiny, "sac": [], "encoder": None}
    for name, model in models.items():
        for sparsity in (0.0, 0.9):
            for n in seeds:
                r = {"model": name, "mode": "dense" if sparsity == 0 else "masked",
                     **update_rate(model, sparsity, n, seconds)}
                results["sac"].append(r)
                print(f"SAC {name} {r['mode']:<6} {n} seed(s): {r['updates_per_s']:.2f} updates/s "
                      f"({r['seed_updates_per_s']:.2f} seed-updates/s)", flush=True)
                Path(args.out).write_text(json.dumps(results, indent=1))  # incremental: a kill keeps the rest
    results["encoder"] = encoder_rate(8 if args.tiny else 256, 20 if args.tiny else 84, seconds)
    print(f"pixel encoder fwd+bwd, batch {results['encoder']['batch']}: "
          f"{results['encoder']['seconds_per_call'] * 1e3:.1f} ms", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
