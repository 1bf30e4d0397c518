"""Configuration: typed, frozen dataclasses built from YAML presets plus ``key=value`` overrides.

Every key a user can set is a field below (dotted for nested sections, e.g. ``critic.width``).
The whole config is validated before any compute; a bad value raises :class:`ConfigError` with one
line naming the key and what is allowed. Configs are frozen and hashable, so they can be passed to
``jax.jit`` as static arguments.
"""

from __future__ import annotations

import dataclasses
import math
import typing
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparserl.errors import ConfigError, suggest  # noqa: F401  (re-exported: the config's error type)

# YAML presets shipped inside the package (so an installed sparserl has them): run presets here,
# experiment grids (``sparserl sweep``) in ``experiments/``.
PRESET_DIR = Path(__file__).resolve().parent / "presets"


def _opt(default, *, choices=None, low=None, high=None, low_open=False, high_open=False, doc=""):
    return field(default=default, metadata=dict(choices=choices, low=low, high=high,
                                                low_open=low_open, high_open=high_open, doc=doc))


TOPOLOGIES = ("static", "set", "rigl")  # how a module's mask may change during training (sparserl.topology)


def _topology_opt(whose: str):
    return _opt("static", choices=TOPOLOGIES,
                doc=f"{whose} mask over training: static (drawn once), set (SET: drop the smallest-magnitude kept "
                    f"weights, regrow at random) or rigl (RigL: regrow where the dense gradient is largest); "
                    f"see docs/sparsity.md")


@dataclass(frozen=True)
class ActorConfig:
    width: int = _opt(128, low=1, doc="hidden width H of the actor encoder")
    blocks: int = _opt(1, low=1, doc="residual blocks (simba), extra hidden layers (mlp), or hidden layers (stream_ac)")
    sparsity: float = _opt(0.0, low=0.0, high=1.0, high_open=True, doc="fraction of weights pruned, in [0, 1)")
    topology: str = _topology_opt("the actor's")


@dataclass(frozen=True)
class CriticConfig:
    width: int = _opt(512, low=1, doc="hidden width H of the critic encoder")
    blocks: int = _opt(2, low=1, doc="residual blocks (simba), extra hidden layers (mlp), or hidden layers (stream_ac)")
    sparsity: float = _opt(0.0, low=0.0, high=1.0, high_open=True, doc="fraction of weights pruned, in [0, 1)")
    cdq: bool = _opt(False, doc="clipped double-Q (two critics, min target); off on DMC per the paper")
    topology: str = _topology_opt("the critic's")


@dataclass(frozen=True)
class SparsityConfig:
    method: str = _opt("erk", choices=("erk", "uniform"), doc="per-layer allocation of the sparsity budget")
    budget: str = _opt("all", choices=("all", "kernels"),
                       doc="count the budget over all parameters (paper's code) or kernels only")
    draw: str = _opt("exact", choices=("exact", "bernoulli"),
                     doc="exact: each tensor keeps round((1-s)n) weights; bernoulli: i.i.d. draws (paper's code)")
    seed: int | None = _opt(None, low=0, doc="mask seed; default derived from `seed` (separate from init)")
    # Default masked: sparse compute equals masked only to float rounding, so making it the default would
    # change the numbers of every existing sparse preset; auto's model is measured on one CPU kind.
    compute: str = _opt("masked", choices=("masked", "sparse", "auto"),
                        doc="pruned kernels' products: masked (dense matmul of the masked kernel), sparse (C++ kernel "
                            "over kept weights only; CPU), auto (sparse where it pays, masked on GPU/TPU); "
                            "docs/sparse_compute.md")


@dataclass(frozen=True)
class SACConfig:
    temperature_init: float = _opt(0.01, low=0.0, low_open=True, doc="initial entropy temperature")
    target_entropy_scale: float = _opt(0.5, low=0.0, doc="target entropy = -scale * |A|")
    log_std_min: float = _opt(-10.0, doc="lower bound of the squashed log-std")
    log_std_max: float = _opt(2.0, doc="upper bound of the squashed log-std")


@dataclass(frozen=True)
class DDPGConfig:
    noise_std: float = _opt(0.1, low=0.0, doc="std of the Gaussian exploration noise")
    policy_noise: float = _opt(0.1, low=0.0, doc="std of the Gaussian noise added to the policy's action in the actor "
                                                 "loss and the TD target, clipped to [-1, 1] after adding (the "
                                                 "reference's: the exploration std, 0.1); 0 = noiseless")


@dataclass(frozen=True)
class StreamConfig:
    alpha: float = _opt(1.0, low=0.0, low_open=True, doc="stream_ac: ObGD step size α (before the overshooting bound)")
    kappa_policy: float = _opt(3.0, low=0.0, low_open=True, doc="stream_ac: ObGD bound κ of the actor")
    kappa_value: float = _opt(2.0, low=0.0, low_open=True, doc="stream_ac: ObGD bound κ of the critic")
    lamda: float = _opt(0.8, low=0.0, high=1.0, doc="stream_ac: eligibility-trace decay λ (traces decay by γλ)")
    entropy_coef: float = _opt(0.01, low=0.0, doc="stream_ac: entropy coefficient (scaled by sign(δ), as in Stream AC)")
    adaptive: bool = _opt(False, doc="stream_ac: adaptive ObGD (trace scaled by a running RMS of δe, β₂=0.999)")
    beta2: float = _opt(0.999, low=0.0, high=1.0, high_open=True, doc="stream_ac: β₂ of adaptive ObGD")
    sparse_init_fraction: float = _opt(0.9, low=0.0, high=1.0, high_open=True,
                                       doc="stream_ac: fraction of each unit's fan-in zeroed by init=sparse_init")
    reward_scale: bool = _opt(True, doc="stream_ac: divide rewards by the running std of the discounted return")
    final_episodes: int = _opt(10, low=1, doc="stream_ac: summary final_return = mean of the last this many "
                                              "training episodes")


@dataclass(frozen=True)
class DrQv2Config:
    std_start: float = _opt(1.0, low=0.0, doc="exploration std at the start of learning (linear schedule)")
    std_end: float = _opt(0.1, low=0.0, doc="exploration std at the end of the schedule")
    std_steps: int = _opt(500_000, low=1, doc="agent steps (not env steps) over which the exploration std decays "
                                              "from std_start to std_end (DrQ-v2: 500k agent steps = 1M frames)")
    std_clip: float = _opt(0.3, low=0.0, doc="clip of the policy noise in the actor loss and TD targets")
    aug_pad: int = _opt(4, low=0, doc="random-shift augmentation: pad by this many pixels (replicate), crop back")


@dataclass(frozen=True)
class EncoderConfig:
    channels: int = _opt(32, low=1, doc="conv channels of every encoder layer (pixels)")
    layers: int = _opt(4, low=1, doc="3x3 conv layers (stride 2 first, then 1)")
    feature_dim: int = _opt(50, low=1, doc="trunk output: Linear(feature_dim) + LayerNorm + tanh, per actor/critic")
    sparsity: float = _opt(0.0, low=0.0, high=1.0, high_open=True, doc="fraction of conv weights pruned, in [0, 1)")
    topology: str = _topology_opt("the conv encoder's (drqv2)")


@dataclass(frozen=True)
class RenderConfig:
    size: int = _opt(84, low=16, doc="pixel observations: rendered height and width")
    fast: bool = _opt(False, doc="render without shadows and reflections (deviation from DrQ-v2; ~8x faster on CPU)")


@dataclass(frozen=True)
class TopologyConfig:
    every: int = _opt(1000, low=1, doc="dynamic topology (set, rigl): rewire the masks every this many gradient "
                                      "steps (ΔT)")
    drop_fraction: float = _opt(0.3, low=0.0, high=1.0, low_open=True, high_open=True,
                                doc="fraction of each layer's kept weights dropped (and as many regrown) at the "
                                    "first topology update, in (0, 1)")
    schedule: str = _opt("cosine", choices=("cosine", "constant"),
                         doc="drop fraction over training: cosine (decays to 0 at topology.decay_end, as RigL) or "
                             "constant")
    decay_end: int = _opt(0, low=0, doc="gradient step where the cosine schedule reaches 0 (0 = topology.stop)")
    stop: int = _opt(0, low=0, doc="no topology update after this gradient step (0 = 75% of the run's gradient "
                                   "steps, as RigL)")


@dataclass(frozen=True)
class ResetConfig:
    every: int = _opt(0, low=0, doc="reset actor and critic parameters and optimizer states every this many env "
                                    "steps (masks and buffer kept; 0 = never)")


@dataclass(frozen=True)
class LogConfig:
    tensorboard: bool = _opt(False, doc="also log every scalar to RUN_DIR/tensorboard (needs sparserl[tensorboard])")
    wandb: bool = _opt(False, doc="also log every scalar (and videos) to Weights & Biases (needs sparserl[wandb])")
    wandb_project: str = _opt("sparserl", doc="W&B project")
    wandb_mode: str = _opt("online", choices=("online", "offline", "disabled"),
                           doc="W&B mode; offline writes RUN_DIR/wandb for a later `wandb sync`")


@dataclass(frozen=True)
class VideoConfig:
    every: int = _opt(0, low=0, doc="render one evaluation episode to RUN_DIR/videos every this many env steps "
                                    "(0 = off; mp4 needs sparserl[video], else GIF)")
    size: int = _opt(128, low=16, doc="video frame height and width in pixels")


@dataclass(frozen=True)
class Config:
    agent: str = _opt("sac", choices=("sac", "ddpg", "drqv2", "stream_ac"),
                      doc="learning algorithm (drqv2: from pixels, see docs/visual.md; stream_ac: streaming "
                          "Stream AC(λ) with ObGD, see docs/streaming.md)")
    init: str = _opt("dense", choices=("dense", "sparse_init"),
                     doc="stream_ac weight init: dense, or sparse_init (stream.sparse_init_fraction of each unit's "
                         "fan-in zeroed at init, then trainable)")
    env: str = _opt("humanoid-run", doc="DMC task as domain-task, or a Gymnasium id as gym:Id")
    seed: int = _opt(0, low=0, doc="seed of initialisation, environments and sampling")
    seeds: str | None = _opt(None, doc="several seeds trained together (vmapped), e.g. 0,1,2,3; overrides seed")
    num_seeds: int = _opt(1, low=1, doc="train seeds seed..seed+num_seeds-1 together (vmapped)")
    seed_parallel: str = _opt("auto", choices=("auto", "vmap", "loop"),
                              doc="several seeds: vmap (stacked, fastest on GPU), loop (bit-identical to "
                                  "single-seed runs), auto = loop on CPU, vmap elsewhere")
    env_steps: int = _opt(1_000_000, low=1, doc="environment steps to train for (before action repeat)")
    action_repeat: int = _opt(2, low=1, doc="environment steps per agent step")
    utd: int = _opt(2, low=1, doc="gradient updates per update call (every update_every agent steps)")
    update_every: int = _opt(1, low=1, doc="replay agents: run the utd gradient updates every this many agent steps "
                                           "after warm-up (drqv2 default 2, as DrQ-v2)")
    batch_size: int = _opt(256, low=1, doc="minibatch size")
    buffer_size: int = _opt(1_000_000, low=1, doc="replay capacity (agent transitions)")
    warmup_steps: int = _opt(5_000, low=0, doc="random-action agent steps before learning")
    lr: float = _opt(1e-4, low=0.0, low_open=True, doc="AdamW learning rate (actor, critic, temperature)")
    weight_decay: float = _opt(1e-2, low=0.0, doc="AdamW decoupled weight decay (on the parameters weight_decay_on "
                                                  "names)")
    weight_decay_on: str = _opt("all", choices=("all", "kernels"),
                                doc="parameters AdamW decays: all (biases and LayerNorm too, as the reference's optax "
                                    "adamw) or kernels only; pruned weights stay zero either way")
    gamma: float = _opt(0.99, low=0.0, high=1.0, doc="discount")
    tau: float = _opt(0.005, low=0.0, high=1.0, doc="Polyak rate of the target critic")
    arch: str = _opt("simba", choices=("simba", "mlp"), doc="network architecture of actor and critic")
    obs_norm: bool = _opt(True, doc="normalise observations by running mean/std (state observations only)")
    pixels: bool = _opt(False, doc="observe rendered RGB frames instead of states (DMC tasks, agent=drqv2)")
    frame_stack: int = _opt(3, low=1, doc="pixels: frames stacked into one observation")
    n_step: int = _opt(1, low=1, doc="n-step returns (frame replay of agent=drqv2; drqv2 default 3)")
    eval_every: int = _opt(10_000, low=1, doc="evaluate every this many env steps")
    eval_episodes: int = _opt(10, low=1, doc="episodes per periodic evaluation")
    final_eval_episodes: int = _opt(100, low=1, doc="episodes of the final evaluation")
    diag_every: int = _opt(10_000, low=0, doc="diagnostics (srank, dormant units, norms, gradient interference) every "
                                             "this many env steps into diagnostics.csv; 0 = off")
    diag_probe: str = _opt("fresh", choices=("fresh", "fixed"),
                           doc="probe set of the diagnostics: fresh (a new draw from the whole buffer at every "
                               "diagnostic, from (seed, env step), as the reference) or fixed (drawn once at the "
                               "first diagnostic and reused, kept in the checkpoints)")
    diag_probe_size: int = _opt(1024, low=2, doc="transitions in the probe set of the diagnostics")
    diag_grad_samples: int = _opt(32, low=2, doc="per-sample gradients in the gradient-interference matrix")
    checkpoint_every: int = _opt(100_000, low=1, doc="save a checkpoint every this many env steps (at an episode end)")
    keep_checkpoints: int = _opt(2, low=1, doc="checkpoints kept per run (older ones are deleted)")
    resume: bool = _opt(True, doc="continue the run found in run_dir (same config) from its last checkpoint")
    run_dir: str | None = _opt(None, doc="output directory; default runs/<name>; with several seeds, <run_dir>/seed<k>")
    name: str | None = _opt(None, doc="run name; default built from agent, env, sizes, sparsities, seed")
    overwrite: bool = _opt(False, doc="replace an existing run directory")
    progress: bool = _opt(True, doc="show a progress bar")
    actor: ActorConfig = field(default_factory=ActorConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    reset: ResetConfig = field(default_factory=ResetConfig)
    log: LogConfig = field(default_factory=LogConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    sac: SACConfig = field(default_factory=SACConfig)
    ddpg: DDPGConfig = field(default_factory=DDPGConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    drqv2: DrQv2Config = field(default_factory=DrQv2Config)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    render: RenderConfig = field(default_factory=RenderConfig)

    @property
    def mask_seed(self) -> int:
        return self.seed if self.sparsity.seed is None else self.sparsity.seed

    @property
    def agent_steps(self) -> int:
        return self.env_steps // self.action_repeat

    def default_name(self) -> str:
        a, c = self.actor, self.critic
        init = "" if self.init == "dense" else f"-{self.init.replace('_', '')}"
        topo = lambda section: "" if section.topology == "static" else section.topology  # noqa: E731
        enc = (f"-e{self.encoder.channels}x{self.encoder.layers}s{self.encoder.sparsity:g}{topo(self.encoder)}"
               if self.pixels else "")
        return (f"{self.agent}-{self.env.replace(':', '_')}{enc}-a{a.width}x{a.blocks}s{a.sparsity:g}{topo(a)}"
                f"-c{c.width}x{c.blocks}s{c.sparsity:g}{topo(c)}{init}-seed{self.seed}")

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / (self.name or self.default_name())

    @property
    def seed_list(self) -> list[int]:
        if self.seeds is not None:
            return [int(s) for s in self.seeds.split(",")]
        return [self.seed + i for i in range(self.num_seeds)]

    def per_seed(self) -> list["Config"]:
        """One single-seed config per seed: exactly what a single-seed run with that seed would use."""
        seeds = self.seed_list
        if len(seeds) == 1:
            return [dataclasses.replace(self, seed=seeds[0], seeds=None, num_seeds=1)]
        out = []
        for s in seeds:
            if self.run_dir or self.name:
                root = Path(self.run_dir) if self.run_dir else Path("runs") / self.name
                run_dir = str(root / f"seed{s}")
            else:
                run_dir = None
            out.append(dataclasses.replace(self, seed=s, seeds=None, num_seeds=1, run_dir=run_dir, name=None))
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Schema walking: dotted keys, types, documentation


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_section(tp) -> bool:
    return dataclasses.is_dataclass(tp)


def schema(cls=Config, prefix: str = "") -> dict[str, tuple[Any, dataclasses.Field]]:
    """Flat mapping ``dotted.key -> (type, field)`` of every leaf option."""
    out = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_section(tp):
            out.update(schema(tp, prefix + f.name + "."))
        else:
            out[prefix + f.name] = (tp, f)
    return out


def _type_name(tp) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    name = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[base]
    return name + (" or null" if args else "")


def _convert(key: str, value: Any, tp) -> Any:
    """Convert a YAML/CLI value to the field's type or raise a one-line ConfigError."""
    optional = type(None) in typing.get_args(tp)
    base = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
    if isinstance(value, str) and optional and value.lower() in ("null", "none", "~", ""):
        return None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key}: null is not allowed; expected {_type_name(tp)}")
    bad = ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise bad
    if base is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:  # exact for long digit strings (a float would round 99999999999999999999)
                return int(value.replace("_", ""))
            except ValueError:
                pass
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                raise bad from None
            if number.is_integer():  # accepts 1e6 and 1_000_000
                return int(number)
        raise bad
    if base is float:
        if isinstance(value, bool):
            raise bad
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise bad from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}={value!r}: must be a finite number")
        return number
    if base is str:
        if isinstance(value, (dict, list)):
            raise bad
        return str(value)
    raise AssertionError(f"unsupported type {tp}")


def _check_range(key: str, value: Any, meta: dict) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key}={value!r}: must be one of {', '.join(choices)}")
    low, high = meta.get("low"), meta.get("high")
    if low is None and high is None:
        return
    ok = True
    if low is not None:
        ok &= value > low if meta.get("low_open") else value >= low
    if high is not None:
        ok &= value < high if meta.get("high_open") else value <= high
    if not ok:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        lb = "(" if meta.get("low_open") or low is None else "["
        rb = ")" if meta.get("high_open") or high is None else "]"
        raise ConfigError(f"{key}={value!r}: must be in {lb}{lo}, {hi}{rb}")


def format_value(value: Any) -> str:
    """A config value as a user writes it (``true``, ``0.9``, ``humanoid-run``): in labels and messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, prefix + str(k) + "."))
        else:
            out[prefix + str(k)] = v
    return out


def _control_char(text: str) -> str | None:
    """The first control character, line/paragraph separator or lone surrogate (undecodable byte) in ``text``."""
    return next((c for c in text if unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp")), None)


def parse_overrides(args: list[str]) -> dict[str, str]:
    out = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ConfigError(f"{arg!r}: overrides are key=value (e.g. critic.sparsity=0.9)")
        if _control_char(arg) is not None:
            raise ConfigError(f"{arg!r}: contains a control character or invalid UTF-8")
        if value[:1] in ("[", "{"):  # a YAML list (sweep axes: env=[a,b]) or mapping must be complete
            try:
                parsed = yaml.load(value, Loader=_UniqueKeyLoader)
            except (yaml.YAMLError, ValueError, TypeError, RecursionError):
                parsed = None
            if not isinstance(parsed, list if value[0] == "[" else dict):
                kind = "list" if value[0] == "[" else "mapping"
                example = f"{key}=[a,b]" if kind == "list" else f"{key}={{a: 1}}"
                raise ConfigError(f"{arg!r}: malformed or unterminated {kind}; write e.g. {example} "
                                  f"(quoted in the shell)")
        out[key] = value
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (safe_load keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    if (key_node.tag, key_node.value) in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key_node.value!r}", key_node.start_mark)
                    seen.add((key_node.tag, key_node.value))
        return super().construct_mapping(node, deep)


MAX_YAML_BYTES = 16 * 2**20


def read_yaml(path: str | Path, what: str) -> Any:
    """The YAML document of a file (duplicate keys refused), or a one-line ConfigError starting with
    ``what`` when it is not a readable UTF-8 YAML file."""
    path = Path(path)
    try:
        if path.is_dir():
            raise ConfigError(f"{what}: is a directory, not a YAML file")
        if path.stat().st_size > MAX_YAML_BYTES:
            raise ConfigError(f"{what}: {path.stat().st_size:,} bytes is too large for a YAML config")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what}: not UTF-8 text (invalid byte at offset {e.start}); not a YAML file") from None
    except OSError as e:
        raise ConfigError(f"{what}: cannot be read ({e.strerror or type(e).__name__})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as e:
        where = f" at line {e.problem_mark.line + 1}" if e.problem_mark else ""
        raise ConfigError(f"{what}: invalid YAML ({e.problem or e.context or type(e).__name__}{where})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what}: invalid YAML ({' '.join(str(e).split())})") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as e:  # e.g. a date 2024-13-01
        raise ConfigError(f"{what}: invalid YAML ({type(e).__name__}: {' '.join(str(e).split())})") from None


def resolve_run_preset(name: str | Path) -> Path:
    """A preset path, or the name of a bundled run preset (``stream_ac`` or ``stream_ac.yaml``)."""
    path = Path(name)
    if path.exists() or path.is_symlink() or path.parent != Path("."):
        return path
    bundled = PRESET_DIR / f"{path.stem}.yaml"
    return bundled if path.suffix in ("", ".yaml") and bundled.is_file() else path


def load_preset(path: str | Path) -> dict[str, Any]:
    path = resolve_run_preset(path)
    what = f"preset {str(path)!r}"
    if not path.exists():
        if path.is_symlink():
            raise ConfigError(f"{what}: no such file (a dangling symlink or a symlink loop)")
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"{what}: no such file or bundled preset{suggest(path.stem, known)} "
                          f"(bundled: {', '.join(known)})")
    data = read_yaml(path, what)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: expected a mapping of config keys (key: value lines), not a {type(data).__name__}")
    return flatten_unique(data, what)


def flatten_unique(tree: dict, what: str) -> dict[str, Any]:
    """:func:`flatten` of a YAML mapping, refusing a key set twice (``critic: {width: 1}`` and
    ``critic.width: 2``) and structures that nest too deeply or contain themselves."""
    try:
        keys = list(_leaf_keys(tree))
    except RecursionError:
        raise ConfigError(f"{what}: nested too deeply (or refers to itself)") from None
    if len(set(keys)) != len(keys):
        twice = next(k for k in keys if keys.count(k) > 1)
        raise ConfigError(f"{what}: key {twice!r} is given twice (nested and dotted)")
    return flatten(tree)


def _leaf_keys(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaf_keys(v, prefix + str(k) + ".")
        else:
            yield prefix + str(k)


# Defaults of an agent that differ from the top-level ones (applied under the user's values when
# that agent is chosen and no ``base`` config is given): DrQ-v2's published settings.
AGENT_DEFAULTS: dict[str, dict[str, Any]] = {
    "drqv2": {"pixels": True, "obs_norm": False, "arch": "mlp", "actor.width": 1024, "actor.blocks": 1,
              "critic.width": 1024, "critic.blocks": 1, "critic.cdq": True, "lr": 1e-4, "weight_decay": 0.0,
              "tau": 0.01, "utd": 1, "update_every": 2, "n_step": 3, "warmup_steps": 2000, "action_repeat": 2,
              "final_eval_episodes": 10},
}


def build(values: dict[str, Any], base: Config | None = None, check_env: bool = True) -> Config:
    """Apply flat ``dotted.key -> value`` settings on ``base`` (default: defaults, plus the chosen
    agent's :data:`AGENT_DEFAULTS`) and validate."""
    keys = schema()
    nested: dict[str, Any] = (base or Config()).to_dict()
    if base is None and "agent" in values:
        agent_defaults = AGENT_DEFAULTS.get(str(values["agent"]), {})
        values = {**agent_defaults, **values}
    for key, raw in values.items():
        if key not in keys:
            raise ConfigError(f"unknown key {key!r}{suggest(key, keys)}")
        tp, f = keys[key]
        value = _convert(key, raw, tp)
        _check_range(key, value, f.metadata)
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    cfg = _from_dict(Config, nested)
    validate(cfg, check_env=check_env)
    return cfg


def _from_dict(cls, data: dict):
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        v = data[f.name]
        kwargs[f.name] = _from_dict(hints[f.name], v) if _is_section(hints[f.name]) else v
    return cls(**kwargs)


MAX_SEED = 2**31 - 1  # what every RNG takes (JAX keys, NumPy SeedSequence, MuJoCo/Gymnasium envs)
MAX_NUM_SEEDS = 1000

# Sections that only one kind of agent reads: setting one of their keys for another agent is refused.
AGENT_SECTIONS = {"sac": ("sac",), "ddpg": ("ddpg",), "stream": ("stream_ac",), "drqv2": ("drqv2",),
                  "encoder": ("drqv2",), "render": ("drqv2",)}


def _check_seeds(cfg: Config) -> None:
    if cfg.num_seeds > MAX_NUM_SEEDS:
        raise ConfigError(f"num_seeds={cfg.num_seeds}: at most {MAX_NUM_SEEDS} seeds train together")
    if cfg.seed > MAX_SEED:
        raise ConfigError(f"seed={cfg.seed}: seeds must be at most {MAX_SEED} (2**31-1)")
    if cfg.sparsity.seed is not None and cfg.sparsity.seed > MAX_SEED:
        raise ConfigError(f"sparsity.seed={cfg.sparsity.seed}: seeds must be at most {MAX_SEED} (2**31-1)")
    if cfg.seeds is not None:
        big = [s for s in cfg.seed_list if s > MAX_SEED]
        if big or len(cfg.seed_list) > MAX_NUM_SEEDS:
            raise ConfigError(f"seeds={cfg.seeds if len(cfg.seeds) < 80 else cfg.seeds[:77] + '...'}: "
                              f"at most {MAX_NUM_SEEDS} seeds, each at most {MAX_SEED} (2**31-1)")
    elif cfg.seed + cfg.num_seeds - 1 > MAX_SEED:
        raise ConfigError(f"seed={cfg.seed} num_seeds={cfg.num_seeds}: the last seed would exceed {MAX_SEED} (2**31-1)")
    if (cfg.seed_parallel == "vmap" and cfg.sparsity.compute != "masked" and cfg.sparsity.draw == "bernoulli"
            and len(cfg.seed_list) > 1):
        # sparse compute stores kernels compact: i.i.d. draws keep a different count per seed, and
        # arrays of different lengths cannot be stacked
        raise ConfigError(f"sparsity.draw=bernoulli: with sparsity.compute={cfg.sparsity.compute} and "
                          "seed_parallel=vmap every seed must keep the same count; use sparsity.draw=exact "
                          "or seed_parallel=loop")


def _check_agent_sections(cfg: Config) -> None:
    defaults = Config()
    for section, owners in AGENT_SECTIONS.items():
        if cfg.agent in owners:
            continue
        value, default = getattr(cfg, section), getattr(defaults, section)
        for f in dataclasses.fields(value):
            if getattr(value, f.name) != getattr(default, f.name):
                raise ConfigError(f"{section}.{f.name}={getattr(value, f.name)!r}: applies to "
                                  f"agent={' or '.join(owners)} only, not agent={cfg.agent}")


def _check_topology(cfg: Config) -> None:
    """Dynamic topology (sparserl.topology): a sparse module to rewire, an agent and options that fit."""
    dynamic = []
    for module in ("actor", "critic", "encoder"):
        section = getattr(cfg, module)
        if section.topology == "static":
            continue
        dynamic.append(module)
        if section.sparsity == 0.0:
            raise ConfigError(f"{module}.topology={section.topology}: rewires a sparse mask, but {module}.sparsity=0; "
                              f"set {module}.sparsity > 0 or {module}.topology=static")
        if cfg.agent == "stream_ac":
            raise ConfigError(f"{module}.topology={section.topology}: not supported by agent=stream_ac "
                              f"(replay agents only)")
    if not dynamic and cfg.topology != TopologyConfig():
        changed = next(f.name for f in dataclasses.fields(TopologyConfig)
                       if getattr(cfg.topology, f.name) != getattr(TopologyConfig(), f.name))
        raise ConfigError(f"topology.{changed}={getattr(cfg.topology, changed)!r}: applies only when a module's "
                          f"topology is set or rigl (e.g. critic.topology=rigl)")
    if dynamic and cfg.reset.every:
        raise ConfigError(f"reset.every={cfg.reset.every}: resets redraw the initial masks, which would undo "
                          f"{dynamic[0]}.topology={getattr(cfg, dynamic[0]).topology}; use one or the other")
    if cfg.topology.schedule == "constant" and cfg.topology.decay_end:
        raise ConfigError(f"topology.decay_end={cfg.topology.decay_end}: applies to topology.schedule=cosine only")


def validate(cfg: Config, check_env: bool = True) -> None:
    """Checks that span several keys (single-key ranges are checked on assignment)."""
    for key, (tp, f) in schema().items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        _check_range(key, value, f.metadata)
    if cfg.seeds is not None:
        parts = [p.strip() for p in cfg.seeds.split(",")]
        if not all(p.isdigit() for p in parts) or len({int(p) for p in parts}) != len(parts):
            raise ConfigError(f"seeds={cfg.seeds!r}: expected distinct non-negative integers separated by commas, e.g. 0,1,2,3")
        if cfg.num_seeds != 1:
            raise ConfigError(f"seeds={cfg.seeds} and num_seeds={cfg.num_seeds}: give one of them (seeds= lists the "
                              f"seeds, num_seeds= counts up from seed=)")
    _check_seeds(cfg)
    for key in ("env", "log.wandb_project"):
        value = cfg.env if key == "env" else cfg.log.wandb_project
        if _control_char(value) is not None:
            raise ConfigError(f"{key}={value!r}: contains a control character")
    if cfg.agent != "stream_ac" and cfg.buffer_size < cfg.batch_size:
        raise ConfigError(f"buffer_size={cfg.buffer_size}: smaller than batch_size={cfg.batch_size}; a minibatch "
                          f"would repeat transitions (raise buffer_size or lower batch_size)")
    _check_agent_sections(cfg)
    _check_topology(cfg)
    if cfg.diag_grad_samples > cfg.diag_probe_size:
        raise ConfigError(f"diag_grad_samples={cfg.diag_grad_samples}: at most diag_probe_size={cfg.diag_probe_size} "
                          f"(the per-sample gradients come from the probe set)")
    if cfg.name is not None and (cfg.name in ("", ".", "..") or any(c in cfg.name for c in "/\\")
                                 or _control_char(cfg.name) is not None):
        raise ConfigError(f"name={cfg.name!r}: must be a plain file name (no path separators or control characters, "
                          f"not . or ..); put a path in run_dir= instead")
    if cfg.run_dir is not None and (cfg.run_dir == "" or _control_char(cfg.run_dir) is not None):
        raise ConfigError(f"run_dir={cfg.run_dir!r}: must be a non-empty path without control characters")
    if cfg.env_steps < cfg.action_repeat:
        raise ConfigError(f"env_steps={cfg.env_steps}: must be at least action_repeat={cfg.action_repeat}")
    if cfg.sac.log_std_min >= cfg.sac.log_std_max:
        raise ConfigError(f"sac.log_std_min={cfg.sac.log_std_min}: must be below sac.log_std_max={cfg.sac.log_std_max}")
    if cfg.agent != "stream_ac" and cfg.init != "dense":
        raise ConfigError(f"init={cfg.init!r}: only agent=stream_ac has a sparse_init option; use actor.sparsity/"
                          f"critic.sparsity for a static mask")
    if cfg.agent == "stream_ac":
        for key, value, allowed in (("critic.cdq", cfg.critic.cdq, False), ("reset.every", cfg.reset.every, 0),
                                    ("video.every", cfg.video.every, 0), ("seed_parallel", cfg.seed_parallel, "vmap")):
            if (key != "seed_parallel" and value != allowed) or (key == "seed_parallel" and value == allowed):
                raise ConfigError(f"{key}={value!r}: not supported by agent=stream_ac (see docs/streaming.md)")
    if cfg.agent == "drqv2" and not cfg.pixels:
        raise ConfigError("pixels=false: agent=drqv2 learns from pixels; set pixels=true (its default)")
    if cfg.pixels and cfg.agent != "drqv2":
        raise ConfigError(f"pixels=true: only agent=drqv2 learns from pixels, not agent={cfg.agent}")
    if cfg.pixels and cfg.obs_norm:
        raise ConfigError("obs_norm=true: observation normalisation does not apply to pixels; set obs_norm=false")
    if cfg.pixels and cfg.env.startswith("gym:"):
        raise ConfigError(f"env={cfg.env!r}: pixels=true needs a DMC task (domain-task)")
    if cfg.n_step > 1 and not cfg.pixels:
        raise ConfigError(f"n_step={cfg.n_step}: n-step returns are implemented in the frame replay only (pixels=true)")
    if cfg.drqv2.std_end > cfg.drqv2.std_start:
        raise ConfigError(f"drqv2.std_end={cfg.drqv2.std_end}: must not exceed drqv2.std_start={cfg.drqv2.std_start}")
    if cfg.pixels and cfg.render.size < 2 * cfg.encoder.layers + 3:
        raise ConfigError(f"render.size={cfg.render.size}: too small for encoder.layers={cfg.encoder.layers} "
                          f"3x3 convolutions")
    if check_env:
        from sparserl import envs

        envs.check_env_name(cfg.env)


def from_args(preset: str | None, overrides: list[str], check_env: bool = True) -> Config:
    values = load_preset(preset) if preset else {}
    values.update(parse_overrides(overrides))
    return build(values, check_env=check_env)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def reference_table() -> str:
    """Markdown table of every key, its default and meaning (used for docs/config.md)."""
    rows = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    defaults = flatten(Config().to_dict())
    for key, (tp, f) in schema().items():
        m = f.metadata
        allowed = ", ".join(m["choices"]) if m.get("choices") else _type_name(tp)
        rows.append(f"| `{key}` | `{defaults[key]}` | {allowed} | {m.get('doc', '')} |")
    return "\n".join(rows)
