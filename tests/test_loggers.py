"""TensorBoard logging, evaluation videos, and their failure modes."""

import csv
import sys

import numpy as np
import pytest

from sparserl import config, envs, loggers, train
from sparserl.cli import main

TINY = ["env=cartpole-balance", "env_steps=2000", "eval_every=1000", "warmup_steps=300", "eval_episodes=1",
        "final_eval_episodes=1", "batch_size=32", "actor.width=16", "critic.width=16", "critic.blocks=1",
        "progress=false", "diag_every=1000"]


def test_tensorboard_scalars_read_back_and_video_frames(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    messages = []
    train.train(config.from_args(None, TINY + ["log.tensorboard=true", "video.every=2000", "video.size=48",
                                               f"run_dir={run_dir}"]), log=messages.append)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    for key in ("eval_return", "critic_loss", "temperature", "actor_param_norm"):
        logged = [(e.step, e.value) for e in events.Scalars(f"metrics/{key}")]
        expected = [(int(r["env_step"]), float(r[key])) for r in rows if r[key]]
        assert [s for s, _ in logged] == [s for s, _ in expected]
        np.testing.assert_allclose([v for _, v in logged], [v for _, v in expected], rtol=1e-6)
    assert [e.step for e in events.Scalars("diagnostics/critic_srank_pre_ln")] == [1000, 2000]
    (video_event,) = events.Images("eval/video")  # the evaluation video, as an animated GIF
    assert video_event.step == 2000 and (video_event.width, video_event.height) == (48, 48)
    from PIL import Image
    import io
    with Image.open(io.BytesIO(video_event.encoded_image_string)) as gif:
        # Pillow merges identical consecutive frames (the cart at rest) into longer ones
        assert 400 < gif.n_frames <= 501

    import imageio.v2 as imageio

    video = run_dir / "videos" / "step_2000.mp4"
    reader = imageio.get_reader(video)
    # a DMC episode: 1000 env steps = 500 agent steps with action repeat 2, plus the first frame
    assert reader.count_frames() == 501
    assert reader.get_data(0).shape == (48, 48, 3)
    assert any("video:" in m for m in messages)


def test_missing_tensorboard_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails as if not installed
    run_dir = tmp_path / "run"
    assert main(["train", *TINY, "log.tensorboard=true", f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "log.tensorboard" in err[0] and "sparserl[tensorboard]" in err[0]
    assert not run_dir.exists()


def test_render_failure_keeps_the_evaluation(tmp_path, monkeypatch):
    def broken(self, height, width):
        raise RuntimeError("no OpenGL context")

    monkeypatch.setattr(envs.DMCEnv, "render", broken)
    messages = []
    run_dir = tmp_path / "run"
    summary = train.train(config.from_args(None, TINY + ["video.every=1000", "diag_every=0", f"run_dir={run_dir}"]),
                          log=messages.append)
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["env_step"]) for r in rows] == [0, 1000, 2000] and all(r["eval_return"] for r in rows)
    assert summary["final_return"] == pytest.approx(float(rows[-1]["eval_return"]))
    warnings = [m for m in messages if "could not record the evaluation video" in m]
    assert len(warnings) == 2 and "no OpenGL context" in warnings[0]
    assert not (run_dir / "videos").exists() or not any((run_dir / "videos").iterdir())


def test_gif_when_no_mp4_encoder(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)
    frames = [np.full((8, 8, 3), i * 20, np.uint8) for i in range(5)]
    path = loggers.write_video(frames, tmp_path / "v" / "step_10")
    assert path.suffix == ".gif"
    with Image.open(path) as gif:
        assert gif.n_frames == 5 and gif.size == (8, 8)


def test_wandb_offline_writes_run_with_config_and_scalars(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    train.train(config.from_args(None, TINY + ["log.wandb=true", "log.wandb_mode=offline", "diag_every=0",
                                               "critic.width=24", "video.every=2000", "video.size=32",
                                               f"run_dir={run_dir}"]), log=lambda m: None)
    (offline,) = list((run_dir / "wandb").glob("offline-run-*"))
    (records,) = list(offline.glob("run-*.wandb"))
    data = records.read_bytes()
    # the resolved config (as the run's config) and the logged scalars are in the offline record file
    assert b"critic" in data and b'"width":24' in data.replace(b" ", b"")
    assert b"metrics/eval_return" in data and b"metrics/critic_loss" in data
    (video,) = list(offline.glob("files/media/videos/eval/*.mp4"))  # the evaluation video went to W&B too
    assert video.stat().st_size > 1000


def test_missing_wandb_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)
    run_dir = tmp_path / "run"
    assert main(["train", *TINY, "log.wandb=true", f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "log.wandb" in err[0] and "sparserl[wandb]" in err[0]
    assert not run_dir.exists()
