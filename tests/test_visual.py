"""Visual RL (DrQ-v2 from pixels): pixel env, frame replay, augmentation, conv sparsity, the agent."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from sparserl import agents, config, envs, networks, replay, sparsity, train
from sparserl.agents import drqv2
from sparserl.agents.common import Batch, ObsStats
from sparserl.config import ConfigError



def tiny_drqv2(**overrides):
    """A small DrQ-v2 config: 24x24 frames, 2 conv layers of 8 channels, widths 32, batch 8."""
    values = {"agent": "drqv2", "render.size": 24, "encoder.channels": 8, "encoder.layers": 2,
              "encoder.feature_dim": 16, "actor.width": 32, "critic.width": 32, "batch_size": 8,
              "warmup_steps": 0}
    values.update(overrides)
    return config.build(values, check_env=False)


def random_batch(cfg, rng, k: int | None = None, action_dim: int = 2) -> Batch:
    lead = (cfg.batch_size,) if k is None else (k, cfg.batch_size)
    shape = drqv2.obs_shape(cfg)
    frames = lambda: jnp.asarray(rng.integers(0, 256, lead + shape), jnp.uint8)
    return Batch(frames(), jnp.asarray(rng.uniform(-1, 1, lead + (action_dim,)), jnp.float32),
                 jnp.asarray(rng.normal(size=lead), jnp.float32), jnp.full(lead, 0.97, jnp.float32), frames())


# ----------------------------------------------------------------------------------------------
# Config


def test_drqv2_defaults_and_pixel_checks():
    cfg = config.build({"agent": "drqv2", "env": "cartpole-swingup"})
    assert cfg.pixels and not cfg.obs_norm and cfg.n_step == 3 and cfg.tau == 0.01 and cfg.utd == 1
    assert cfg.actor.width == cfg.critic.width == 1024 and cfg.weight_decay == 0.0 and cfg.warmup_steps == 2000
    assert config.build({"agent": "drqv2", "tau": 0.02}, check_env=False).tau == 0.02  # user values win
    assert config.build({}, check_env=False).n_step == 1  # state agents keep their defaults
    for values, key in (({"agent": "drqv2", "pixels": False}, "pixels=false"),
                        ({"agent": "sac", "pixels": True, "obs_norm": False}, "pixels=true"),
                        ({"agent": "drqv2", "obs_norm": True}, "obs_norm=true"),
                        ({"agent": "sac", "n_step": 3}, "n_step=3"),
                        ({"agent": "drqv2", "env": "gym:Pendulum-v1"}, "env=")):
        with pytest.raises(ConfigError, match=key):
            config.build(values, check_env=False)


def _expand(preset: dict, scale: str | None) -> list[dict]:
    base, grid = dict(preset["base"]), dict(preset["grid"])
    if scale:
        over = preset["scales"][scale]
        base.update(over.get("base", {}))
        for k, v in over.get("grid", {}).items():
            if v is None:
                grid.pop(k, None)
            else:
                grid[k] = v
    points = []
    for combo in itertools.product(*[[(k, v) for v in vals] for k, vals in grid.items()]):
        values = dict(base)
        for k, v in combo:
            if isinstance(v, dict):
                values.update({kk: vv for kk, vv in v.items() if kk != "label"})
            else:
                values[k] = v
        points.append(values)
    return points


@pytest.mark.parametrize("scale", [None, "small", "smoke"])
def test_visual_preset_points_build(scale):
    preset = yaml.safe_load((config.PRESET_DIR / "experiments" / "visual.yaml").read_text())
    points = _expand(preset, scale)
    assert points
    for values in points:
        cfg = config.build(values)
        assert cfg.agent == "drqv2" and cfg.pixels


# ----------------------------------------------------------------------------------------------
# Pixel env


def test_frame_stack_is_the_last_three_rendered_frames():
    env = envs.PixelEnv("cartpole-swingup", 7, 2, size=32, frame_stack=3, fast=True)
    render = lambda: env.physics.render(32, 32, camera_id=0, scene_callback=envs._fast_scene)  # independent path
    obs = env.reset()
    first = render()
    assert obs.shape == (32, 32, 9) and obs.dtype == np.uint8
    for j in range(3):  # a reset fills the stack with the first frame
        np.testing.assert_array_equal(obs[..., 3 * j:3 * j + 3], first)
    rendered = [first] * 3
    rng = np.random.default_rng(0)
    for _ in range(4):
        obs, *_ = env.step(rng.uniform(-1, 1, env.action_dim))
        rendered.append(render())
        for j, frame in enumerate(rendered[-3:]):  # oldest first
            np.testing.assert_array_equal(obs[..., 3 * j:3 * j + 3], frame)
    assert not np.array_equal(rendered[-1], rendered[0])  # the cart moved: the check is not vacuous


# ----------------------------------------------------------------------------------------------
# Frame replay


def _fill(buffer: replay.FrameReplay, episodes: list[tuple[int, bool]], start_value: int = 1) -> list[int]:
    """Episodes of (steps, terminated); frame pixels hold their global number; reward t at step t."""
    value, c = start_value, buffer.frame_shape[-1]
    numbers = []
    for steps, terminated in episodes:
        obs = np.full((1, 1, c * buffer.frame_stack), value, np.uint8)
        numbers.append(value)
        for t in range(steps):
            value += 1
            nxt = np.concatenate([obs[..., c:], np.full((1, 1, c), value, np.uint8)], -1)
            last = t == steps - 1
            buffer.add(obs, np.full(1, value, np.float32), float(value), 0.0 if last and terminated else 1.0, nxt,
                       episode_end=last)
            obs = nxt
        value += 1
    return numbers


def test_frame_replay_stacks_nstep_and_episode_boundaries():
    buf = replay.FrameReplay(100, (1, 1, 1), frame_stack=3, action_dim=1, n_step=3, gamma=0.5)
    _fill(buf, [(4, True), (5, False)])  # frames 1..5 (episode 1), 6..11 (episode 2)
    assert buf.total == 11 and buf.size == 9  # one transition per step; last frames start none
    g = buf.valid_starts()
    batch = buf.gather(g)
    stack = batch.obs[:, 0, 0, :]
    np.testing.assert_array_equal(stack[0], [1, 1, 1])  # clamped at the episode start
    np.testing.assert_array_equal(stack[2], [1, 2, 3])
    np.testing.assert_array_equal(stack[4], [6, 6, 6])  # no frame of the previous episode leaks in
    np.testing.assert_array_equal(stack[6], [6, 7, 8])
    # n-step from frame 1: rewards 2, 3, 4 -> 2 + .5*3 + .25*4 = 4.5, bootstrap .5^3 from frame 4
    assert batch.reward[0] == pytest.approx(4.5) and batch.discount[0] == pytest.approx(0.125)
    np.testing.assert_array_equal(batch.next_obs[0, 0, 0], [2, 3, 4])
    # from frame 3: rewards 4, 5 then the true terminal -> discount 0
    assert batch.reward[2] == pytest.approx(4 + 0.5 * 5) and batch.discount[2] == 0.0
    # from frame 9 (episode 2 truncated at 11 by time limit): rewards 10, 11, bootstrap .25
    assert batch.reward[7] == pytest.approx(10 + 0.5 * 11) and batch.discount[7] == pytest.approx(0.25)
    np.testing.assert_array_equal(batch.next_obs[7, 0, 0], [9, 10, 11])
    np.testing.assert_array_equal(batch.action[:, 0], g + 2)  # the action from each start frame (frame g is value g+1)


def test_frame_replay_ring_drops_overwritten_stacks_and_restores():
    buf = replay.FrameReplay(6, (2, 2, 3), frame_stack=3, action_dim=1, n_step=1)
    _fill(buf, [(20, False)])
    assert buf.frames.shape[0] == 9  # capacity + frame_stack slots: each frame stored once
    g = buf.valid_starts()
    assert g.min() >= buf.total - buf.slots + 2 and g.max() == buf.total - 2
    batch = buf.gather(g)
    np.testing.assert_array_equal(batch.obs[:, 0, 0, ::3], np.stack([g - 2, g - 1, g], 1) + 1)
    copy = replay.FrameReplay(6, (2, 2, 3), frame_stack=3, action_dim=1, n_step=1)
    copy.restore(buf.checkpoint_arrays(), buf.checkpoint_meta())
    a, b = buf.sample(np.random.default_rng(1), 2, 5), copy.sample(np.random.default_rng(1), 2, 5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_frame_replay_memory_accounting_and_refusal(monkeypatch, tmp_path):
    buf = replay.FrameReplay(1000, (84, 84, 3), frame_stack=3, action_dim=6)
    per = replay.FrameReplay.bytes_per_transition((84, 84, 3), 6)
    assert buf.nbytes == buf.slots * per
    assert buf.frames.dtype == np.uint8 and buf.frames.nbytes == buf.slots * 84 * 84 * 3
    assert 21.1e9 < per * 1e6 < 21.3e9  # 21.2 GB per million transitions
    with pytest.raises(ConfigError, match="buffer_size"):
        replay.check_fits(10**9, "frame replay", available=10**8)
    # small networks (estimated at ~0.1 GB with optimizer and margins) fit in 0.3 GB; a frame replay of
    # 20,000 transitions (0.42 GB) does not
    cfg = config.build({"agent": "drqv2", "env": "cartpole-swingup", "env_steps": 40_000, "buffer_size": 20_000,
                        "actor.width": 16, "critic.width": 16, "encoder.channels": 4,
                        "run_dir": str(tmp_path / "run"), "progress": False})
    monkeypatch.setattr(replay, "mem_available", lambda: 3 * 10**8)
    with pytest.raises(ConfigError, match=r"frame replay.*needs 0\.4"):
        train.train(cfg, log=lambda m: None)
    assert not (tmp_path / "run" / "metrics.csv").exists()  # refused before training


# ----------------------------------------------------------------------------------------------
# Augmentation, conv sparsity, conv speed variant


def test_random_shift_stays_within_the_pad():
    pad, n = 4, 64
    obs = jnp.asarray(np.random.default_rng(0).integers(0, 256, (n, 12, 12, 3)), jnp.uint8)
    out = np.asarray(drqv2.random_shift(obs, jax.random.PRNGKey(0), pad))
    padded = np.pad(np.asarray(obs), ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    seen = set()
    for i in range(n):
        found = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 if np.array_equal(padded[i, dy:dy + 12, dx:dx + 12], out[i])]
        assert found, f"sample {i} is not a crop of its padded image"
        seen.add(found[0])
    assert len(seen) > 10  # independent shifts per sample
    assert np.array_equal(drqv2.random_shift(obs, jax.random.PRNGKey(0), 0), obs)


def test_erk_allocates_conv_kernels_by_sum_over_prod():
    shapes = {"conv0/kernel": (3, 3, 9, 32), "conv1/kernel": (3, 3, 32, 32), "dense/kernel": (800, 50),
              "conv0/bias": (32,)}
    dens = sparsity.allocate(shapes, 0.8, "erk", "kernels")
    score = {n: sum(s) / math.prod(s) for n, s in shapes.items() if len(s) > 1}
    ratio = dens["conv0/kernel"] / dens["conv1/kernel"]
    assert ratio == pytest.approx(score["conv0/kernel"] / score["conv1/kernel"])
    assert dens["dense/kernel"] / dens["conv1/kernel"] == pytest.approx(score["dense/kernel"] / score["conv1/kernel"])
    kept = sum(dens[n] * math.prod(shapes[n]) for n in score)
    assert kept == pytest.approx(0.2 * sum(math.prod(shapes[n]) for n in score))
    params = networks.init_conv_encoder(jax.random.PRNGKey(0), 9, 32, 2)
    mask = sparsity.make_mask(jax.random.PRNGKey(1), params, 0.8, "erk", "kernels")
    assert mask["conv0"]["kernel"].shape == (3, 3, 9, 32)
    want = sparsity.allocate({k: v.shape for k, v in sparsity.named_leaves(params)}, 0.8, "erk", "kernels")
    assert int(mask["conv1"]["kernel"].sum()) == round(want["conv1/kernel"] * 9216)
    assert int(mask["conv0"]["kernel"].sum()) == round(want["conv0/kernel"] * 2592)


@pytest.mark.parametrize("stride,shape", [(1, (3, 11, 10, 5)), (2, (2, 13, 13, 9))])
@pytest.mark.parametrize("relu,pixels", [(False, True), (True, False), (True, True)])
def test_fused_conv_relu_equals_lax_conv(stride, shape, relu, pixels):
    """conv_relu / conv2d(pixels=True) == relu?(lax conv of x/255 - 0.5), forward and all gradients."""
    p = networks.init_conv(jax.random.PRNGKey(0), shape[-1], 7)
    p["bias"] = jax.random.normal(jax.random.PRNGKey(1), (7,))
    x = jax.random.uniform(jax.random.PRNGKey(2), shape, maxval=255.0) if pixels else jax.random.normal(
        jax.random.PRNGKey(2), shape)
    fused = networks.conv_relu if relu else networks.conv2d
    ours = lambda p, x: fused(p, x, stride, pixels=pixels)
    prep = (lambda x: x / 255.0 - 0.5) if pixels else (lambda x: x)
    ref = lambda p, x: (jax.nn.relu if relu else (lambda y: y))(networks.conv2d_reference(p, prep(x), stride))
    np.testing.assert_allclose(ours(p, x), ref(p, x), rtol=1e-5, atol=1e-5)
    w = jax.random.normal(jax.random.PRNGKey(3), ref(p, x).shape)
    grads = [jax.grad(lambda p, x, f=f: jnp.sum(jnp.tanh(f(p, x)) * w), argnums=(0, 1))(p, x) for f in (ours, ref)]
    for a, b in zip(jax.tree_util.tree_leaves(grads[0]), jax.tree_util.tree_leaves(grads[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 / (255.0 if pixels and a.shape == x.shape else 1.0))


def test_encoder_fused_capture_and_reference_paths_agree():
    """The agent's fused encoder, its diagnostics (capture) path and plain lax convs: same features
    and parameter gradients from uint8 frames, at a batch that is not a multiple of the chunk."""
    params = networks.init_conv_encoder(jax.random.PRNGKey(0), 9, 8, 3)
    for i, name in enumerate(params):
        params[name]["bias"] = 0.1 * jax.random.normal(jax.random.PRNGKey(10 + i), (8,))
    frames = jnp.asarray(np.random.default_rng(0).integers(0, 256, (11, 24, 24, 9)), jnp.uint8)
    w = jax.random.normal(jax.random.PRNGKey(1), (networks.conv_out_size(24, 3) ** 2 * 8,))
    capture = {}
    runs = {"fused": {}, "capture": {"capture": capture}, "ref": {"conv": networks.conv2d_reference}}
    out = {k: jax.value_and_grad(lambda p, kw=kw: jnp.sum(jnp.square(jnp.tanh(networks.conv_encoder(p, frames, **kw)) @ w)))(params)
           for k, kw in runs.items()}
    feats = {k: networks.conv_encoder(params, frames, **kw) for k, kw in runs.items() if k != "capture"}
    np.testing.assert_allclose(feats["fused"], feats["ref"], rtol=1e-5, atol=1e-5)
    assert {"pre_act/conv0", "post_act/conv2"} <= set(capture)
    for k in ("fused", "capture"):
        np.testing.assert_allclose(out[k][0], out["ref"][0], rtol=1e-4)
        for a, b in zip(jax.tree_util.tree_leaves(out[k][1]), jax.tree_util.tree_leaves(out["ref"][1])):
            np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3 * float(jnp.abs(b).max()))
    assert float(jnp.abs(out["fused"][1]["conv0"]["kernel"]).max()) > 0  # gradients reach the first layer
    # float frames: the gradient reaches the pixels too (it is not used by the agents, but must be right)
    pixel_grad = {k: jax.grad(lambda x, kw=kw: jnp.sum(jnp.square(jnp.tanh(networks.conv_encoder(params, x, **kw)) @ w)))(
        frames.astype(jnp.float32)) for k, kw in runs.items() if k != "capture"}
    np.testing.assert_allclose(pixel_grad["fused"], pixel_grad["ref"], rtol=1e-3,
                               atol=1e-3 * float(jnp.abs(pixel_grad["ref"]).max()))


@pytest.mark.parametrize("stride,shape", [(1, (3, 11, 10, 5)), (2, (2, 13, 13, 9))])
def test_conv2d_equals_lax_conv_forward_and_gradients(stride, shape):
    p = networks.init_conv(jax.random.PRNGKey(0), shape[-1], 7)
    p["bias"] = jax.random.normal(jax.random.PRNGKey(1), (7,))
    x = jax.random.normal(jax.random.PRNGKey(2), shape)
    w = jax.random.normal(jax.random.PRNGKey(3), networks.conv2d_reference(p, x, stride).shape)
    outs = {}
    for name, conv in (("ref", networks.conv2d_reference), ("fast", networks.conv2d)):
        loss = lambda p, x, conv=conv: jnp.sum(jnp.tanh(conv(p, x, stride)) * w)
        outs[name] = jax.jit(lambda p, x, conv=conv, loss=loss: (conv(p, x, stride),
                                                                 jax.grad(loss, argnums=(0, 1))(p, x)))(p, x)
    for name in ("fast",):
        np.testing.assert_allclose(outs[name][0], outs["ref"][0], rtol=1e-5, atol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(outs[name][1]), jax.tree_util.tree_leaves(outs["ref"][1])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# The agent


@pytest.fixture(scope="module")
def fixed_batch_run():
    """60 gradient steps of a sparse tiny DrQ-v2 on one fixed batch (one compile, shared by two tests).
    No augmentation and discount 0: the critic regresses fixed images to fixed rewards."""
    cfg = tiny_drqv2(lr=1e-3, **{"encoder.sparsity": 0.5, "actor.sparsity": 0.8, "critic.sparsity": 0.8,
                                 "drqv2.aug_pad": 0})
    state = drqv2.init(cfg, 0, 2)
    batch = random_batch(cfg, np.random.default_rng(0))._replace(discount=jnp.zeros((cfg.batch_size,)))
    batches = jax.tree_util.tree_map(lambda x: x[None], batch)
    update = jax.jit(drqv2.update, static_argnames="cfg")
    stats = ObsStats(jnp.zeros(1), jnp.ones(1))
    history = []
    for _ in range(60):
        state, metrics = update(state, batches, stats, cfg=cfg)
        history.append(jax.device_get(metrics))
    metrics = {k: np.concatenate([h[k] for h in history]) for k in history[0]}
    return state, metrics


def test_masks_stay_zero_through_updates(fixed_batch_run):
    state, metrics = fixed_batch_run
    assert set(agents.modules(state)) == {"encoder", "actor", "critic"}
    assert all(np.isfinite(v).all() for v in metrics.values())
    checked = 0
    for name, module in agents.modules(state).items():
        trees = [module.params] + ([state.target] if name == "critic" else [])
        for tree in trees:
            for (path, x), m in zip(sparsity.named_leaves(tree), jax.tree_util.tree_leaves(module.mask)):
                if np.ndim(m):
                    assert not np.asarray(x)[~np.asarray(m)].any(), f"{name}/{path} moved a pruned weight"
                    assert np.asarray(x)[np.asarray(m)].any()
                    checked += 1
    assert checked >= 8  # conv kernels, trunks and hidden layers of every module, and the target
    assert int(state.step) == 60


def test_critic_loss_decreases_on_a_fixed_batch(fixed_batch_run):
    _, metrics = fixed_batch_run
    losses = metrics["critic_loss"]
    assert losses[-5:].mean() < 0.3 * losses[:3].mean(), losses  # measured: 1.53 -> 0.30 in 60 steps
    assert (metrics["encoder_grad_norm"] > 0).all()  # the critic loss trains the encoder


def test_act_uses_the_std_schedule(fixed_batch_run):
    state, _ = fixed_batch_run
    cfg = tiny_drqv2(**{"drqv2.std_steps": 1000, "action_repeat": 2})
    obs = random_batch(cfg, np.random.default_rng(0)).obs
    params = agents.policy_params(state)
    mu = drqv2.act(params, obs, jax.random.PRNGKey(0), True, cfg)
    spread = lambda step: float(jnp.std(drqv2.act(params, obs, jax.random.PRNGKey(1), False, cfg, step) - mu))
    assert float(drqv2.schedule_std(cfg, 0)) == 1.0 and float(drqv2.schedule_std(cfg, 5000)) == pytest.approx(0.1)
    assert spread(0) > 3 * spread(1000)  # 1000 agent steps (std_steps counts agent steps): std 0.1


@pytest.mark.slow
def test_train_and_resume_a_pixel_run(tmp_path):
    """The real loop end to end on a tiny pixel config: run-directory contract, then an exact resume
    from a checkpoint taken at an episode end (cartpole episodes: 1000 env steps = 100 agent steps)."""
    values = {"agent": "drqv2", "env": "cartpole-balance", "render.size": 32, "encoder.layers": 2,
              "encoder.channels": 8, "actor.width": 32, "critic.width": 32, "batch_size": 8, "action_repeat": 10,
              "env_steps": 2000, "warmup_steps": 150, "eval_every": 1000, "eval_episodes": 1, "final_eval_episodes": 1,
              "checkpoint_every": 1000, "diag_every": 1000, "diag_probe_size": 16, "diag_grad_samples": 4,
              "render.fast": True, "encoder.sparsity": 0.5, "critic.sparsity": 0.8, "progress": False}
    full = config.build({**values, "run_dir": str(tmp_path / "full")})
    summary = train.train(full, log=lambda m: None)
    run = tmp_path / "full"
    assert {"encoder", "actor", "critic"} <= set(summary["params"])
    assert summary["params"]["critic"]["sparsity"] == pytest.approx(0.8, abs=0.01)
    diag = (run / "diagnostics.csv").read_text()
    assert "encoder_srank_trunk" in diag and "encoder_dormant_post_act_tau0" in diag
    ckpts = sorted((run / "checkpoints").glob("step_*.json"))
    assert len(ckpts) == 2  # at env step 1000 (an episode end) and the final one
    # resume: delete the final checkpoint and summary, rerun -> the same numbers
    metrics_before = (run / "metrics.csv").read_text()
    for suffix in (".json", ".npz"):
        (run / "checkpoints" / f"step_{full.agent_steps:010d}{suffix}").unlink()
    (run / "summary.json").unlink()
    again = train.train(full, log=lambda m: None)
    strip = lambda text: [line.rsplit(",", 2)[0] for line in text.splitlines()]  # drop timing columns
    assert strip((run / "metrics.csv").read_text()) == strip(metrics_before)
    assert again["final_return"] == summary["final_return"]


@pytest.mark.slow
def test_short_pixel_run_learns(tmp_path):
    """cartpole-balance from 48x48 pixels, 30,000 env steps (500 random agent steps, 14,500 updates at
    batch 64, widths 128, render.fast, std 1.0 -> 0.1 over 7,500 agent steps = 15,000 env steps, one update
    every 2 agent steps (DrQ-v2's default; 7,250 updates)): the final deterministic policy (5 episodes) must
    beat the one evaluated at env step 3,000 by 100."""
    cfg = config.build({"agent": "drqv2", "env": "cartpole-balance", "render.size": 48, "env_steps": 30000,
                        "warmup_steps": 500, "batch_size": 64, "actor.width": 128, "critic.width": 128,
                        "render.fast": True, "eval_every": 3000, "eval_episodes": 3, "final_eval_episodes": 5,
                        "diag_every": 0, "drqv2.std_steps": 7500, "run_dir": str(tmp_path / "run"),
                        "progress": False})
    summary = train.train(cfg, log=lambda m: None)
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert rows[1].split(",")[header.index("env_step")] == "0"  # the untrained policy's row
    first = float(rows[2].split(",")[header.index("eval_return")])  # env step 3000
    assert summary["final_return"] > first + 100, (first, summary["final_return"])
