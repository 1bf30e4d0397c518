"""Optional live loggers and evaluation videos. metrics.csv stays the source of truth.

* TensorBoard (``log.tensorboard=true``, extra ``sparserl[tensorboard]``): every scalar of
  metrics.csv and diagnostics.csv under ``RUN_DIR/tensorboard/``, x-axis = env steps, the resolved
  config as text. Watch live with ``tensorboard --logdir runs/``.
* Weights & Biases (``log.wandb=true``, ``log.wandb_project``, ``log.wandb_mode``, extra
  ``sparserl[wandb]``): the same scalars and the videos; the resolved config as run config.
* Videos (``video.every=N``, extra ``sparserl[video]``): one deterministic evaluation episode every
  N env steps to ``RUN_DIR/videos/step_<N>.mp4`` (GIF when no mp4 encoder is installed).

Asking for something whose package is missing is a one-line error before training starts.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from sparserl.config import Config, ConfigError


def check_available(cfg: Config) -> None:
    wanted = [("log.tensorboard", cfg.log.tensorboard, "tensorboardX", "tensorboard"),
              ("log.wandb", cfg.log.wandb, "wandb", "wandb")]
    for key, on, module, extra in wanted:
        if not on:
            continue
        try:
            __import__(module)
        except ImportError:
            raise ConfigError(f"{key}=true needs the {module} package: pip install 'sparserl[{extra}]'") from None
    if cfg.log.wandb and cfg.log.wandb_mode == "online" \
            and os.environ.get("WANDB_MODE", "").lower() not in ("offline", "disabled", "dryrun") \
            and not wandb_credentials():
        raise ConfigError("log.wandb=true: no Weights & Biases credentials (set WANDB_API_KEY or run `wandb login`), "
                          "or log offline with log.wandb_mode=offline")


def wandb_credentials() -> bool:
    """Whether an online W&B run could log in: WANDB_API_KEY, or an entry for the W&B host in the
    netrc file `wandb login` writes (``$NETRC`` or ``~/.netrc``)."""
    if os.environ.get("WANDB_API_KEY", "").strip():
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError, UnicodeDecodeError):
        return False
    return bool(entry and entry[2])


class TensorBoardLogger:
    def __init__(self, run_dir: Path, config_yaml: str):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir=str(run_dir / "tensorboard"), flush_secs=10)
        self.writer.add_text("config", "```\n" + config_yaml + "\n```", 0)

    def log_scalars(self, step: int, scalars: dict[str, float], prefix: str) -> None:
        for key, value in scalars.items():
            if value is not None and np.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{key}", float(value), step)
        self.writer.flush()

    def log_video(self, step: int, path: Path, frames: list[np.ndarray]) -> None:
        """An animated GIF in TensorBoard's image tab (what tensorboardX's add_video makes with moviepy)."""
        from tensorboardX.proto.summary_pb2 import Summary

        buffer = io.BytesIO()
        _save_gif(frames, buffer)
        height, width = frames[0].shape[:2]
        image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=buffer.getvalue())
        self.writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag="eval/video", image=image)]), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, cfg: Config, run_dir: Path, config: dict):
        import wandb

        self.wandb = wandb
        # one W&B run per run directory; the id is stable so that a resumed run continues it
        run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project=cfg.log.wandb_project, mode=cfg.log.wandb_mode, dir=str(run_dir),
                              name=run_dir.name, id=run_id, resume="allow", config=config, reinit="create_new")

    def log_scalars(self, step: int, scalars: dict[str, float], prefix: str) -> None:
        values = {f"{prefix}/{k}": float(v) for k, v in scalars.items() if v is not None and np.isfinite(v)}
        self.run.log(values, step=step)

    def log_video(self, step: int, path: Path, frames: list[np.ndarray]) -> None:
        self.run.log({"eval/video": self.wandb.Video(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


def make_loggers(cfg: Config, run_dir: Path, config_yaml: str, config: dict) -> list:
    out = []
    if cfg.log.tensorboard:
        out.append(TensorBoardLogger(run_dir, config_yaml))
    if cfg.log.wandb:
        out.append(WandbLogger(cfg, run_dir, config))
    return out


# ----------------------------------------------------------------------------------------------
# Videos


def record_episode(env, policy: Callable[[np.ndarray], np.ndarray], size: int = 128) -> list[np.ndarray]:
    """RGB frames (H, W, 3) of one episode: the first observation, then one per agent step."""
    obs, done = env.reset(), False
    frames = [env.render(size, size)]
    while not done:
        obs, _, terminated, truncated = env.step(policy(obs))
        frames.append(env.render(size, size))
        done = terminated or truncated
    return frames


def write_video(frames: list[np.ndarray], path_without_suffix: Path, fps: int = 30) -> Path:
    """mp4 through imageio-ffmpeg when installed, else an animated GIF (Pillow)."""
    path_without_suffix.parent.mkdir(parents=True, exist_ok=True)
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401

        path = path_without_suffix.with_suffix(".mp4")
        with warnings.catch_warnings():  # ffmpeg runs as a subprocess: fork+exec is safe despite JAX's threads
            warnings.filterwarnings("ignore", message="os.fork", category=RuntimeWarning)
            imageio.mimwrite(path, [np.asarray(f, np.uint8) for f in frames], fps=fps, macro_block_size=1)
        return path
    except ImportError:
        path = path_without_suffix.with_suffix(".gif")
        _save_gif(frames, path, fps)
        return path


def _save_gif(frames: list[np.ndarray], target, fps: int = 30) -> None:
    from PIL import Image

    images = [Image.fromarray(np.asarray(f, np.uint8)) for f in frames]
    images[0].save(target, format="GIF", save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
