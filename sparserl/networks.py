"""Networks as pure functions of ``(params, x)``; parameters are nested dicts of arrays.

* SimBa encoder (``arch='simba'``): ``Dense(H)`` embedding (orthogonal init, no activation), then
  N residual blocks ``x + Dense_H(ReLU(Dense_4H(LayerNorm(x))))`` (He-normal, zero bias), then a
  final LayerNorm. Parameters: ``(in+1)H + N(8H^2 + 7H) + 2H``.
* MLP baseline (``arch='mlp'``): ``Dense(H)+ReLU`` followed by N more ``Dense(H)+ReLU`` layers.

Kernels are stored as (in, out), so ``x @ kernel``.
"""

from __future__ import annotations

from functools import partial

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
# XLA's CPU convolution runs these shapes ~10x off the FLOP-limited time (forward, and worst for the
# kernel gradient: a correlation over batch x positions with a tiny 3x3 output). ``conv2d`` computes
# all three products as im2col + matmul over small chunks of the batch inside ``lax.map``/``lax.scan``
# (each chunk's patch matrix stays in cache): the forward ``Y = P K``, the input gradient as the full
# convolution of ``dY`` with the flipped kernel, and the kernel gradient ``dK = sum_chunks P^T dY``.
# ``conv2d_reference`` is plain ``lax.conv_general_dilated`` (autodiff gradients); tests check that
# both agree, forward and gradients, within float tolerance.

_DIMS = ("NHWC", "HWIO", "NHWC")


def init_conv(key, in_channels: int, out_channels: int, size: int = 3) -> dict:
    fan_in = size * size * in_channels
    kernel = jax.nn.initializers.orthogonal(jnp.sqrt(2.0))(key, (fan_in, out_channels), jnp.float32)
    return {"kernel": kernel.reshape(size, size, in_channels, out_channels),
            "bias": jnp.zeros((out_channels,), jnp.float32)}


def _lax_conv(x, kernel, stride: int):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), "VALID", dimension_numbers=_DIMS)


def conv2d_reference(p: dict, x: jax.Array, stride: int) -> jax.Array:
    return _lax_conv(x, p["kernel"], stride) + p["bias"]


def im2col(x: jax.Array, kh: int, kw: int, stride: int) -> jax.Array:
    """Patches (..., ho, wo, kh*kw*cin) in HWI order (matching an HWIO kernel reshaped to 2-D)."""
    h, w = x.shape[-3], x.shape[-2]
    ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    cols = [x[..., dy:dy + stride * (ho - 1) + 1:stride, dx:dx + stride * (wo - 1) + 1:stride, :]
            for dy in range(kh) for dx in range(kw)]
    return jnp.concatenate(cols, axis=-1)


def conv2d_im2col(p: dict, x: jax.Array, stride: int) -> jax.Array:
    """The convolution as one im2col matmul (autodiff gradients); a benchmark variant."""
    kh, kw, cin, cout = p["kernel"].shape
    return im2col(x, kh, kw, stride) @ p["kernel"].reshape(kh * kw * cin, cout) + p["bias"]


def _chunk(batch: int, target: int = 2) -> int:
    return max(c for c in range(1, min(batch, target) + 1) if batch % c == 0)


def kernel_grad(x: jax.Array, dy: jax.Array, kernel_shape, stride: int) -> jax.Array:
    """``dL/dK`` of a VALID NHWC convolution: im2col + matmul, chunked over the batch."""
    kh, kw, cin, cout = kernel_shape
    n = x.shape[0]
    c = _chunk(n)
    xs = x.reshape(n // c, c, *x.shape[1:])
    ds = dy.reshape(n // c, c, *dy.shape[1:])

    def body(acc, xd):
        xi, di = xd
        patches = im2col(xi, kh, kw, stride).reshape(-1, kh * kw * cin)
        return acc + patches.T @ di.reshape(-1, cout), None

    acc, _ = jax.lax.scan(body, jnp.zeros((kh * kw * cin, cout), dy.dtype), (xs, ds))
    return acc.reshape(kernel_shape)


def conv_chunked(x: jax.Array, kernel: jax.Array, stride: int, target: int = 4) -> jax.Array:
    """The convolution as im2col + matmul over chunks of ``target`` images in a ``lax.map``: each
    chunk's patch matrix stays in cache (one im2col of the whole batch is ~450 MB at batch 256)."""
    kh, kw, cin, cout = kernel.shape
    n = x.shape[0]
    c = _chunk(n, target)
    k2 = kernel.reshape(kh * kw * cin, cout)
    out = jax.lax.map(lambda xi: im2col(xi, kh, kw, stride) @ k2, x.reshape(n // c, c, *x.shape[1:]))
    return out.reshape(n, *out.shape[2:])


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x, kernel, stride: int):
    return conv_chunked(x, kernel, stride)


def _conv_fwd(x, kernel, stride):
    return conv_chunked(x, kernel, stride), (x, kernel)


def _conv_bwd(stride, residuals, dy):
    x, kernel = residuals
    kh, kw = kernel.shape[:2]
    if stride == 1:  # the input gradient is a full convolution of dy with the flipped, transposed kernel
        padded = jnp.pad(dy, ((0, 0), (kh - 1, kh - 1), (kw - 1, kw - 1), (0, 0)))
        dx = conv_chunked(padded, jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2), 1)
    else:  # (the encoder's strided first layer: its input is the image, whose gradient nobody uses)
        dx = jax.vjp(lambda x_: _lax_conv(x_, kernel, stride), x)[1](dy)[0]
    return dx, kernel_grad(x, dy, kernel.shape, stride)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv2d(p: dict, x: jax.Array, stride: int) -> jax.Array:
    """A VALID NHWC convolution, forward and gradients by chunked im2col matmuls (see above)."""
    if x.ndim != 4:  # unbatched or extra leading axes: flatten them into one batch axis
        lead = x.shape[:-3]
        out = conv2d(p, x.reshape(-1, *x.shape[-3:]), stride)
        return out.reshape(*lead, *out.shape[1:])
    return _conv(x, p["kernel"], stride) + p["bias"]


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
