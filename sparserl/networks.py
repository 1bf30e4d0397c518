"""Networks as pure functions of ``(params, x)``; parameters are nested dicts of arrays.

* SimBa encoder (``arch='simba'``): ``Dense(H)`` embedding (orthogonal init, no activation), then
  N residual blocks ``x + Dense_H(ReLU(Dense_4H(LayerNorm(x))))`` (He-normal, zero bias), then a
  final LayerNorm. Parameters: ``(in+1)H + N(8H^2 + 7H) + 2H``.
* MLP baseline (``arch='mlp'``): ``Dense(H)+ReLU`` followed by N more ``Dense(H)+ReLU`` layers.

Kernels are stored as (in, out), so ``x @ kernel``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_orthogonal = jax.nn.initializers.orthogonal
_he_normal = jax.nn.initializers.he_normal()


def init_dense(key, in_dim: int, out_dim: int, kernel_init=None) -> dict:
    kernel_init = kernel_init or _orthogonal()
    return {"kernel": kernel_init(key, (in_dim, out_dim), jnp.float32), "bias": jnp.zeros((out_dim,), jnp.float32)}


def dense(p: dict, x: jax.Array) -> jax.Array:
    return x @ p["kernel"] + p["bias"]


def init_layer_norm(dim: int) -> dict:
    return {"scale": jnp.ones((dim,), jnp.float32), "bias": jnp.zeros((dim,), jnp.float32)}


def layer_norm(p: dict, x: jax.Array, eps: float = 1e-6) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def init_encoder(key, in_dim: int, width: int, blocks: int, arch: str = "simba") -> dict:
    keys = jax.random.split(key, 2 * blocks + 1)
    params = {"embed": init_dense(keys[0], in_dim, width)}
    for i in range(blocks):
        if arch == "simba":
            params[f"block{i}"] = {
                "norm": init_layer_norm(width),
                "hidden": init_dense(keys[2 * i + 1], width, 4 * width, _he_normal),
                "out": init_dense(keys[2 * i + 2], 4 * width, width, _he_normal),
            }
        elif arch == "mlp":
            params[f"layer{i}"] = init_dense(keys[2 * i + 1], width, width, _he_normal)
        else:
            raise ValueError(f"arch={arch!r}: must be simba or mlp")
    if arch == "simba":
        params["final_norm"] = init_layer_norm(width)
    return params


def encoder(params: dict, x: jax.Array, capture: dict | None = None) -> jax.Array:
    """Apply a SimBa or MLP encoder (the architecture is read from the parameter names).

    With ``capture`` (a dict), intermediate activations are stored in it for diagnostics:
    ``pre_act/<layer>`` and ``post_act/<layer>`` around each ReLU, and ``features_pre_norm`` (the
    residual stream before SimBa's final LayerNorm, whose norm the LayerNorm would hide).
    """
    def relu(name, h):
        out = jax.nn.relu(h)
        if capture is not None:
            capture[f"pre_act/{name}"], capture[f"post_act/{name}"] = h, out
        return out

    if "final_norm" in params:  # SimBa
        h = dense(params["embed"], x)
        i = 0
        while f"block{i}" in params:
            b = params[f"block{i}"]
            h = h + dense(b["out"], relu(f"block{i}", dense(b["hidden"], layer_norm(b["norm"], h))))
            i += 1
        if capture is not None:
            capture["features_pre_norm"] = h
        return layer_norm(params["final_norm"], h)
    h = relu("embed", dense(params["embed"], x))
    i = 0
    while f"layer{i}" in params:
        h = relu(f"layer{i}", dense(params[f"layer{i}"], h))
        i += 1
    if capture is not None:
        capture["features_pre_norm"] = h
    return h


# ----------------------------------------------------------------------------------------------
# Critic Q(s, a): encoder on concat(obs, action) + a dense H->1 head; several for clipped double-Q.


def init_critic(key, obs_dim: int, action_dim: int, width: int, blocks: int, arch: str, num_q: int = 1) -> dict:
    params = {}
    for i, k in enumerate(jax.random.split(key, num_q)):
        k_enc, k_head = jax.random.split(k)
        params[f"q{i}"] = {"encoder": init_encoder(k_enc, obs_dim + action_dim, width, blocks, arch),
                           "head": init_dense(k_head, width, 1)}
    return params


def critic_always_dense(params: dict) -> tuple[str, ...]:
    """The critic's H->1 heads stay dense (reference semantics, PAPER.md §2)."""
    return tuple(f"{q}/head" for q in params)


def critic(params: dict, obs: jax.Array, action: jax.Array) -> jax.Array:
    """Q-values, shape (num_q, batch)."""
    x = jnp.concatenate([obs, action], -1)
    return jnp.stack([dense(p["head"], encoder(p["encoder"], x))[..., 0] for p in params.values()])


def num_params(params) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(params))


# ----------------------------------------------------------------------------------------------
# Pixel encoder (DrQ-v2): 3x3 convolutions, NHWC, kernels HWIO; first stride 2, then stride 1, VALID.
#
# XLA's CPU convolution is slow for these shapes (~10x off the FLOP-limited time), so ``conv2d``
# computes the same convolution as im2col by slicing (9 shifted, strided views concatenated on the
# channel axis) and one matmul with the kernel reshaped to (9*Cin, Cout); its gradients are those of
# slices and a matmul. ``conv2d_reference`` is ``lax.conv_general_dilated``; tests check both agree.


def init_conv(key, in_channels: int, out_channels: int, size: int = 3) -> dict:
    fan_in = size * size * in_channels
    kernel = jax.nn.initializers.orthogonal(jnp.sqrt(2.0))(key, (fan_in, out_channels), jnp.float32)
    return {"kernel": kernel.reshape(size, size, in_channels, out_channels),
            "bias": jnp.zeros((out_channels,), jnp.float32)}


def conv2d_reference(p: dict, x: jax.Array, stride: int) -> jax.Array:
    out = jax.lax.conv_general_dilated(x, p["kernel"], (stride, stride), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return out + p["bias"]


def conv2d(p: dict, x: jax.Array, stride: int) -> jax.Array:
    kh, kw, cin, cout = p["kernel"].shape
    h, w = x.shape[-3], x.shape[-2]
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    cols = [x[..., dy:dy + stride * (ho - 1) + 1:stride, dx:dx + stride * (wo - 1) + 1:stride, :]
            for dy in range(kh) for dx in range(kw)]
    patches = jnp.concatenate(cols, axis=-1)  # (..., ho, wo, kh*kw*cin) in HWI order
    return patches @ p["kernel"].reshape(kh * kw * cin, cout) + p["bias"]


def conv_out_size(size: int, layers: int) -> int:
    size = (size - 3) // 2 + 1
    return size - 2 * (layers - 1)


def init_conv_encoder(key, in_channels: int, channels: int, layers: int) -> dict:
    keys = jax.random.split(key, layers)
    return {f"conv{i}": init_conv(keys[i], in_channels if i == 0 else channels, channels) for i in range(layers)}


def conv_encoder(params: dict, obs: jax.Array, capture: dict | None = None, conv=None) -> jax.Array:
    """uint8 frames (..., H, W, C) -> flat features: ``x/255 - 0.5``, then conv+ReLU layers."""
    conv = conv or conv2d
    h = obs.astype(jnp.float32) / 255.0 - 0.5
    i = 0
    while f"conv{i}" in params:
        pre = conv(params[f"conv{i}"], h, 2 if i == 0 else 1)
        h = jax.nn.relu(pre)
        if capture is not None:
            capture[f"pre_act/conv{i}"], capture[f"post_act/conv{i}"] = pre, h
        i += 1
    return h.reshape(*h.shape[:-3], -1)


def init_trunk(key, in_dim: int, feature_dim: int) -> dict:
    return {"dense": init_dense(key, in_dim, feature_dim), "norm": init_layer_norm(feature_dim)}


def trunk(p: dict, x: jax.Array) -> jax.Array:
    """DrQ-v2's trunk: Linear + LayerNorm + tanh."""
    return jnp.tanh(layer_norm(p["norm"], dense(p["dense"], x)))
