"""Throughput benchmark, measured in one process so that ratios are meaningful on a noisy machine.

* ``matmul_gflops``: fp32 matmul of the critic's largest layer shape (batch 256 x H x 4H);
* ``updates``: per critic width, ``flops_per_update`` (XLA cost analysis of one gradient step),
  ``updates_per_s``, ``achieved_gflops`` and ``efficiency = achieved / matmul``;
* ``end_to_end``: the real train loop on humanoid-run (default SAC, UTD 2) over >= 60 s of
  learning after warm-up: ``agent_steps_per_s``, the FLOP-limited rate
  ``matmul_gflops / (flops_per_update * utd)``, their ratio, and the share of wall time per phase;
* ``seeds``: the vmapped update over 1, 2, 4, 8 stacked seeds: seed-updates per second;
* ``topology``: per critic width (512), SET and RigL on actor and critic at sparsity 0.9: seconds of
  one topology update vs one update call, and the overhead at the default ``topology.every``;
* ``streaming``: Stream AC(λ) (bundled preset ``stream_ac``, 2 hidden layers) per width (128, 1024):
  ``updates_per_s`` of the jitted per-step call alone (one transition, ObGD on actor and critic,
  next action), its FLOPs, and ``agent_steps_per_s`` of the real streaming loop on gym:Hopper-v5
  (compilation excluded) with the loop's share of wall time per phase;
* ``encoder``: the DrQ-v2 pixel encoder (4 x 32 channels, 84x84x9 uint8 input) forward + backward at
  batch 256: FLOPs (XLA cost analysis of the plain-convolution program), seconds per call and
  achieved GFLOP/s for the plain ``lax.conv_general_dilated`` (``reference``), one im2col matmul
  (``im2col``), the library's chunked ``conv2d`` with separate bias/ReLU (``conv2d``) and the encoder
  as agents run it, conv+bias+ReLU fused per chunk (``sparserl``), each as a ratio to
  ``matmul_gflops``; and ``conv_shape_matmul_gflops``, a bare matmul of the conv layers' own shape
  (the ceiling of any patches-and-matmul convolution);
* ``pixels``: rendering frames/s of a pixel env (default and ``render.fast``) and DrQ-v2 agent
  steps/s of a small configuration in the real train loop;
* ``sparse_compute``: ``sparsity.compute=masked`` vs ``sparse`` (docs/sparse_compute.md), default SAC with
  actor and critic at sparsity S: per critic width (512, 1024, 2048) and S (0.8, 0.9, 0.95),
  ``masked_updates_per_s``, ``sparse_updates_per_s`` and ``speedup`` (entries in ``updates``); the
  end-to-end agent steps/s on humanoid-run at S = 0.9 in both modes (``end_to_end``, when
  ``--sparse-learn-seconds`` > 0); per kernel of a SimBa block at width 1024 and 2048, S = 0.9, the
  dense and sparse forward/backward seconds, GFLOP/s and memory floor (``kernels``); the 109M preset's
  update in both modes (``presets``); Stream AC(λ)'s step at width 1024 and 2048, S = 0.9
  (``streaming``). Masked and sparse are timed in turn, best of 3 windows. ``--only-sparse`` runs this
  section alone;
* ``checkpoint_write``: per preset (default humanoid-run, the 109M sparse model), the bytes and
  seconds of one checkpoint with a full replay buffer -- with one agent step, the lead time a
  graceful stop on a scheduler's signal needs (docs/cluster.md).

    python benchmarks/bench.py --out bench.json [--widths 512 1024 2048] [--seconds 5] [--learn-seconds 60]
                               [--stream-widths 128 1024] [--stream-steps 6000] [--no-pixels | --only-pixels]
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sparserl import agents, config, inspection, train
from sparserl.agents import common
from sparserl.agents.common import Batch, ObsStats
from sparserl.seedgroup import SeedGroup

OBS_DIM, ACTION_DIM = 67, 21  # humanoid


def timed(fn, seconds: float) -> float:
    """Calls per second of ``fn`` (which must block), after one warm-up call."""
    fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or calls < 3:
        fn()
        calls += 1
    return calls / (time.perf_counter() - start)


def random_batches(leading: tuple[int, ...]) -> Batch:
    """Gaussian transitions with leading axes ``leading`` (e.g. (K, B) or (seeds, K, B))."""
    rng = np.random.default_rng(0)
    dims = {"obs": (OBS_DIM,), "action": (ACTION_DIM,), "reward": (), "discount": (), "next_obs": (OBS_DIM,)}
    return Batch(*(jnp.asarray(rng.normal(size=leading + dims[k]).astype(np.float32)) for k in Batch._fields))


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
    batches = random_batches((utd, cfg.batch_size))
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


def topology_benchmark(width: int, utd: int, seconds: float) -> dict:
    """Dynamic topology (sparserl.topology): per method (SET, RigL on actor and critic, sparsity 0.9),
    the seconds of one topology update against one update call of ``utd`` gradient steps, both as
    the SeedGroup runs them (jitted, state donated), and the overhead that adds at the default
    ``topology.every``: ``rewire_seconds / (every / utd * call_seconds)``."""
    stats = ObsStats(jnp.zeros(OBS_DIM), jnp.ones(OBS_DIM))
    out = {"critic_width": width, "utd": utd, "sparsity": 0.9}
    for method in ("set", "rigl"):
        cfg = config.build({"critic.width": width, "utd": utd, "actor.sparsity": 0.9, "critic.sparsity": 0.9,
                            "actor.topology": method, "critic.topology": method}, check_env=False)
        agent = agents.get(cfg.agent)
        group = SeedGroup(agent, cfg, [cfg], [agent.init(cfg, OBS_DIM, ACTION_DIM)], vmapped=False)
        batches, step = random_batches((utd, cfg.batch_size)), jnp.int32(cfg.warmup_steps)
        batch = jax.tree_util.tree_map(lambda x: x[-1], batches)

        def learn():
            group.states[0], group.sums[0] = group.learn_fn(group.states[0], group.sums[0], batches, stats, step)
            jax.block_until_ready(group.sums[0])

        def rewire():
            group.states[0] = group.rewire_fn(group.states[0], batch, stats, group.topology_keys[0], jnp.int32(1))
            jax.block_until_ready(group.states[0])

        call_s, rewire_s = 1.0 / timed(learn, seconds), 1.0 / timed(rewire, seconds)
        out[method] = {"update_call_seconds": call_s, "topology_update_seconds": rewire_s,
                       "ratio_to_update_call": rewire_s / call_s, "every": cfg.topology.every,
                       "overhead_at_every": rewire_s / (cfg.topology.every / utd * call_s)}
    return out


def end_to_end(learn_seconds: float, update_rate: float, overrides: dict | None = None) -> dict:
    """Train humanoid-run for about ``learn_seconds`` of learning; time shares from the loop's timers."""
    warmup = 500
    # UTD 2: two updates per agent step; 20% margin so that learning lasts at least learn_seconds
    learn_steps = max(200, int(1.2 * learn_seconds * update_rate / 2))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config.build({"env": "humanoid-run", "warmup_steps": warmup, "env_steps": 2 * (warmup + learn_steps),
                            "eval_every": 2 * warmup, "eval_episodes": 1, "final_eval_episodes": 1,
                            "checkpoint_every": 10**9, "progress": False, "run_dir": str(Path(tmp) / "run"),
                            **(overrides or {})})
        summary = train.train(cfg, log=lambda msg: None)
        rows = list(csv.DictReader(open(Path(tmp) / "run" / "metrics.csv")))
    learn_wall = float(rows[-1]["wall_time"]) - float(rows[0]["wall_time"])
    return {"env": cfg.env, "warmup_agent_steps": warmup, "learning_agent_steps": learn_steps,
            "learning_seconds": learn_wall, "agent_steps_per_s": learn_steps / learn_wall,
            "time_share": summary["time_share"]}


def sparse_update_rate(width: int, sparsity: float, compute: str, seconds: float) -> float:
    """Updates/s of the default SAC with actor and critic at ``sparsity``, one gradient step per call."""
    return update_rate(config.build({"critic.width": width, "actor.sparsity": sparsity, "critic.sparsity": sparsity,
                                     "sparsity.compute": compute, "utd": 1}, check_env=False), seconds)


def update_rate(cfg, seconds: float) -> float:
    """Updates/s of ``cfg``'s agent (``utd`` gradient steps per call) on humanoid's shapes."""
    return timed(update_step(cfg), seconds)


def update_step(cfg):
    """A blocking call of ``cfg``'s update (``utd`` gradient steps) on humanoid's shapes."""
    agent = agents.get(cfg.agent)
    batches, stats = random_batches((1, cfg.batch_size)), ObsStats(jnp.zeros(OBS_DIM), jnp.ones(OBS_DIM))
    update = jax.jit(agent.update, static_argnames="cfg", donate_argnums=0)
    holder = [agent.init(cfg, OBS_DIM, ACTION_DIM)]

    def step():
        holder[0], metrics = update(holder[0], batches, stats, cfg=cfg)
        jax.block_until_ready(metrics)

    return step


def paired_rates(steps: dict, seconds: float, rounds: int = 3) -> dict:
    """Calls/s of each blocking call in ``steps``, timed in turn ``rounds`` times, the best of each
    kept: on a shared machine a burst of load then hits one window, not one mode."""
    best = dict.fromkeys(steps, 0.0)
    for _ in range(rounds):
        for name, step in steps.items():
            best[name] = max(best[name], timed(step, seconds))
    return best


def compute_configs(values: dict) -> dict:
    return {c: config.build({**values, "sparsity.compute": c}, check_env=False) for c in ("masked", "sparse")}


def memory_bandwidth_gbs(seconds: float) -> float:
    """Read + write GB/s of a 256 MB array copy (``x + 1``): the memory bound of a streaming pass."""
    x = jnp.zeros(64 << 20, jnp.float32)
    add = jax.jit(lambda x: x + 1.0)
    return timed(lambda: add(x).block_until_ready(), seconds) * 2 * x.nbytes / 1e9


def kernel_timings(width: int, sparsity: float, batch: int, seconds: float) -> list[dict]:
    """Per kernel of a SimBa block at ``width`` (H x 4H, 4H x H), batch ``batch``: seconds of the dense
    product and its two gradients (XLA) vs the sparse kernel's forward and backward (input and weight
    gradients), the GFLOP/s each achieves on its useful FLOPs (2 x batch x entries per product: dense
    entries for XLA, kept ones for the kernel) and the memory floor of the sparse calls (the bytes they
    must read and write at the measured bandwidth)."""
    from sparserl import sparse_kernel

    out, bandwidth = [], memory_bandwidth_gbs(seconds)
    for shape in ((width, 4 * width), (4 * width, width)):
        k_mask, k_w, k_x = jax.random.split(jax.random.PRNGKey(shape[0]), 3)
        n = int(round((1 - sparsity) * shape[0] * shape[1]))
        order = jax.random.permutation(k_mask, shape[0] * shape[1])
        mask = jnp.zeros(shape[0] * shape[1], bool).at[order[:n]].set(True).reshape(shape)
        kernel = jax.random.normal(k_w, shape) * mask
        lay = sparse_kernel.layout(mask, n)
        values = sparse_kernel.compact(kernel, lay)
        x = jax.random.normal(k_x, (batch, shape[0]))
        g = jnp.ones((batch, shape[1]))
        dense_fwd = jax.jit(lambda k, x: x @ k)
        dense_bwd = jax.jit(lambda k, x: jax.vjp(lambda k, x: x @ k, k, x)[1](g))
        sparse_fwd = jax.jit(lambda v, x: sparse_kernel.matmul(v, lay, x))
        sparse_bwd = jax.jit(lambda v, x: jax.vjp(lambda v, x: sparse_kernel.matmul(v, lay, x), v, x)[1](g))
        t = {name: 1.0 / timed(lambda f=f, a=a: jax.block_until_ready(f(*a)), seconds)
             for name, f, a in (("dense_forward", dense_fwd, (kernel, x)), ("dense_backward", dense_bwd, (kernel, x)),
                                ("sparse_forward", sparse_fwd, (values, x)), ("sparse_backward", sparse_bwd, (values, x)))}
        dense_flops, sparse_flops = 2 * batch * shape[0] * shape[1], 2 * batch * n
        # forward: values + row indices + column pointers + x in, y out; backward: twice the index
        # arrays (CSC and CSR), x and g in, dx and dvalues out
        fwd_bytes = 8 * n + 4 * batch * (shape[0] + shape[1])
        bwd_bytes = 4 * n * 5 + 4 * batch * (2 * shape[0] + shape[1])
        out.append({
            "shape": list(shape), "batch": batch, "sparsity": sparsity, "kept": n, **{f"{k}_s": v for k, v in t.items()},
            "dense_forward_gflops": dense_flops / t["dense_forward"] / 1e9,
            "dense_backward_gflops": 2 * dense_flops / t["dense_backward"] / 1e9,
            "sparse_forward_gflops": sparse_flops / t["sparse_forward"] / 1e9,
            "sparse_backward_gflops": 2 * sparse_flops / t["sparse_backward"] / 1e9,
            "sparse_forward_memory_floor_s": fwd_bytes / bandwidth / 1e9,
            "sparse_backward_memory_floor_s": bwd_bytes / bandwidth / 1e9,
            "forward_speedup": t["dense_forward"] / t["sparse_forward"],
            "backward_speedup": t["dense_backward"] / t["sparse_backward"],
            "memory_bandwidth_gbs": bandwidth})
    return out


def sparse_compute(widths: list[int], sparsities: list[float], seconds: float, learn_seconds: float,
                   stream_widths=(1024, 2048), kernel_widths=(1024, 2048), presets=("humanoid_run_109m_sparse",)) -> dict:
    """masked vs sparse compute, in one process (so the ratios hold on a busy machine)."""
    from sparserl import sparse_kernel

    out = {"kernel": "not available: " + str(sparse_kernel.unavailable_reason()) if not sparse_kernel.available()
           else "sparserl/csrc/sparse_matmul.cc", "updates": []}
    if not sparse_kernel.available():
        return out
    for width in widths:
        for s in sparsities:
            cfgs = compute_configs({"critic.width": width, "actor.sparsity": s, "critic.sparsity": s, "utd": 1})
            rates = paired_rates({c: update_step(cfg) for c, cfg in cfgs.items()}, seconds)
            masked, sparse = rates["masked"], rates["sparse"]
            out["updates"].append({"critic_width": width, "sparsity": s, "masked_updates_per_s": masked,
                                   "sparse_updates_per_s": sparse, "speedup": sparse / masked})
            print(f"  critic {width} S={s}: masked {masked:.2f} updates/s, sparse {sparse:.2f} updates/s: "
                  f"{sparse / masked:.2f}x", flush=True)
    if learn_seconds > 0:
        out["end_to_end"] = {}
        for compute in ("masked", "sparse"):
            rate = sparse_update_rate(512, 0.9, compute, seconds)
            e2e = end_to_end(learn_seconds, rate, {"actor.sparsity": 0.9, "critic.sparsity": 0.9,
                                                   "sparsity.compute": compute})
            out["end_to_end"][compute] = e2e
            print(f"  humanoid-run S=0.9 {compute}: {e2e['agent_steps_per_s']:.2f} agent steps/s", flush=True)
        e2e = out["end_to_end"]
        e2e["speedup"] = e2e["sparse"]["agent_steps_per_s"] / e2e["masked"]["agent_steps_per_s"]
    out["kernels"] = [r for width in kernel_widths for r in kernel_timings(width, 0.9, 256, seconds)]
    for r in out["kernels"]:
        print(f"  kernel {r['shape'][0]}x{r['shape'][1]} S=0.9 batch 256: forward {r['forward_speedup']:.2f}x "
              f"({r['sparse_forward_gflops']:.0f} vs dense {r['dense_forward_gflops']:.0f} GFLOP/s), backward "
              f"{r['backward_speedup']:.2f}x ({r['sparse_backward_gflops']:.0f} vs {r['dense_backward_gflops']:.0f})",
              flush=True)
    out["presets"] = []
    for preset in presets:
        path = str(config.PRESET_DIR / f"{preset}.yaml")
        rates = paired_rates({c: update_step(config.from_args(path, [f"sparsity.compute={c}", "utd=1"], check_env=False))
                              for c in ("masked", "sparse")}, seconds, rounds=2)
        out["presets"].append({"preset": preset, "masked_updates_per_s": rates["masked"],
                               "sparse_updates_per_s": rates["sparse"], "speedup": rates["sparse"] / rates["masked"]})
        print(f"  preset {preset}: masked {rates['masked']:.3f} updates/s, sparse {rates['sparse']:.3f} updates/s: "
              f"{rates['sparse'] / rates['masked']:.2f}x", flush=True)
    out["streaming"] = []
    for width in stream_widths:
        rates = paired_rates({c: stream_step(width, 0.9, c) for c in ("masked", "sparse")}, seconds)
        masked, sparse = rates["masked"], rates["sparse"]
        out["streaming"].append({"width": width, "sparsity": 0.9, "masked_steps_per_s": masked,
                                 "sparse_steps_per_s": sparse, "speedup": sparse / masked})
        print(f"  Stream AC(λ) width {width} S=0.9: masked {masked:.0f} steps/s, sparse {sparse:.0f} steps/s: "
              f"{sparse / masked:.2f}x", flush=True)
    return out


def stream_step(width: int, sparsity: float, compute: str):
    """A blocking call of Stream AC(λ)'s jitted step (one transition: ObGD on actor and critic, the next
    action), bundled preset at ``width`` with actor and critic at ``sparsity``, on Hopper's shapes."""
    from sparserl import stream
    from sparserl.agents import stream_ac

    cfg = config.from_args(str(config.PRESET_DIR / "stream_ac.yaml"),
                           [f"actor.width={width}", f"critic.width={width}", f"actor.sparsity={sparsity}",
                            f"critic.sparsity={sparsity}", f"sparsity.compute={compute}", "progress=false"],
                           check_env=False)
    obs_dim, action_dim = 11, 3  # Hopper-v5
    state = stream_ac.init(cfg, obs_dim, action_dim)
    step, begin = stream.make_step(cfg, 1000)
    obs = np.random.default_rng(0).normal(size=obs_dim).astype(np.float32)
    state, _ = begin(state, obs)
    holder = [state, common.fresh_sums(stream_ac)]
    transition = stream_ac.pack(obs, 1.0, False, False)

    def one():
        holder[0], holder[1], action = step(holder[0], holder[1], transition)
        np.asarray(action)

    return one


def seed_scaling(counts: list[int], seconds: float) -> list[dict]:
    cfg = config.build({"utd": 2}, check_env=False)
    agent = agents.get(cfg.agent)
    b = cfg.batch_size
    out = []
    for n in counts:
        states = [agent.init(config.build({"seed": i}, check_env=False), OBS_DIM, ACTION_DIM) for i in range(n)]
        state = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)
        del states
        batches = random_batches((n, 2, b))
        stats = ObsStats(jnp.zeros((n, OBS_DIM)), jnp.ones((n, OBS_DIM)))
        update = jax.jit(jax.vmap(lambda s, bt, st: agent.update(s, bt, st, cfg)), donate_argnums=0)
        holder = [state]

        def step():
            holder[0], metrics = update(holder[0], batches, stats)
            jax.block_until_ready(metrics)

        rate = timed(step, seconds) * 2
        out.append({"seeds": n, "updates_per_s": rate, "seed_updates_per_s": rate * n})
        print(f"  {n} seeds: {rate * n:.1f} seed-updates/s ({rate:.1f} updates/s each)", flush=True)
    return out


def stream_benchmark(width: int, seconds: float, loop_steps: int) -> dict:
    """Streaming Stream AC(λ) at one width: the jitted step alone, then the real loop on Hopper."""
    from sparserl import envs, stream
    from sparserl.agents import stream_ac

    preset = str(config.PRESET_DIR / "stream_ac.yaml")
    cfg = config.from_args(preset, [f"actor.width={width}", f"critic.width={width}", "progress=false"])
    env = envs.make(cfg.env, 0, 1)
    state = stream_ac.init(cfg, env.obs_dim, env.action_dim)
    flops = stream_ac.update_flops(cfg, state, env.obs_dim, env.action_dim)
    step, begin = stream.make_step(cfg, env.time_limit)
    state, _ = begin(state, env.reset())
    holder = [state, common.fresh_sums(stream_ac)]
    transition = stream_ac.pack(env.reset(), 1.0, False, False)

    def one():
        holder[0], holder[1], action = step(holder[0], holder[1], transition)
        np.asarray(action)

    updates_per_s = timed(one, seconds)
    with tempfile.TemporaryDirectory() as tmp:  # first row: compilation and warm-up; timed: the rows after it
        run = config.build({**{k: v for k, v in config.flatten(cfg.to_dict()).items()}, "env_steps": loop_steps,
                            "eval_every": max(1, loop_steps // 6), "checkpoint_every": 10**9,
                            "run_dir": str(Path(tmp) / "run")})
        summary = train.train(run, log=lambda msg: None)
        rows = list(csv.DictReader(open(Path(tmp) / "run" / "metrics.csv")))
    steps = int(rows[-1]["agent_step"]) - int(rows[0]["agent_step"])
    loop_rate = steps / (float(rows[-1]["wall_time"]) - float(rows[0]["wall_time"]))
    params = sum(summary["params"][m]["total_params"] for m in ("actor", "critic"))
    return {"width": width, "env": cfg.env, "total_params": params, "flops_per_step": flops,
            "updates_per_s": updates_per_s, "agent_steps_per_s": loop_rate, "time_share": summary["time_share"]}


def encoder_benchmark(seconds: float, batch: int = 256) -> dict:
    from sparserl import networks

    params = networks.init_conv_encoder(jax.random.PRNGKey(0), 9, 32, 4)
    frames = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, 84, 84, 9)), jnp.uint8)
    weights = jax.random.normal(jax.random.PRNGKey(1), (networks.conv_out_size(84, 4) ** 2 * 32,)) * 0.01
    out, flops = {}, None
    # sparserl: the encoder as the agent runs it (fused conv+bias+ReLU per chunk); conv2d: the same
    # chunked convolution with bias and ReLU as separate whole-batch XLA ops
    for name, conv in (("reference", networks.conv2d_reference), ("im2col", networks.conv2d_im2col),
                       ("conv2d", networks.conv2d), ("sparserl", None)):
        loss = lambda p, x, conv=conv: (networks.conv_encoder(p, x, conv=conv) @ weights).mean()
        step = jax.jit(jax.value_and_grad(loss))
        if flops is None:  # the plain convolution's count (a scan's body may be counted once)
            cost = step.lower(params, frames).compile().cost_analysis()
            flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
        rate = timed(lambda step=step: jax.block_until_ready(step(params, frames)), seconds)
        out[name] = {"seconds_per_call": 1.0 / rate, "achieved_gflops": rate * flops / 1e9}
    # the ceiling of any patches-and-matmul convolution here: a bare matmul of the 32-channel layers'
    # own shape (one chunk of 8 images of 37x37 patches x 288 inputs -> 32 channels)
    a = jax.random.normal(jax.random.PRNGKey(2), (8 * 37 * 37, 288), jnp.float32)
    k = jax.random.normal(jax.random.PRNGKey(3), (288, 32), jnp.float32)
    matmul = jax.jit(lambda a, k: a @ k)
    conv_shape = timed(lambda: matmul(a, k).block_until_ready(), seconds) * 2 * a.shape[0] * 288 * 32 / 1e9
    return {"batch": batch, "flops_per_call": flops, "variants": out, "conv_shape_matmul_gflops": conv_shape}


def pixel_benchmark(seconds: float, env_steps: int = 600) -> dict:
    from sparserl import envs

    frames = {}
    for fast in (False, True):
        env = envs.PixelEnv("cartpole-swingup", 0, 1, 84, 3, fast)
        env.reset()
        zero = np.zeros(env.action_dim)
        frames["fast" if fast else "default"] = timed(lambda env=env, zero=zero: env.step(zero), seconds)  # one render per step
    with tempfile.TemporaryDirectory() as tmp:
        cfg = config.build({"agent": "drqv2", "env": "cartpole-swingup", "env_steps": env_steps,
                            "warmup_steps": env_steps // 4, "actor.width": 256, "critic.width": 256,
                            "batch_size": 64, "render.fast": True, "eval_every": env_steps // 2,
                            "eval_episodes": 1, "final_eval_episodes": 1, "diag_every": 0,
                            "checkpoint_every": 10**9, "progress": False, "run_dir": str(Path(tmp) / "run")})
        train.train(cfg, log=lambda msg: None)
        with open(Path(tmp) / "run" / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
    return {"gl_backend": envs.gl_backend(), "frames_per_s": frames,
            "train": {"config": "drqv2 cartpole-swingup 84x84, actor/critic width 256, batch 64, utd 1, "
                                        "render.fast; steps/s of the learning half (includes one eval episode)",
                      "learning_agent_steps_per_s": float(rows[-1]["steps_per_s"])}}


def checkpoint_benchmark(presets: list[str], repeats: int = 2) -> list[dict]:
    """Seconds to write one training checkpoint (agent state, optimizer moments, target, masks, and a
    *full* replay buffer: the worst case) to the current directory's disk, per preset. With one agent
    step, this is the lead time a graceful stop needs (Slurm: ``--signal=USR2@<lead>``)."""
    from sparserl import checkpoint, replay

    out = []
    for preset in presets:
        cfg = config.from_args(str(config.PRESET_DIR / f"{preset}.yaml"), [])
        agent = agents.get(cfg.agent)
        abstract = jax.eval_shape(lambda: agent.init(cfg, OBS_DIM, ACTION_DIM))
        state = jax.tree_util.tree_map(lambda x: np.ones(x.shape, x.dtype), abstract)
        buffer = replay.for_config(cfg, OBS_DIM, ACTION_DIM)
        buffer.size = buffer.capacity  # full: every transition is written
        arrays = checkpoint.flatten_tree(state, "state")
        arrays.update({f"buffer/{k}": v for k, v in buffer.checkpoint_arrays().items()})
        nbytes = sum(a.nbytes for a in arrays.values())
        seconds = []
        with tempfile.TemporaryDirectory(dir=".") as d:
            for i in range(repeats):
                t = time.perf_counter()
                checkpoint.save(Path(d), i, arrays, {"bench": True}, keep=1)
                seconds.append(time.perf_counter() - t)
        r = {"preset": preset, "bytes": nbytes, "state_bytes": sum(a.nbytes for k, a in arrays.items()
                                                                      if k.startswith("state")),
             "seconds": min(seconds), "mb_per_s": nbytes / 1e6 / min(seconds)}
        print(f"  {preset}: {nbytes / 1e9:.2f} GB (agent state {r['state_bytes'] / 1e9:.2f} GB) in "
              f"{r['seconds']:.1f} s = {r['mb_per_s']:.0f} MB/s", flush=True)
        out.append(r)
        del state, buffer, arrays
    return out


def write_results(results: dict, path: str) -> None:
    """``bench.json`` as measured so far: written after every section, so a kill keeps what was measured."""
    with open(path, "w") as f:
        json.dump(results, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench.json")
    parser.add_argument("--widths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--seconds", type=float, default=5.0, help="timing window per measurement")
    parser.add_argument("--utd", type=int, default=2, help="gradient steps per jitted call")
    parser.add_argument("--learn-seconds", type=float, default=60.0, help="end-to-end learning time (0: skip)")
    parser.add_argument("--seed-counts", type=int, nargs="*", default=[1, 2, 4, 8])
    parser.add_argument("--topology-widths", type=int, nargs="*", default=[512],
                        help="critic widths of the topology-update benchmark (none: skip)")
    parser.add_argument("--stream-widths", type=int, nargs="*", default=[128, 1024],
                        help="Stream AC(λ) widths to time (none: skip)")
    parser.add_argument("--stream-steps", type=int, default=6000, help="env steps of each streaming loop run")
    parser.add_argument("--checkpoint-presets", nargs="*", default=["humanoid_run", "humanoid_run_109m_sparse"],
                        help="presets whose checkpoint write time is measured (none: skip)")
    parser.add_argument("--sparse-widths", type=int, nargs="*", default=[512, 1024, 2048],
                        help="critic widths of the sparse-compute comparison (none: skip)")
    parser.add_argument("--sparse-sparsities", type=float, nargs="+", default=[0.8, 0.9, 0.95])
    parser.add_argument("--sparse-seconds", type=float, default=2.0, help="timing window per sparse-compute point")
    parser.add_argument("--sparse-learn-seconds", type=float, default=30.0,
                        help="end-to-end learning time per mode at S=0.9 (0: skip)")
    parser.add_argument("--sparse-presets", nargs="*", default=["humanoid_run_109m_sparse"],
                        help="presets whose update is timed masked vs sparse (none: skip)")
    parser.add_argument("--only-sparse", action="store_true", help="only the sparse-compute section")
    parser.add_argument("--no-pixels", action="store_true", help="skip the encoder and pixel benchmarks")
    parser.add_argument("--only-pixels", action="store_true", help="only the matmul, encoder and pixel benchmarks")
    args = parser.parse_args()

    if args.only_sparse:
        results = {"device": str(jax.devices()[0]), "jax": jax.__version__, "machine": platform.machine()}
        results["sparse_compute"] = sparse_compute(args.sparse_widths, args.sparse_sparsities, args.sparse_seconds,
                                                   args.sparse_learn_seconds, presets=args.sparse_presets)
        write_results(results, args.out)
        return
    results = {"device": str(jax.devices()[0]), "jax": jax.__version__, "machine": platform.machine(),
               "matmul_gflops": matmul_gflops(256, max(args.widths), args.seconds), "updates": []}
    print(f"matmul 256x{max(args.widths)}x{4 * max(args.widths)}: {results['matmul_gflops']:.1f} GFLOP/s")
    if not args.no_pixels:
        enc = results["encoder"] = encoder_benchmark(args.seconds)
        print(f"pixel encoder fwd+bwd, batch {enc['batch']}: {enc['flops_per_call'] / 1e9:.1f} GFLOP per call")
        for name, r in enc["variants"].items():
            r["ratio_to_matmul"] = r["achieved_gflops"] / results["matmul_gflops"]
            print(f"  {name:<10} {r['seconds_per_call']:.3f} s  {r['achieved_gflops']:.1f} GFLOP/s  "
                  f"{r['ratio_to_matmul']:.2f} x matmul", flush=True)
        enc["conv_shape_matmul_ratio"] = enc["conv_shape_matmul_gflops"] / results["matmul_gflops"]
        print(f"  (a bare matmul of the conv layers' shape, 10952x288 @ 288x32: {enc['conv_shape_matmul_gflops']:.1f} "
              f"GFLOP/s = {enc['conv_shape_matmul_ratio']:.2f} x matmul)", flush=True)
        pix = results["pixels"] = pixel_benchmark(args.seconds)
        print(f"rendering 84x84 (MUJOCO_GL={pix['gl_backend']}): {pix['frames_per_s']['default']:.0f} frames/s default, "
              f"{pix['frames_per_s']['fast']:.0f} frames/s render.fast; drqv2 small: "
              f"{pix['train']['learning_agent_steps_per_s']:.1f} agent steps/s", flush=True)
        write_results(results, args.out)
        if args.only_pixels:
            return
    print(f"{'critic':>8} {'params':>12} {'GFLOP/update':>13} {'updates/s':>10} {'GFLOP/s':>9} {'efficiency':>10} "
          f"{'vs own-shape matmul':>20}")
    for width in args.widths:
        r = update_benchmark(width, args.utd, args.seconds)
        r["efficiency"] = r["achieved_gflops"] / results["matmul_gflops"]
        # the same ratio against a matmul of this critic's own largest layer (256 x H x 4H)
        r["matmul_gflops_own_shape"] = matmul_gflops(256, width, args.seconds)
        r["efficiency_own_shape"] = r["achieved_gflops"] / r["matmul_gflops_own_shape"]
        results["updates"].append(r)
        print(f"{width:>8} {r['total_params']:>12,} {r['flops_per_update'] / 1e9:>13.2f} {r['updates_per_s']:>10.1f} "
              f"{r['achieved_gflops']:>9.1f} {r['efficiency']:>10.2f} {r['efficiency_own_shape']:>20.2f}", flush=True)
        write_results(results, args.out)
    default = results["updates"][0]
    if args.learn_seconds > 0:
        e2e = end_to_end(args.learn_seconds, default["updates_per_s"])
        e2e["flop_limited_agent_steps_per_s"] = results["matmul_gflops"] * 1e9 / (default["flops_per_update"] * 2)
        e2e["ratio_to_flop_limited"] = e2e["agent_steps_per_s"] / e2e["flop_limited_agent_steps_per_s"]
        results["end_to_end"] = e2e
        shares = ", ".join(f"{k} {v:.1%}" for k, v in e2e["time_share"].items())
        print(f"end to end (humanoid-run, critic {default['critic_width']}): {e2e['agent_steps_per_s']:.2f} agent steps/s "
              f"= {e2e['ratio_to_flop_limited']:.2f} x FLOP-limited {e2e['flop_limited_agent_steps_per_s']:.2f}; {shares}")
        write_results(results, args.out)
    if args.topology_widths:
        print("dynamic topology (SET, RigL on actor and critic at sparsity 0.9): one topology update vs one update call")
        results["topology"] = []
        for width in args.topology_widths:
            r = topology_benchmark(width, args.utd, args.seconds)
            results["topology"].append(r)
            for method in ("set", "rigl"):
                m = r[method]
                print(f"  critic {width} {method:<4}: {m['topology_update_seconds'] * 1e3:.1f} ms = "
                      f"{m['ratio_to_update_call']:.1f} x an update call ({m['update_call_seconds'] * 1e3:.1f} ms, "
                      f"utd {args.utd}); every {m['every']} gradient steps: {m['overhead_at_every']:.2%} overhead",
                      flush=True)
            write_results(results, args.out)
    if args.sparse_widths:
        print("sparse compute (sparsity.compute=masked vs sparse, default SAC, actor and critic at S):")
        results["sparse_compute"] = sparse_compute(args.sparse_widths, args.sparse_sparsities, args.sparse_seconds,
                                                   args.sparse_learn_seconds, presets=args.sparse_presets)
        write_results(results, args.out)
    if args.seed_counts:
        print("vmapped seeds (default SAC):")
        results["seeds"] = seed_scaling(args.seed_counts, args.seconds)
    if args.stream_widths:
        print("streaming Stream AC(λ), gym:Hopper-v5:")
        results["streaming"] = []
        for width in args.stream_widths:
            r = stream_benchmark(width, args.seconds, args.stream_steps)
            results["streaming"].append(r)
            print(f"  width {width}: {r['total_params']:,} params, {r['flops_per_step'] / 1e6:.1f} MFLOP/step, "
                  f"{r['updates_per_s']:.0f} updates/s (jitted step alone), {r['agent_steps_per_s']:.0f} agent steps/s "
                  f"(loop with env)", flush=True)
            write_results(results, args.out)
    if args.checkpoint_presets:
        print("checkpoint writes (full replay buffer):")
        results["checkpoint_write"] = checkpoint_benchmark(args.checkpoint_presets)
    write_results(results, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from sparserl import backend

    backend.restart_with_huge_pages()  # as the `sparserl` command runs (see sparserl/backend.py)
    main()
