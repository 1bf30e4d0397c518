"""sparserl installed the way a user installs a library: a wheel (not editable) in a fresh venv, run
from another folder, finds its bundled presets and data.

The wheel is built from a copy of the package files (never in the checkout, which others share) with
the venv's own setuptools (``--no-build-isolation``: offline). The fresh venv has no pip and no
packages of its own; one ``.pth`` line lets it import the dependencies from ``.venv``'s site-packages
as a plain directory, so ``.venv``'s editable install of sparserl (activated by *its* ``.pth`` files,
which a plain path entry does not run) cannot shadow the wheel. The default test leaves out
``setup.py``, which only compiles the optional sparse kernel (minutes on a loaded 2-core machine),
and dry-runs the smoke grid; the slow test builds the whole tree and dry-runs the full grid (its FLOP
counts compile 40 models).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PURELIB = Path(sysconfig.get_paths()["purelib"])  # .venv's site-packages: the dependencies


def _build_wheel(tmp: Path, with_setup_py: bool) -> Path:
    src = tmp / "src"
    src.mkdir()
    for name in ["pyproject.toml", "README.md"] + (["setup.py"] if with_setup_py else []):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "sparserl", src / "sparserl", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "-q", "-w", str(tmp / "dist"), str(src)], check=True, capture_output=True, text=True)
    (wheel,) = (tmp / "dist").glob("sparserl-*.whl")
    return wheel


def _fresh_venv_with(wheel: Path, tmp: Path) -> Path:
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps_from_dotvenv.pth").write_text(f"{PURELIB}\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "-q", str(wheel)], check=True, capture_output=True, text=True)
    return venv


def _run(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(venv / "bin" / "sparserl"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _check_installed(tmp: Path, whole_tree: bool) -> None:
    wheel = _build_wheel(tmp, with_setup_py=whole_tree)
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {str(p.relative_to(ROOT)) for pattern in ("presets/*.yaml", "presets/experiments/*.yaml", "data/*")
               for p in (ROOT / "sparserl").glob(pattern) if p.is_file()}
    assert shipped and shipped <= names, sorted(shipped - names)  # every preset and data file is in the wheel

    venv = _fresh_venv_with(wheel, tmp)
    elsewhere = tmp / "elsewhere"  # not the checkout: nothing can come from the source tree
    elsewhere.mkdir()
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import sparserl; print(sparserl.__file__)"],
                           cwd=elsewhere, capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(venv)), where

    dry = _run(venv, elsewhere, "sweep", "scaling_sac", "--dry-run", *([] if whole_tree else ["scale=smoke"]))
    assert dry.returncode == 0, dry.stderr[-2000:]
    if whole_tree:
        assert "scaling_sac (full): 40 points" in dry.stdout and "4,394,923" in dry.stdout
    else:
        assert "scaling_sac (smoke): 4 points" in dry.stdout and "model=w64,sparsity=sparse" in dry.stdout
    demo = _run(venv, elsewhere, "sweep", "demo", "--dry-run")
    assert demo.returncode == 0 and "demo (full)" in demo.stdout, demo.stderr[-2000:]
    preset = _run(venv, elsewhere, "inspect", "stream_ac", "--no-flops")  # a bundled run preset, by name
    assert preset.returncode == 0 and "stream_ac on gym:Hopper-v5" in preset.stdout, preset.stderr[-2000:]
    assert not any(elsewhere.iterdir())  # a dry run and an inspect write nothing
    if whole_tree:  # the demo itself, at its plumbing-only scale, writes its runs and report here
        run = _run(venv, elsewhere, "demo", "scale=smoke", "env_steps=1000", "warmup_steps=50", "eval_every=1000",
                   "final_eval_episodes=1")
        assert run.returncode == 0 and "headline (the report's)" in run.stdout, run.stderr[-2000:]
        assert (elsewhere / "runs" / "demo-smoke" / "report" / "report.html").is_file()


def test_wheel_installed_in_a_fresh_venv_has_its_presets(tmp_path):
    _check_installed(tmp_path, whole_tree=False)


@pytest.mark.slow
def test_whole_tree_wheel_installed_in_a_fresh_venv_has_its_presets(tmp_path):
    _check_installed(tmp_path, whole_tree=True)
