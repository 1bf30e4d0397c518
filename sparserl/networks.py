"""Networks as pure functions of ``(params, x)``; parameters are nested dicts of arrays.

* SimBa encoder (``arch='simba'``): ``Dense(H)`` embedding (orthogonal init, no activation), then
  N residual blocks ``x + Dense_H(ReLU(Dense_4H(LayerNorm(x))))`` (He-normal, zero bias), then a
  final LayerNorm. Parameters: ``(in+1)H + N(8H^2 + 7H) + 2H``.
* MLP baseline (``arch='mlp'``): ``Dense(H)+ReLU`` followed by N more ``Dense(H)+ReLU`` layers.

Kernels are stored as (in, out), so ``x @ kernel``.

``dense``, ``conv2d`` / ``conv_relu`` and ``conv_encoder`` take their implementation from
:func:`sparserl.backend.current` when traced: the XLA:CPU-tuned forms (``_matmul_tiled``, the chunked
convolution ``_conv_op`` / ``_encoder_op``) or the plain XLA forms (``_matmul_plain``,
``_conv_layer_plain``), which compute the same values up to rounding.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from sparserl import backend, sparse_kernel, sparsity

_orthogonal = jax.nn.initializers.orthogonal
_he_normal = jax.nn.initializers.he_normal()


def init_dense(key, in_dim: int, out_dim: int, kernel_init=None) -> dict:
    kernel_init = kernel_init or _orthogonal()
    return {"kernel": kernel_init(key, (in_dim, out_dim), jnp.float32), "bias": jnp.zeros((out_dim,), jnp.float32)}


def dense(p: dict, x: jax.Array) -> jax.Array:
    """``x @ kernel + bias``; the kernel gradient's form is the backend's ``matmul_grad``. A kernel
    bound by :func:`sparserl.sparsity.bind` (a ``SparseKernel``) multiplies its kept weights only."""
    kernel = p["kernel"]
    if isinstance(kernel, sparsity.SparseKernel):
        weight_grad = not isinstance(kernel, sparsity.FixedSparseKernel)
        return sparse_kernel.matmul(kernel.values, kernel.layout, x, weight_grad) + p["bias"]
    if backend.current().matmul_grad == "tiled_transpose":
        return _matmul_tiled(x, p["kernel"]) + p["bias"]
    return _matmul_plain(x, p["kernel"]) + p["bias"]


def _matmul_plain(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x @ kernel`` with autodiff's gradient (backend ``plain``)."""
    return x @ kernel


def _tiled_transpose(x: jax.Array) -> jax.Array:
    """``x.T`` for a 2-D ``x``, moved in square tiles when a tile size divides both dimensions: XLA:CPU
    moves a plain transpose element by element (~0.6 ms for 256x2048 on the benchmark machine), a
    tiled one about 6x faster."""
    rows, cols = x.shape
    for tile in (16, 8):
        if rows % tile == 0 and cols % tile == 0:
            tiles = x.reshape(rows // tile, tile, cols // tile, tile)
            return tiles.transpose(2, 3, 0, 1).reshape(cols, rows)
    return x.T


@jax.custom_vjp
def _matmul_tiled(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``x @ kernel`` whose kernel gradient multiplies an explicitly transposed ``x`` (backend ``cpu``).

    The kernel gradient ``x.T @ g`` contracts the batch axis, the leading axis of ``x``; XLA:CPU's
    matmul runs that form at ~0.75 of its plain rate (it repacks ``x`` on the fly), and transposing
    ``x`` first costs less than the difference. Values are the same as autodiff's up to rounding."""
    return x @ kernel


def _matmul_tiled_fwd(x, kernel):
    return x @ kernel, (x, kernel)


def _matmul_tiled_bwd(residuals, g):
    x, kernel = residuals
    rows_x, rows_g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    return g @ kernel.T, _tiled_transpose(rows_x) @ rows_g


_matmul_tiled.defvjp(_matmul_tiled_fwd, _matmul_tiled_bwd)


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
# kernel gradient: a correlation over batch x positions with a tiny 3x3 output), and its elementwise
# passes over whole activations (bias, ReLU, their gradients, the uint8 -> float input) run far below
# memory bandwidth. ``conv2d`` / ``conv_relu`` therefore compute each layer over small chunks of the
# batch, so every chunk's intermediates stay in cache and the elementwise work rides along:
#   forward  stride 1: ``Z = X @ [K_00 .. K_22]`` (one matmul with 9*cout columns), then the 9 shifted
#            slices of Z are summed; stride 2 (first layer): the same on 2x2 pixel blocks
#            (space-to-depth: a 2x2 stride-1 convolution with the kernel zero-padded to 4x4). + bias, ReLU.
#   backward ``D = G * (Y > 0)``; ``dK`` by 3 matmuls (see ``_kernel_grad_chunk``; no patch matrix); ``db``;
#            ``dX`` = the same shifted-sum trick transposed (``D @ [K_ab^T]``, padded and summed).
# With ``pixels=True`` the input is raw pixel values (uint8 frames) mapped to ``x/255 - 0.5`` chunk by
# chunk, so the float image batch never exists whole. ``conv_encoder`` runs the layers' forwards one
# after another and their backwards in a single loop over chunks (``_encoder_op``), so the gradients
# between layers never leave the cache. ``conv2d_reference`` is plain
# ``lax.conv_general_dilated`` (autodiff gradients); tests check that both agree, forward and
# gradients, within float tolerance. All of this is the ``cpu`` backend's ``conv='chunked_s2d'``; the
# ``plain`` backend (GPU, TPU; sparserl/backend.py) runs ``lax.conv_general_dilated`` instead.

_DIMS = ("NHWC", "HWIO", "NHWC")
_FORWARD_CHUNK, _BACKWARD_CHUNK = 8, 4   # images per chunk (best measured on the 2-core AVX-512 CPU)


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


def _chunk(batch: int, target: int) -> int:
    return max(c for c in range(1, min(batch, target) + 1) if batch % c == 0)


def _chunked(x: jax.Array, target: int) -> jax.Array:
    c = _chunk(x.shape[0], target)
    return x.reshape(x.shape[0] // c, c, *x.shape[1:])


def _prepare(x: jax.Array, pixels: bool) -> jax.Array:
    return x.astype(jnp.float32) / 255.0 - 0.5 if pixels else x


def _tap(x: jax.Array, a: int, b: int, ho: int, wo: int, stride: int) -> jax.Array:
    return x[:, a:a + stride * (ho - 1) + 1:stride, b:b + stride * (wo - 1) + 1:stride, :]


def _space_to_depth(x: jax.Array) -> jax.Array:
    """(n, H, W, C) -> (n, ceil(H/2), ceil(W/2), 4C), channels ordered (row offset, column offset, C)."""
    n, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    x = x.reshape(n, (h + 1) // 2, 2, (w + 1) // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h + 1) // 2, (w + 1) // 2, 4 * c)


def _space_to_depth_kernel(kernel: jax.Array) -> jax.Array:
    """A stride-2 kernel as the stride-1 kernel over :func:`_space_to_depth` input: a 3x3 stride-2
    convolution is a 2x2 stride-1 one over 2x2 pixel blocks (kernel zero-padded to 4x4)."""
    kh, kw, cin, cout = kernel.shape
    k = jnp.pad(kernel, ((0, kh % 2), (0, kw % 2), (0, 0), (0, 0)))
    a, b = k.shape[0] // 2, k.shape[1] // 2
    return k.reshape(a, 2, b, 2, cin, cout).transpose(0, 2, 1, 3, 4, 5).reshape(a, b, 4 * cin, cout)


def _conv_chunk(x, kernel, stride: int):
    """VALID convolution of one chunk of images (no bias); stride 2 via space-to-depth."""
    kh, kw, cin, cout = kernel.shape
    if stride == 2:
        ho, wo = (x.shape[1] - kh) // 2 + 1, (x.shape[2] - kw) // 2 + 1
        return _conv_chunk(_space_to_depth(x), _space_to_depth_kernel(kernel), 1)[:, :ho, :wo]
    if stride != 1:
        return im2col(x, kh, kw, stride) @ kernel.reshape(kh * kw * cin, cout)
    ho, wo = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    z = (x @ kernel.transpose(2, 0, 1, 3).reshape(cin, kh * kw * cout)).reshape(*x.shape[:3], kh, kw, cout)
    return sum(z[:, a:a + ho, b:b + wo, a, b] for a in range(kh) for b in range(kw))


def _kernel_grad_chunk(x, d, kernel_shape, stride: int):
    """``dL/dK`` for one chunk. Stride 1: per kernel row ``a``, one matmul of the input rows
    ``a .. a+ho`` (full width) with ``D`` placed at the ``kw`` column offsets of that width (zeros
    elsewhere): 3 matmuls with 3*cout columns instead of 9 tap matmuls with cout."""
    kh, kw, cin, cout = kernel_shape
    ho, wo = d.shape[1], d.shape[2]
    if stride != 1:  # per tap (measured faster than via space-to-depth, which pads 3x3 to 4x4)
        d2 = d.reshape(-1, cout)
        return jnp.stack([_tap(x, a, b, ho, wo, stride).reshape(-1, cin).T @ d2
                          for a in range(kh) for b in range(kw)]).reshape(kernel_shape)
    width = x.shape[2]
    shifted = jnp.concatenate([jnp.pad(d, ((0, 0), (0, 0), (b, width - wo - b), (0, 0))) for b in range(kw)], -1)
    shifted = shifted.reshape(-1, kw * cout)
    rows = jnp.stack([x[:, a:a + ho].reshape(-1, cin).T @ shifted for a in range(kh)])  # (kh, cin, kw*cout)
    return rows.reshape(kh, cin, kw, cout).transpose(0, 2, 1, 3)


def _conv_input_grad_chunk(d, kernel):
    """``dL/dX`` of a stride-1 VALID convolution for one chunk: the forward trick transposed."""
    kh, kw, cin, cout = kernel.shape
    z = (d @ kernel.transpose(3, 0, 1, 2).reshape(cout, kh * kw * cin)).reshape(*d.shape[:3], kh, kw, cin)
    return sum(jnp.pad(z[:, :, :, a, b], ((0, 0), (a, kh - 1 - a), (b, kw - 1 - b), (0, 0)))
               for a in range(kh) for b in range(kw))


def _conv_forward(x, kernel, bias, stride: int, relu: bool, pixels: bool):
    def one(xi):
        y = _conv_chunk(_prepare(xi, pixels), kernel, stride) + bias
        return jax.nn.relu(y) if relu else y

    out = jax.lax.map(one, _chunked(x, _FORWARD_CHUNK))
    return out.reshape(x.shape[0], *out.shape[2:])


@partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _conv_op(x, kernel, bias, stride: int, relu: bool, pixels: bool):
    return _conv_forward(x, kernel, bias, stride, relu, pixels)


def _conv_op_fwd(x, kernel, bias, stride, relu, pixels):
    y = _conv_forward(x, kernel, bias, stride, relu, pixels)
    return y, (x, kernel, y)


def _layer_backward_chunk(x, y, g, kernel, stride: int, relu: bool, pixels: bool, want_dx: bool):
    """One layer's gradients on one chunk: ``(dK, db, dX or None)`` from its raw input ``x``, its
    output ``y`` and the output's gradient ``g``."""
    xf = _prepare(x, pixels)
    d = jnp.where(y > 0, g, 0.0) if relu else g
    dk = _kernel_grad_chunk(xf, d, kernel.shape, stride)
    db = d.reshape(-1, d.shape[-1]).sum(0)
    dx = None
    if want_dx:
        if stride == 1:
            dx = _conv_input_grad_chunk(d, kernel)
        else:  # (only a strided first layer over floats: not the encoder's uint8 frames)
            dx = jax.vjp(lambda x_: _lax_conv(x_, kernel, stride), xf)[1](d)[0]
        dx = dx / 255.0 if pixels else dx
    return dk, db, dx


def _wants_input_grad(x: jax.Array) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)  # integer frames have no gradient


def _input_cotangent(x: jax.Array, chunked_dx) -> jax.Array:
    """The scan's stacked input gradients as ``x``'s cotangent (float0 zeros for integer frames)."""
    if _wants_input_grad(x):
        return chunked_dx.reshape(x.shape).astype(x.dtype)
    return np.zeros(x.shape, jax.dtypes.float0)


def _conv_op_bwd(stride, relu, pixels, residuals, g):
    x, kernel, y = residuals
    want_dx = _wants_input_grad(x)

    def body(acc, chunk):
        dk, db, dx = _layer_backward_chunk(*chunk, kernel, stride, relu, pixels, want_dx)
        return (acc[0] + dk, acc[1] + db), dx

    init = (jnp.zeros_like(kernel), jnp.zeros(kernel.shape[-1:], g.dtype))
    (dk, db), dx = jax.lax.scan(body, init, tuple(_chunked(a, _BACKWARD_CHUNK) for a in (x, y, g)))
    return _input_cotangent(x, dx), dk, db


_conv_op.defvjp(_conv_op_fwd, _conv_op_bwd)


def _batched(fn, x: jax.Array, *args):
    if x.ndim == 4:
        return fn(x, *args)
    lead = x.shape[:-3]  # unbatched or extra leading axes: flatten them into one batch axis
    out = fn(x.reshape(-1, *x.shape[-3:]), *args)
    return out.reshape(*lead, *out.shape[1:])


def _conv_layer(p: dict, x: jax.Array, stride: int, relu: bool, pixels: bool) -> jax.Array:
    if backend.current().conv == "chunked_s2d":
        return _batched(lambda x_: _conv_op(x_, p["kernel"], p["bias"], stride, relu, pixels), x)
    return _conv_layer_plain(p, x, stride, relu, pixels)


def _conv_layer_plain(p: dict, x: jax.Array, stride: int, relu: bool, pixels: bool) -> jax.Array:
    """One layer as ``lax.conv_general_dilated`` over the whole batch, autodiff gradients (backend ``plain``)."""
    y = _batched(lambda x_: conv2d_reference(p, _prepare(x_, pixels), stride), x)
    return jax.nn.relu(y) if relu else y


def conv2d(p: dict, x: jax.Array, stride: int, pixels: bool = False) -> jax.Array:
    """A VALID NHWC convolution + bias; on the ``cpu`` backend forward and gradients by chunked
    matmuls (see above). ``pixels``: ``x`` holds pixel values, mapped to ``x/255 - 0.5`` first."""
    return _conv_layer(p, x, stride, False, pixels)


def conv_relu(p: dict, x: jax.Array, stride: int, pixels: bool = False) -> jax.Array:
    """``relu(conv2d(p, x, stride))``, on the ``cpu`` backend fused chunk by chunk (the encoder's layer)."""
    return _conv_layer(p, x, stride, True, pixels)


def _encoder_layers(params: dict) -> list[dict]:
    return [params[f"conv{i}"] for i in range(len(params))]


def _encoder_forward(params: dict, obs: jax.Array) -> list[jax.Array]:
    """Every layer's output (after ReLU): layer 0 reads the pixel values with stride 2, then stride 1."""
    outs, h = [], obs
    for i, p in enumerate(_encoder_layers(params)):
        h = _conv_forward(h, p["kernel"], p["bias"], 2 if i == 0 else 1, True, i == 0)
        outs.append(h)
    return outs


@jax.custom_vjp
def _encoder_op(params: dict, obs: jax.Array) -> jax.Array:
    return _encoder_forward(params, obs)[-1]


def _encoder_op_fwd(params, obs):
    outs = _encoder_forward(params, obs)
    return outs[-1], (params, obs, outs)


def _encoder_op_bwd(residuals, g):
    """One loop over chunks of the batch walks every layer backwards: the gradients flowing between
    layers stay in cache and are never stored for the whole batch (layer by layer, each would be
    written and read back once)."""
    params, obs, outs = residuals
    layers = _encoder_layers(params)
    want_dx = _wants_input_grad(obs)

    def body(acc, chunk):
        obs_i, outs_i, d = chunk
        dks, dbs = list(acc[0]), list(acc[1])
        for i in reversed(range(len(layers))):
            x = obs_i if i == 0 else outs_i[i - 1]
            dk, db, d = _layer_backward_chunk(x, outs_i[i], d, layers[i]["kernel"], 2 if i == 0 else 1, True,
                                              i == 0, i > 0 or want_dx)
            dks[i], dbs[i] = dks[i] + dk, dbs[i] + db
        return (tuple(dks), tuple(dbs)), d  # d: the frames' gradient (None unless they are floats)

    init = (tuple(jnp.zeros_like(p["kernel"]) for p in layers), tuple(jnp.zeros_like(p["bias"]) for p in layers))
    chunks = lambda a: _chunked(a, _BACKWARD_CHUNK)
    (dks, dbs), dx = jax.lax.scan(body, init, (chunks(obs), tuple(chunks(o) for o in outs), chunks(g)))
    grads = {f"conv{i}": {"kernel": dks[i], "bias": dbs[i]} for i in range(len(layers))}
    return grads, _input_cotangent(obs, dx)


_encoder_op.defvjp(_encoder_op_fwd, _encoder_op_bwd)


def conv_out_size(size: int, layers: int) -> int:
    size = (size - 3) // 2 + 1
    return size - 2 * (layers - 1)


def init_conv_encoder(key, in_channels: int, channels: int, layers: int) -> dict:
    keys = jax.random.split(key, layers)
    return {f"conv{i}": init_conv(keys[i], in_channels if i == 0 else channels, channels) for i in range(layers)}


def conv_encoder(params: dict, obs: jax.Array, capture: dict | None = None, conv=None) -> jax.Array:
    """Frames (..., H, W, C) of pixel values (uint8) -> flat features: ``x/255 - 0.5``, then conv+ReLU
    layers. ``conv`` swaps in another convolution ``conv(p, x, stride)`` (benchmarks, tests). The
    ``cpu`` backend runs all layers as one fused, chunked op; ``plain`` runs them as ``lax`` convolutions."""
    layers = _encoder_layers(params)
    if conv is None and capture is None and backend.current().conv == "chunked_s2d":  # fused (see above)
        h = _batched(lambda o: _encoder_op(params, o), obs)
        return h.reshape(*h.shape[:-3], -1)
    h = obs if conv is None else obs.astype(jnp.float32) / 255.0 - 0.5
    for i, p in enumerate(layers):  # unfused: plain backend, or pre-activations captured for diagnostics
        stride = 2 if i == 0 else 1
        pre = conv2d(p, h, stride, pixels=i == 0) if conv is None else conv(p, h, stride)
        h = jax.nn.relu(pre)
        if capture is not None:
            capture[f"pre_act/conv{i}"], capture[f"post_act/conv{i}"] = pre, h
    return h.reshape(*h.shape[:-3], -1)


def init_trunk(key, in_dim: int, feature_dim: int) -> dict:
    return {"dense": init_dense(key, in_dim, feature_dim), "norm": init_layer_norm(feature_dim)}


def trunk(p: dict, x: jax.Array) -> jax.Array:
    """DrQ-v2's trunk: Linear + LayerNorm + tanh."""
    return jnp.tanh(layer_norm(p["norm"], dense(p["dense"], x)))
