"""sparserl/backend.py: which implementation runs where, how to override it, and that the plain
XLA forms compute what the XLA:CPU-tuned ones do (values and gradients)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparserl import backend, hugepages, networks
from sparserl.errors import ConfigError

FUSION = "xla_cpu_use_multi_output_fusion"


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv(backend.ENV_VAR, raising=False)


def clean_env(*drop: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in (backend.ENV_VAR, *drop)}


def run_python(code: str, env: dict[str, str]) -> str:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                          timeout=120).stdout


# ----------------------------------------------------------------------------------------------
# the records and how one is chosen


def test_cpu_backend_record_has_the_tuned_choices():
    assert backend.CPU == backend.Backend("cpu", matmul_grad="tiled_transpose", conv="chunked_s2d",
                                          huge_pages=True, xla_flags=(backend.MULTI_OUTPUT_FUSION,), sparse_kernel=True)
    assert backend.PLAIN == backend.Backend("plain", matmul_grad="plain", conv="lax", huge_pages=False, xla_flags=(),
                                            sparse_kernel=False)
    assert backend.for_platform("cpu") is backend.CPU
    assert backend.for_platform("gpu") is backend.for_platform("tpu") is backend.PLAIN
    with pytest.raises(dataclasses.FrozenInstanceError):
        backend.CPU.conv = "lax"


def test_default_follows_the_platform_and_the_override_wins(monkeypatch):
    assert backend.current() is backend.for_platform(jax.default_backend())
    by_platform = backend.for_platform(jax.default_backend())
    for value, want in (("plain", backend.PLAIN), ("CPU", backend.CPU), ("auto", by_platform)):
        monkeypatch.setenv(backend.ENV_VAR, value)
        assert backend.current() is want, value
    monkeypatch.setenv(backend.ENV_VAR, "cpu")
    with backend.use("plain") as chosen:  # in code, over the environment
        assert chosen is backend.current() is backend.PLAIN
        with backend.use(backend.CPU):
            assert backend.current() is backend.CPU
        assert backend.current() is backend.PLAIN
    assert backend.current() is backend.CPU


@pytest.mark.parametrize("where", ["env", "use", "process"])
def test_bad_override_is_a_one_line_error_naming_the_choices(monkeypatch, where):
    monkeypatch.setenv(backend.ENV_VAR, "gpu")
    with pytest.raises(ConfigError) as err:
        if where == "env":
            backend.current()
        elif where == "use":
            monkeypatch.delenv(backend.ENV_VAR)
            with backend.use("gpu"):
                pass
        else:
            backend.restart_with_huge_pages()  # the command's first step: fails before anything runs
    message = str(err.value)
    assert "\n" not in message and "SPARSERL_BACKEND='gpu'" in message
    assert "auto, cpu, plain" in message


def test_the_choice_decides_what_is_traced():
    p = {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}
    frames = jnp.zeros((2, 12, 12, 3), jnp.uint8)
    enc = networks.init_conv_encoder(jax.random.PRNGKey(0), 3, 4, 2)
    traced = {}
    for name in ("cpu", "plain"):
        with backend.use(name):
            # fresh functions: JAX caches a function's trace, so a choice applies to traces made under it
            traced[name] = (str(jax.make_jaxpr(lambda p, x: networks.dense(p, x))(p, jnp.ones((2, 8)))),
                            str(jax.make_jaxpr(lambda e, f: networks.conv_encoder(e, f))(enc, frames)))
    assert "custom_vjp_call" in traced["cpu"][0] and "custom_vjp_call" not in traced["plain"][0]
    assert "custom_vjp_call" in traced["cpu"][1] and "conv_general_dilated" not in traced["cpu"][1]
    assert "conv_general_dilated" in traced["plain"][1] and "custom_vjp_call" not in traced["plain"][1]


# ----------------------------------------------------------------------------------------------
# plain forms == CPU-tuned forms, values and gradients


def both(fn):
    """``fn()`` traced (in a fresh jit) and run under the cpu and the plain backend."""
    out = {}
    for name in ("cpu", "plain"):
        with backend.use(name):
            out[name] = jax.jit(lambda: fn())()
    return out["cpu"], out["plain"]


def assert_trees_close(a, b, tol=1e-4):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


@pytest.mark.parametrize("x_shape", [(32, 24), (3, 5, 24), (7, 24)])
def test_plain_dense_matches_cpu_tuned(x_shape):
    kk, kb, kx = jax.random.split(jax.random.PRNGKey(1), 3)
    p = {"kernel": jax.random.normal(kk, (24, 16)), "bias": jax.random.normal(kb, (16,))}
    x = jax.random.normal(kx, x_shape)
    loss = lambda p, x: jnp.sum(jnp.sin(networks.dense(p, x)))
    value_and_grads = lambda: (networks.dense(p, x), jax.grad(loss, argnums=(0, 1))(p, x))
    assert_trees_close(*both(value_and_grads), tol=1e-5)


@pytest.mark.parametrize("stride, pixels, relu", [(1, False, True), (1, False, False), (2, False, True),
                                                  (2, True, True)])
def test_plain_conv_layer_matches_cpu_tuned(stride, pixels, relu):
    k1, k2 = jax.random.split(jax.random.PRNGKey(2))
    p = networks.init_conv(k1, 3, 5)
    p["bias"] = jnp.linspace(-0.3, 0.3, 5)
    if pixels:
        x = jax.random.randint(k2, (4, 13, 13, 3), 0, 256).astype(jnp.uint8)
    else:
        x = jax.random.normal(k2, (4, 13, 13, 3))
    layer = networks.conv_relu if relu else networks.conv2d
    loss = lambda p, x: jnp.sum(jnp.tanh(layer(p, x, stride, pixels)))
    argnums = (0,) if pixels else (0, 1)  # integer frames have no gradient
    value_and_grads = lambda: (layer(p, x, stride, pixels), jax.grad(loss, argnums=argnums)(p, x))
    assert_trees_close(*both(value_and_grads))


@pytest.mark.parametrize("capture", [False, True])
def test_plain_conv_encoder_matches_cpu_tuned(capture):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 3)
    params = networks.init_conv_encoder(k1, 3, 4, 3)
    frames = jax.random.randint(k2, (2, 3, 17, 17, 3), 0, 256).astype(jnp.uint8)  # extra leading axis
    w = jax.random.normal(k3, (networks.conv_out_size(17, 3) ** 2 * 4,))

    def value_and_grads():
        kw = {"capture": {}} if capture else {}
        feats = networks.conv_encoder(params, frames, **kw)
        grads = jax.grad(lambda p: jnp.sum(jnp.square(jnp.tanh(networks.conv_encoder(p, frames)) @ w)))(params)
        return feats, grads, kw.get("capture", {})

    (f_cpu, g_cpu, c_cpu), (f_plain, g_plain, c_plain) = both(value_and_grads)
    assert f_cpu.shape == (2, 3, networks.conv_out_size(17, 3) ** 2 * 4)
    assert_trees_close((f_cpu, g_cpu), (f_plain, g_plain))
    assert sorted(c_cpu) == sorted(c_plain) == (
        sorted(f"{k}/conv{i}" for k in ("pre_act", "post_act") for i in range(3)) if capture else [])
    assert_trees_close(c_cpu, c_plain)


# ----------------------------------------------------------------------------------------------
# process-level choices: XLA flags at import, huge pages for commands and sweep children


def test_importing_sparserl_turns_on_multi_output_fusion_unless_told_not_to():
    code = "import os, sys, sparserl; print(os.environ.get('XLA_FLAGS', ''), 'jax' in sys.modules)"
    env = clean_env("XLA_FLAGS", "SPARSERL_XLA_TUNING")
    on = run_python(code, env).split()
    assert FUSION in on[0] and on[-1] == "False"  # set before JAX is even imported
    for opt_out in ({"SPARSERL_XLA_TUNING": "0"}, {backend.ENV_VAR: "plain"}):
        assert FUSION not in run_python(code, {**env, **opt_out}), opt_out
    own = run_python(code, {**env, "XLA_FLAGS": "--xla_backend_extra_options=x"})
    assert own.split()[0] == "--xla_backend_extra_options=x"  # a user's own extra options are left alone
    other = run_python(code, {**env, "XLA_FLAGS": "--xla_dump_to=/tmp/x"}).split()
    assert other[0] == "--xla_dump_to=/tmp/x" and FUSION in other[1]  # other user flags are kept


def test_apply_xla_flags_on_a_given_environment():
    env = {"XLA_FLAGS": "--a=1"}
    backend.apply_xla_flags(env)
    assert env == {"XLA_FLAGS": f"--a=1 {backend.MULTI_OUTPUT_FUSION}"}
    backend.apply_xla_flags(env)  # idempotent
    assert env["XLA_FLAGS"].count(FUSION) == 1
    bad = {backend.ENV_VAR: "nonsense"}  # at import a bad value must not break `import sparserl`
    backend.apply_xla_flags(bad)
    assert FUSION in bad["XLA_FLAGS"]


@pytest.mark.skipif(sys.platform != "linux", reason="the glibc tunable only applies on Linux")
def test_huge_pages_follow_the_process_backend():
    base = {"PATH": "/usr/bin"}
    assert backend.child_env(dict(base))["GLIBC_TUNABLES"] == hugepages.TUNABLE
    assert "GLIBC_TUNABLES" not in backend.child_env({**base, backend.ENV_VAR: "plain"})
    assert "GLIBC_TUNABLES" not in backend.child_env({**base, "SPARSERL_HUGE_PAGES": "0"})
    assert backend.child_env({**base, "GLIBC_TUNABLES": "x=1"})["GLIBC_TUNABLES"] == "x=1"  # a user's own is kept
    code = ("import os; from sparserl import backend; print('start', flush=True); "
            "backend.restart_with_huge_pages(); print(os.environ.get('GLIBC_TUNABLES'))")
    env = clean_env("GLIBC_TUNABLES", "SPARSERL_HUGE_PAGES")
    assert run_python(code, env).split() == ["start", "start", hugepages.TUNABLE]  # restarted once
    assert run_python(code, {**env, backend.ENV_VAR: "plain"}).split() == ["start", "None"]
