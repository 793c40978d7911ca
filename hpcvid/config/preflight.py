"""Preflight: what the filesystem must hold before a stage starts (inputs exist, outputs can be created)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional

import dataclasses

from hpcvid.config.loader import SpecError
from hpcvid.config.specs import JobSpec, _Need


STAGE_SECTIONS = tuple(f.name for f in dataclasses.fields(JobSpec))


def preflight(job: JobSpec, source: str, stage: Optional[str] = None) -> None:
    """What the filesystem must hold before a stage starts: inputs exist, outputs can be created. SpecError
    naming the file and key otherwise. Creates nothing.

    `stage`: check that section only, strictly (a stage about to run). None: every section (`hpcvid check`); an
    input under another section's output is then taken as made by that stage first (eval_ae.checkpoint =
    train_ae.output in one file). Relative paths are relative to the working directory, as the stages read them."""
    names = [stage] if stage is not None else [n for n in STAGE_SECTIONS if getattr(job, n) is not None]
    needs = {name: list(job.stage(name, source).needs(name)) for name in names}
    for name in names:
        made_here = [_absolute(n.path) for other in names if other != name
                     for n in needs[other] if n.kind == "out" and n.path.strip()]
        for need in needs[name]:
            if need.kind != "out" and any(_absolute(need.path) == m or _absolute(need.path).startswith(m + os.sep)
                                          for m in made_here):
                continue
            problem = _path_problem(need)
            if problem:
                raise SpecError(source, need.key, problem)


def _absolute(path: str) -> str:
    return os.path.abspath(path)      # no ~ expansion: the stages take paths as written, and so does this


def _path_problem(need: _Need) -> Optional[str]:
    path, got = need.path, f"(got {need.path!r}{_relative_note(need.path)})"
    if need.kind == "module":
        if importlib.util.find_spec(path) is None:
            return f"needs {need.what}, which is not installed; pip install it, or name a local model folder or 'none'"
        return None
    if not path.strip():
        return f"must not be empty; give a {need.what} path"
    target = Path(path)
    if need.kind == "out":
        return _creatable_problem(target, need, got)
    if need.kind == "model" and not (target / "config.json").is_file():
        return (f"is neither 'minilm', 'none' nor a {need.what} with a config.json {got}; download the model into "
                f"a folder and give that (hubs are not reached)")
    if not target.exists():
        return f"no such {need.what} {got}; fix the path" + (", or create it" if need.kind == "dir" else "")
    if need.kind == "file" and not target.is_file():
        return f"is not a file {got}; give the {need.what}"
    if need.kind in ("dir", "model") and not target.is_dir():
        return f"is a file, not a folder {got}; give the {need.what}"
    if not os.access(target, os.R_OK | (os.X_OK if target.is_dir() else 0)):
        return f"cannot be read {got}; fix its permissions"
    return None


def _creatable_problem(target: Path, need: _Need, got: str) -> Optional[str]:
    """An existing writable folder, or one mkdir -p can make: the first existing ancestor is a writable folder."""
    if target.is_symlink() and not target.exists():
        return f"is a broken symbolic link {got}; remove it or choose another {need.what}"
    if target.exists():
        if not target.is_dir():
            return f"is an existing file, not a folder {got}; choose another {need.what} path"
        if not os.access(target, os.W_OK | os.X_OK):
            return f"folder is not writable {got}; choose another {need.what} or fix its permissions"
        return None
    for parent in Path(_absolute(str(target))).parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                return f"cannot be created: {str(parent)!r} is a file, not a folder {got}; choose another path"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"cannot be created: {str(parent)!r} is not writable {got}; choose another path"
            return None
    return None


def _relative_note(path: str) -> str:
    return "" if os.path.isabs(path) else f", relative to {os.getcwd()}"
