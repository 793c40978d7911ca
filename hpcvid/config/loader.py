"""Reading spec files strictly: errors, number bounds, YAML without duplicate keys, and plain data -> dataclasses.

The ground floor of hpcvid.config: it knows no spec class. Every problem becomes one `SpecError` whose text is
`FILE: key.path: what is wrong`, which the CLI prints as one line with exit status 2.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional, Union

import yaml


class UserError(ValueError):
    """Bad input from the user (a spec, a manifest, a path): the CLI prints it as one line and exits with 2."""


class RunStopped(RuntimeError):
    """A run that stopped on purpose and must not be retried as it is (e.g. training diverged): the CLI prints the
    one-line reason and exits with EXIT_RUN_STOPPED, so a scheduler records a failure instead of requeueing."""


class Preempted(RuntimeError):
    """A run that saved its state and stopped on a preemption signal (SIGUSR2/SIGTERM): running it again resumes.
    The CLI prints the one-line reason and exits with EXIT_PREEMPTED (75, EX_TEMPFAIL: "try again later")."""


EXIT_USER_ERROR = 2
EXIT_RUN_STOPPED = 3
EXIT_PREEMPTED = 75


class SpecError(UserError):
    """A user error in a job spec: one line naming the file and the key path."""

    def __init__(self, source: str, key: str, message: str):
        self.source, self.key, self.message = source, key, message
        where = f"{source}: {key}: " if key else f"{source}: "
        super().__init__(where + message)


def error_line(error: BaseException) -> str:
    """An error's text as one line whatever a value in it holds (a path or a key with a newline)."""
    return str(error).replace("\r", "\\r").replace("\n", "\\n")


def name_source(error: UserError, source: str) -> UserError:
    """Make a user error raised while a stage ran name the job file too (the stage knows the key, only the caller
    knows the file). Unchanged when it already names it; returned for `raise name_source(e, path)`."""
    if not (isinstance(error, SpecError) or str(source) in str(error)):
        error.args = (f"{source}: {error}",)
    return error


# ---------------------------------------------------------------------------------------------------- bounds

class _Bound(NamedTuple):
    """Limits of one number field (every int/float field has one, tests/unit/test_config.py checks): values that
    parse but cannot be meant are refused by `hpcvid check` instead of failing every row at run time."""
    gt: Optional[float] = None
    ge: Optional[float] = None
    lt: Optional[float] = None
    le: Optional[float] = None

    def problem(self, value: float) -> Optional[str]:
        """The first limit `value` breaks, as 'must be > 0 (got 0); use a larger value', or None."""
        for limit, ok, word in ((self.gt, lambda v, x: v > x, ">"), (self.ge, lambda v, x: v >= x, ">="),
                                (self.lt, lambda v, x: v < x, "<"), (self.le, lambda v, x: v <= x, "<=")):
            if limit is not None and not ok(value, limit):
                fix = "use a smaller value" if word in ("<", "<=") else "use a larger value"
                return f"must be {word} {_plain_number(limit)} (got {_describe(value)}); {fix}"
        return None

    def describe(self) -> str:
        """The whole range in words, for the values of a pair like [height, width]: 'positive and <= 8192'."""
        low = ("positive" if self.gt == 0 else f"> {_plain_number(self.gt)}") if self.gt is not None else \
            (f">= {_plain_number(self.ge)}" if self.ge is not None else "")
        if self.ge is not None and (self.lt is not None or self.le is not None):
            high = self.lt if self.lt is not None else self.le
            return f"in [{_plain_number(self.ge)}, {_plain_number(high)}{')' if self.lt is not None else ']'}"
        high = f"< {_plain_number(self.lt)}" if self.lt is not None else \
            (f"<= {_plain_number(self.le)}" if self.le is not None else "")
        return " and ".join(part for part in (low, high) if part)


def _num(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING, gt: Optional[float] = None,
         ge: Optional[float] = None, lt: Optional[float] = None, le: Optional[float] = None) -> Any:
    """A number field (or a list/tuple of numbers: each is checked) with its bounds, written once, here."""
    return field(default=default, default_factory=factory, metadata={"bound": _Bound(gt, ge, lt, le)})


# Upper bounds: far above any real setting, low enough to catch a slip (an extra digit, a pasted id, a number in
# the wrong key) before a job is queued. Each says why it is where it is.
_MAX_SIDE = 8192            # pixels per frame side: 8K video; one 8192x8192 RGB frame is already 200 MB
_MAX_FRAMES = 4096          # frames per clip: 4096 frames of 256x256 RGB is 800 MB for ONE clip, before batching
_MAX_FPS = 1000.0           # resampling target: above any camera but high-speed ones; faster than the source
                            # keeps every frame anyway
_MAX_CLIP_BATCH = 4096      # clips held at once (encoder call, training batch per rank): 4096 clips of
                            # 16x256x256 is 12 GB
_MAX_TEXT_BATCH = 65536     # captions per text-encoder call: short strings, but their token states are not
_MAX_TOKENS = 8192          # caption tokens: above the context of any text encoder we load (MiniLM 256, T5 512)
_MAX_THREADS = 1024         # threads or workers per rank: above the core count of any node
_MAX_COUNT = 10 ** 9        # steps, rows, clips: beyond any run or dataset (WebVid-10M has 10.7M rows)
_MAX_SECONDS = 1e6          # video durations: 11 days, longer than any video in a manifest
_MAX_WEIGHT = 1e6           # loss weights: a ratio of a million between terms is a typo, not a choice
_MAX_LR = 1e6               # learning rates: absurd above ~1, but divergence handling is tested with lr 1000
                            # (train_ae.max_nonfinite_steps), so only typos of many digits are refused


# ---------------------------------------------------------------------------------------------------- reading YAML

class _DuplicateKey(Exception):
    def __init__(self, key: str, line: int, first_line: int):
        super().__init__(key)
        self.key, self.line, self.first_line = key, line, first_line


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping, at any depth (PyYAML silently keeps the last).

    The check runs on the composed node tree, before anything is constructed, so the error can name the key path
    and both lines. Merge keys (`<<: *base`) may be overridden: that is what they are for."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            self._refuse_duplicates(node, "", frozenset())
        return node

    def _refuse_duplicates(self, node: yaml.Node, at: str, inside: frozenset) -> None:
        if id(node) in inside:          # an alias inside its own anchor: walked already
            return
        inside = inside | {id(node)}
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._refuse_duplicates(item, f"{at}[{i}]", inside)
        elif isinstance(node, yaml.MappingNode):
            first: dict[Any, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    self._refuse_duplicates(value_node, at, inside)
                    continue
                if not isinstance(key_node, yaml.ScalarNode):   # a list as a key: the constructor refuses it
                    continue
                name = self.construct_object(key_node)          # so that 1 and 0x1 are one key, as in a dict
                path, line = _join(at, str(name)), key_node.start_mark.line + 1
                if name in first:
                    raise _DuplicateKey(path, line, first[name])
                first[name] = line
                self._refuse_duplicates(value_node, path, inside)


def read_yaml(path: str | Path, what: str = "job file") -> Any:
    """Read a spec file (a job file, a pipeline file) as plain data, or raise one SpecError naming the file:
    unreadable, not UTF-8 (with the line and byte offset), not YAML (with the line), or a key given twice."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise SpecError(source, "", f"cannot read the {what} ({e.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise SpecError(source, "", f"line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at byte offset "
                                    f"{e.start}); save the {what} as UTF-8") from None
    return _parse_yaml(text, source)


def _parse_yaml(text: str, source: str) -> Any:
    """YAML text -> plain data with StrictLoader; one SpecError naming `source` and the line otherwise."""
    try:
        return yaml.load(text, Loader=StrictLoader)
    except _DuplicateKey as e:
        raise _duplicate_error(source, "", e) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            line = f"line {mark.line + 1}: "
        elif isinstance(e, yaml.reader.ReaderError):
            line = f"line {text.count(chr(10), 0, e.position) + 1}: "
        else:
            line = ""
        problem = getattr(e, "problem", None) or getattr(e, "reason", None) or str(e)
        raise SpecError(source, "", f"{line}not valid YAML ({' '.join(str(problem).split())})") from None


def _duplicate_error(source: str, at: str, e: _DuplicateKey) -> SpecError:
    return SpecError(source, _join(at, e.key), f"duplicate key at line {e.line} (first given at line "
                                               f"{e.first_line}); keep one of them")


# ---------------------------------------------------------------------------------------------------- loading

class _ValueProblem(Exception):
    """Raised by validate() methods; turned into a SpecError carrying the file name."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key, self.message = key, message


def _positive_or_none(obj: Any, at: str, *names: str) -> None:
    """For spec classes outside this module (pipeline resources); fields here declare bounds with `_num`."""
    for name in names:
        value = getattr(obj, name)
        if value is not None and value <= 0:
            raise _ValueProblem(f"{at}.{name}", f"must be > 0, got {value!r}")


def apply_override(raw: dict, item: str, source: str = "--set") -> None:
    """`a.b.c=value`: value is parsed as YAML (so 3 is an int, [64, 64] a list, null is None)."""
    key, sep, value = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise SpecError(source, "", f"--set expects KEY.PATH=VALUE, got {item!r}")
    try:
        parsed = yaml.load(value, Loader=StrictLoader) if value.strip() else ""
    except _DuplicateKey as e:
        raise _duplicate_error(source, key, e) from None
    except yaml.YAMLError:
        parsed = value                         # not YAML: the plain string (type checks still apply)
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpecError(source, ".".join(parts[: depth + 1]), f"--set {key}: is a value, not a section")
        node = child
    node[parts[-1]] = parsed


def parse_spec(cls: type, raw: Any, source: str, at: str = ""):
    """Build dataclass `cls` from plain data; every problem becomes a SpecError naming `source` and the key path."""
    try:
        return _build(cls, raw, at)
    except _ValueProblem as e:
        raise SpecError(source, e.key, e.message) from None


def _build(cls: type, raw: Any, at: str):
    if not isinstance(raw, dict):
        raise _ValueProblem(at or "<top>", f"expected {_mapping_name(at)}, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in raw if k not in fields)
    if unknown:
        key = _join(at, unknown[0])
        raise _ValueProblem(key, f"unknown key; valid keys here: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        key = _join(at, name)
        if name in raw:
            if raw[name] is None and f.metadata.get("null") == "refused":
                raise _ValueProblem(key, f"expected {_mapping_name(key)}, got null; fill it in or remove the key")
            values[name] = _convert(hints[name], raw[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _ValueProblem(key, "missing required value")
    obj = cls(**values)
    for f in dataclasses.fields(obj):
        if "bound" in f.metadata:
            _check_bound(f.metadata["bound"], getattr(obj, f.name), _join(at, f.name))
    if hasattr(obj, "validate"):
        obj.validate(at or "<top>")
    return obj


def _check_bound(bound: _Bound, value: Any, key: str) -> None:
    """A number, or each number of a list/tuple (e.g. [height, width], named as a whole: 'each value must be ...')."""
    if isinstance(value, (list, tuple)):
        if any(isinstance(item, (list, tuple)) for item in value):
            for i, item in enumerate(value):
                _check_bound(bound, item, f"{key}[{i}]")
        elif any(bound.problem(item) for item in value):
            raise _ValueProblem(key, f"each value must be {bound.describe()} (got {_describe(list(value))}); "
                                     f"fix the values out of range")
    elif value is not None:
        problem = bound.problem(value)
        if problem:
            raise _ValueProblem(key, problem)


def _convert(tp: Any, value: Any, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        _refuse_nonfinite(value, key)
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, key)
        raise TypeError(f"unsupported union type {tp} at {key}")
    if value is None:
        fix = "; fill it in or remove the key" if dataclasses.is_dataclass(tp) else ""
        raise _ValueProblem(key, f"expected {_type_name(tp, key)}, got null{fix}")
    if origin is Literal:
        if value not in args:
            raise _ValueProblem(key, f"expected one of {', '.join(repr(a) for a in args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise _ValueProblem(key, f"expected a list, got {_describe(value)}")
        return [_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise _ValueProblem(key, f"expected a list of {len(args)} values, got {_describe(value)}")
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise _ValueProblem(key, f"expected a mapping, got {_describe(value)}")
        return {str(k): _convert(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise _ValueProblem(key, f"expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _ValueProblem(key, f"expected int, got {_describe(value)}{_yaml_number_hint(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _ValueProblem(key, f"expected a number, got {_describe(value)}{_yaml_number_hint(value)}")
        _refuse_nonfinite(value, key)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _ValueProblem(key, f"expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"unsupported type {tp} at {key}")


def _refuse_nonfinite(value: Any, key: str) -> None:
    """.nan and .inf parse as YAML floats (and 1e999 as inf); no setting means them. Walks free-form values too."""
    if isinstance(value, dict):
        for k, v in value.items():
            _refuse_nonfinite(v, f"{key}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _refuse_nonfinite(v, f"{key}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise _ValueProblem(key, f"must be a finite number (got {_describe(value)}); give a real value")
    elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2 ** 1023:
        raise _ValueProblem(key, f"must be a finite number (got an integer of {len(str(abs(value)))} digits); "
                                 f"give a real value")


def _yaml_number_hint(value: Any) -> str:
    """'1e-6' and '1.0e7' are strings to YAML 1.1 (PyYAML): it wants a dot and a signed exponent."""
    if not isinstance(value, str) or "e" not in value.lower():
        return ""
    try:
        float(value)
    except ValueError:
        return ""
    return " (a string to YAML: write exponents with a dot and a sign, e.g. 1.0e-6, 1.0e+7)"


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else f"a list {json.dumps(value, default=str)[:40]}"
    if isinstance(value, float) and not math.isfinite(value):
        return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")   # as YAML spells them
    return f"{value!r}"


def _plain_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(x)


def _mapping_name(key: str) -> str:
    """'a mapping (the clip: section)': what a section key needs, in the words of the file."""
    if not key or key == "<top>":
        return "a mapping at the top level"
    return f"a mapping (the {key.rsplit('.', 1)[-1]}: section)"


def _type_name(tp: Any, key: str) -> str:
    """What a key expects, in the words of the file (never a Python class name)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _mapping_name(key)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return "a list"
    if origin is tuple:
        return f"a list of {len(typing.get_args(tp))} values"
    if origin is dict:
        return "a mapping"
    return {int: "int", float: "a number", str: "a string", bool: "true or false"}.get(tp, "a value")


def _join(at: str, name: str) -> str:
    """A key path; a key that holds a newline or another unprintable character is shown as a literal, so the
    error stays one line."""
    name = name if name.isprintable() else repr(name)
    return f"{at}.{name}" if at else name


def to_dict(spec: Any) -> Any:
    """A spec as plain JSON-able data (tuples become lists), for digests and records."""
    return json.loads(json.dumps(dataclasses.asdict(spec)))


def digest(data: Any) -> str:
    """A short stable hash of JSON-able data (e.g. a spec section), for telling datasets apart."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
