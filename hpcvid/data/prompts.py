"""What to render: the videos a render job makes, from its prompt or a prompt file (docs/rendering.md).

    prompts.txt     one prompt per line; empty lines are skipped; the text is taken as it is (quotes, unicode)
    prompts.jsonl   one JSON value per line: a string (a prompt; "\\n" gives a prompt with a newline), or an object
                    {"prompt": "..."} or {"segments": ["...", "..."]}    segment prompts, spread evenly over the
                                                                          video in order (a story)
                    with optional "image": "first.png" (relative to the file's folder; image-to-video),
                    "name": "folder-name" and "seed": 7

Every problem is one line naming the file and line; a request never reaches a shell.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

KEYS = ("prompt", "segments", "image", "name", "seed")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
SLUG_CHARS = 40


class PromptError(ValueError):
    """A prompt file problem, one line naming the file and line."""


@dataclass(frozen=True)
class VideoRequest:
    name: str                    # its folder under the render output
    prompts: tuple[str, ...]     # one prompt, or segment prompts in order
    image: Optional[str] = None  # the first keyframe, a picture file
    seed: Optional[int] = None   # None: the job's seed

    def prompt_of(self, clip: int, clips: int) -> int:
        """Which prompt conditions clip `clip` of `clips`: segment prompts split the video into equal stretches."""
        return min(len(self.prompts) - 1, clip * len(self.prompts) // clips)


def slug(text: str) -> str:
    """A folder-name fragment of a prompt: lower-case words joined by '-', at most 40 characters."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return "-".join(words)[:SLUG_CHARS].strip("-") or "video"


def single(prompt: str, image: Optional[str] = None) -> list[VideoRequest]:
    return [VideoRequest(f"0000-{slug(prompt)}", (prompt,), image)]


def _entry(value, where: str, folder: Path, index: int) -> VideoRequest:
    if isinstance(value, str):
        value = {"prompt": value}
    if not isinstance(value, dict):
        raise PromptError(f"{where}: expected a prompt string or an object, got {type(value).__name__}")
    unknown = sorted(set(value) - set(KEYS))
    if unknown:
        raise PromptError(f"{where}: unknown key {unknown[0]!r}; keys: {', '.join(KEYS)}")
    if ("prompt" in value) == ("segments" in value):
        raise PromptError(f"{where}: give exactly one of \"prompt\" and \"segments\"")
    prompts = [value["prompt"]] if "prompt" in value else value["segments"]
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise PromptError(f"{where}: prompts must be non-empty strings (\"segments\": a non-empty list of them)")
    image = value.get("image")
    if image is not None:
        if not isinstance(image, str) or not image:
            raise PromptError(f"{where}: \"image\" must be a file path")
        image = str(folder / image) if not Path(image).is_absolute() else image
        if not Path(image).is_file():
            raise PromptError(f"{where}: image {image} is not a file")
    seed = value.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63):
        raise PromptError(f"{where}: \"seed\" must be an int in [0, 2^63), got {seed!r}")
    name = value.get("name", f"{index:04d}-{slug(prompts[0])}")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise PromptError(f"{where}: \"name\" must be 1-100 of A-Z a-z 0-9 . _ - (not starting with . _ -), got "
                          f"{name!r}")
    return VideoRequest(name, tuple(prompts), image, seed)


def read_prompts(path: str | Path) -> list[VideoRequest]:
    """The videos a prompt file asks for, in file order (PromptError naming the file and line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PromptError(f"{path}: cannot read it as UTF-8 text: {e}") from None
    requests = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        if path.suffix == ".jsonl":
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptError(f"{where}: not JSON ({e.msg} at column {e.colno})") from None
        else:
            value = line
        requests.append(_entry(value, where, path.parent, len(requests)))
    if not requests:
        raise PromptError(f"{path}: no prompts in it")
    seen: dict[str, int] = {}
    for i, request in enumerate(requests):
        if request.name in seen:
            raise PromptError(f"{path}: entries {seen[request.name] + 1} and {i + 1} are both named {request.name!r}")
        seen[request.name] = i
    return requests
