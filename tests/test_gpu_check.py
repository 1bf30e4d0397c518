"""scripts/gpu_check.sh runs end to end (``--tiny``: the same program on tiny shapes, here on the CPU)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_tiny_writes_every_measurement(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["tiny"] is True
    points = {(r["model"], r["mode"], r["seeds"]) for r in result["sac"]}
    assert points == {(m, mode, n) for m in ("4.4M", "17M", "109M") for mode in ("dense", "masked") for n in (1, 2)}
    for r in result["sac"]:
        assert r["updates_per_s"] > 0 and r["seed_updates_per_s"] == pytest.approx(r["updates_per_s"] * r["seeds"])
    sizes = {r["model"]: r["params"] for r in result["sac"]}
    assert sizes["4.4M"] < sizes["17M"] < sizes["109M"]
    assert result["encoder"]["seconds_per_call"] > 0
