"""The lock (requirements/lock-cpu-py311.txt) must cover setup.py and pin every package exactly.

`make` installs the lock with --no-deps, so a requirement that setup.py gains without `make lock` would be missing
from every install; these tests say so before pip check does. Files only: no network, nothing installed.
"""
from __future__ import annotations

import ast
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements" / "lock-cpu-py311.txt"
EXTRAS = ("test",)   # the extras that `make` installs and the lock must hold


def setup_requirements(path: Path = REPO / "setup.py") -> list[Requirement]:
    """install_requires plus the EXTRAS of extras_require, read from the setup() call without running setup.py."""
    tree = ast.parse(path.read_text(), filename=str(path))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup"]
    assert len(calls) == 1, f"{path}: expected one setup() call, found {len(calls)}"
    kwargs = {kw.arg: kw.value for kw in calls[0].keywords}
    reqs = list(ast.literal_eval(kwargs["install_requires"]))
    extras = ast.literal_eval(kwargs["extras_require"]) if "extras_require" in kwargs else {}
    for extra in EXTRAS:
        assert extra in extras, f"{path}: extras_require has no {extra!r}"
        reqs += extras[extra]
    return [Requirement(r) for r in reqs]


def lock_entries(text: str) -> list[str]:
    """The requirement lines of a requirements file: continuations joined, comments and blank lines dropped."""
    joined = text.replace("\\\n", " ")
    lines = (line.split(" #", 1)[0].strip() for line in joined.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def parse_lock(text: str) -> tuple[dict[str, Version], list[str]]:
    """{normalised name: pinned version} and one problem line per entry that is not `name==version --hash=...`."""
    pins: dict[str, Version] = {}
    problems: list[str] = []
    for entry in lock_entries(text):
        spec, *options = entry.split()
        try:
            req = Requirement(spec)
        except Exception:       # an option line (-e, -r, --index-url ...) or garbage
            problems.append(f"not a requirement: {entry[:80]}")
            continue
        specs = list(req.specifier)
        if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version or req.url or req.marker:
            problems.append(f"not pinned with ==: {spec}")
            continue
        if not any(opt.startswith("--hash=sha256:") for opt in options):
            problems.append(f"no sha256 hash: {spec}")
        name = canonicalize_name(req.name)
        if name in pins:
            problems.append(f"pinned twice: {name}")
        pins[name] = Version(specs[0].version)
    return pins, problems


def uncovered(requirements: list[Requirement], pins: dict[str, Version]) -> list[str]:
    """The requirements that the pins miss or whose pinned version falls outside the range."""
    missing = []
    for req in requirements:
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        version = pins.get(canonicalize_name(req.name))
        if version is None:
            missing.append(f"{req} is not in the lock")
        elif not req.specifier.contains(version, prereleases=True):
            missing.append(f"{req} but the lock has {version}")
    return missing


def test_lock_covers_setup_py():
    pins, _ = parse_lock(LOCK.read_text())
    problems = uncovered(setup_requirements(), pins)
    assert not problems, f"{LOCK.relative_to(REPO)} does not cover setup.py (run `make lock`): " + "; ".join(problems)


def test_every_lock_line_is_pinned_with_a_hash():
    pins, problems = parse_lock(LOCK.read_text())
    assert not problems, f"{LOCK.relative_to(REPO)}: " + "; ".join(problems)
    assert canonicalize_name("torch") in pins and pins["torch"].local == "cpu", "the lock must hold the CPU torch build"


# The checks themselves, on small made-up files: they must catch what they claim to catch.

def test_parse_lock_flags_unpinned_and_unhashed_lines():
    text = ("Foo_Bar==1.0 \\\n    --hash=sha256:aa\n    # via x\n"
            "baz>=2 \\\n    --hash=sha256:bb\n"
            "qux==3\n"
            "-e file:.\n")
    pins, problems = parse_lock(text)
    assert pins == {"foo-bar": Version("1.0"), "qux": Version("3")}
    assert problems == ["not pinned with ==: baz>=2", "no sha256 hash: qux==3", "not a requirement: -e file:."]


def test_uncovered_normalises_names_and_checks_ranges():
    pins = {"pyyaml": Version("6.0"), "mpi4py": Version("3.1"), "torch": Version("2.13.0+cpu")}
    reqs = [Requirement(r) for r in ("PyYAML", "mpi4py>=4", "torch>=2.6", "gt_all.MiniLM-L6-v2")]
    assert uncovered(reqs, pins) == ["mpi4py>=4 but the lock has 3.1", "gt_all.MiniLM-L6-v2 is not in the lock"]
