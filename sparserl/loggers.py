"""Optional live loggers and evaluation videos. metrics.csv stays the source of truth.

* TensorBoard (``log.tensorboard=true``, extra ``sparserl[tensorboard]``): every scalar of
  metrics.csv and diagnostics.csv under ``RUN_DIR/tensorboard/``, x-axis = env steps, the resolved
  config as text. Watch live with ``tensorboard --logdir runs/``.
* Videos (``video.every=N``, extra ``sparserl[video]``): one deterministic evaluation episode every
  N env steps to ``RUN_DIR/videos/step_<N>.mp4`` (GIF when no mp4 encoder is installed).

Asking for something whose package is missing is a one-line error before training starts.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from sparserl.config import Config, ConfigError


def check_available(cfg: Config) -> None:
    if cfg.log.tensorboard:
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            raise ConfigError("log.tensorboard=true needs the tensorboardX package: "
                              "pip install 'sparserl[tensorboard]'") from None


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

    def close(self) -> None:
        self.writer.close()


def make_loggers(cfg: Config, run_dir: Path, config_yaml: str) -> list:
    return [TensorBoardLogger(run_dir, config_yaml)] if cfg.log.tensorboard else []


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
        from PIL import Image

        path = path_without_suffix.with_suffix(".gif")
        images = [Image.fromarray(np.asarray(f, np.uint8)) for f in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return path
