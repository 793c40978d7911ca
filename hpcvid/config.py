"""Job specs: YAML -> frozen dataclasses, strictly.

Every mistake in a spec (unknown key, wrong type, missing value, bad choice, out-of-range number) becomes one
`SpecError` whose text is `FILE: key.path: what is wrong`, which the CLI prints as one line with exit status 2.
`--set a.b.c=value` overrides are applied to the raw YAML before validation, so they get the same checks.

A job file holds one section per stage it configures, e.g. `prep:`; `hpcvid check JOB.yaml` validates them all.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class UserError(ValueError):
    """Bad input from the user (a spec, a manifest, a path): the CLI prints it as one line and exits with 2."""


class RunStopped(RuntimeError):
    """A run that stopped on purpose and must not be retried as it is (e.g. training diverged): the CLI prints the
    one-line reason and exits with EXIT_RUN_STOPPED, so a scheduler records a failure instead of requeueing."""


EXIT_USER_ERROR = 2
EXIT_RUN_STOPPED = 3


class SpecError(UserError):
    """A user error in a job spec: one line naming the file and the key path."""

    def __init__(self, source: str, key: str, message: str):
        self.source, self.key, self.message = source, key, message
        where = f"{source}: {key}: " if key else f"{source}: "
        super().__init__(where + message)


# ---------------------------------------------------------------------------------------------------- prep spec

@dataclass(frozen=True)
class ManifestSpec:
    """Which videos to read. `kind` picks the layout; `path` is the CSV (webvid/openvid) or the folder."""
    kind: Literal["folder", "webvid", "openvid"]
    path: str
    video_root: Optional[str] = None       # CSV layouts: where the video files are (default: the CSV's folder)
    require_caption: bool = True           # an empty caption is a failure (folder videos without <name>.txt too)
    skip_missing: bool = False             # count rows whose file is absent as filtered, not failed (partial downloads)
    min_duration: Optional[float] = None   # seconds, from the CSV's duration column (not checked for folders)
    max_duration: Optional[float] = None
    min_aesthetic_score: Optional[float] = None           # OpenVid-1M score thresholds
    min_motion_score: Optional[float] = None
    max_motion_score: Optional[float] = None
    min_temporal_consistency_score: Optional[float] = None
    camera_motion: Optional[list[str]] = None             # OpenVid: keep only these camera-motion labels
    limit: Optional[int] = None            # use only the first N rows (trials)

    def validate(self, at: str) -> None:
        _positive_or_none(self, at, "min_duration", "max_duration", "limit")
        if self.min_duration is not None and self.max_duration is not None and self.min_duration > self.max_duration:
            raise _ValueProblem(f"{at}.min_duration", f"{self.min_duration} is above max_duration {self.max_duration}")
        openvid_only = ["min_aesthetic_score", "min_motion_score", "max_motion_score",
                        "min_temporal_consistency_score", "camera_motion"]
        if self.kind != "openvid":
            for name in openvid_only:
                if getattr(self, name) is not None:
                    raise _ValueProblem(f"{at}.{name}", f"only applies to kind 'openvid', not '{self.kind}'")


@dataclass(frozen=True)
class ClipSpec:
    """How clips are cut from a video. `fps` resamples by a whole-frame stride; null keeps every frame."""
    num_frames: int = 16
    fps: Optional[float] = None
    clips_per_video: int = 1               # evenly spaced over the video, deterministic

    def validate(self, at: str) -> None:
        _positive_or_none(self, at, "num_frames", "fps", "clips_per_video")


@dataclass(frozen=True)
class TextSpec:
    """Caption embeddings stored per clip. `encoder`: 'minilm' (offline default), 'none', or a local HF model folder."""
    encoder: str = "minilm"
    max_tokens: int = 64
    batch_size: int = 64

    def validate(self, at: str) -> None:
        _positive_or_none(self, at, "max_tokens", "batch_size")


@dataclass(frozen=True)
class EncoderSpec:
    """The latent written per clip. 'pixels' stores raw frames (downsampled by `downsample`) as uint8."""
    kind: Literal["pixels", "reducio", "cmd"] = "pixels"
    downsample: int = 1
    checkpoint: Optional[str] = None       # trained autoencoders (reducio, cmd) load from this local path
    device: str = "cpu"

    def validate(self, at: str) -> None:
        _positive_or_none(self, at, "downsample")
        if self.kind in ("reducio", "cmd"):
            if not self.checkpoint:
                raise _ValueProblem(f"{at}.checkpoint", f"encoder kind '{self.kind}' needs the path of a train_ae "
                                                        f"output folder or of one of its checkpoints/step-* folders")
            if self.downsample != 1:
                raise _ValueProblem(f"{at}.downsample", f"only applies to kind 'pixels', not '{self.kind}' "
                                                         f"(got {self.downsample}); remove it")


@dataclass(frozen=True)
class ShardSpec:
    """How rows are packed into HDF5 shards: `rows_per_shard` consecutive manifest rows per shard."""
    rows_per_shard: int = 256
    compression: Literal["auto", "gzip", "lzf", "none"] = "auto"   # auto: gzip for integer data, none for floats

    def validate(self, at: str) -> None:
        _positive_or_none(self, at, "rows_per_shard")


@dataclass(frozen=True)
class PrepSpec:
    manifest: ManifestSpec
    output: str                                   # dataset folder: shards, index.json, failures.jsonl
    clip: ClipSpec = field(default_factory=ClipSpec)
    buckets: list[tuple[int, int]] = field(default_factory=lambda: [(256, 256)])   # (height, width) choices
    text: TextSpec = field(default_factory=TextSpec)
    encoder: EncoderSpec = field(default_factory=EncoderSpec)
    shards: ShardSpec = field(default_factory=ShardSpec)
    batch_size: int = 8                           # clips per encoder call
    decode_workers: int = 2                       # decoding threads that run ahead of the encoder
    torch_threads: Optional[int] = None           # encoder threads; null: this rank's cores minus decode_workers
    decode_backend: Literal["auto", "decord", "pyav"] = "auto"
    progress: bool = True                         # tqdm bar per rank

    def validate(self, at: str) -> None:
        _positive_or_none(self, at, "batch_size", "decode_workers", "torch_threads")
        if not self.buckets:
            raise _ValueProblem(f"{at}.buckets", "needs at least one [height, width]")
        for i, (h, w) in enumerate(self.buckets):
            if h <= 0 or w <= 0 or h % self.encoder.downsample or w % self.encoder.downsample:
                raise _ValueProblem(f"{at}.buckets[{i}]", f"[{h}, {w}] must be positive and divisible by "
                                                         f"encoder.downsample={self.encoder.downsample}")


@dataclass(frozen=True)
class SelftestSpec:
    """A cluster check: ranks rendezvous over torch.distributed, then a resumable loop of `steps` short steps."""
    output: str                                   # folder for its checkpoint and report
    steps: int = 5
    step_seconds: float = 0.2
    fail_at_step: Optional[int] = None            # raise at this step (to test failure handling)

    def validate(self, at: str) -> None:
        _positive_or_none(self, at, "steps")


# ---------------------------------------------------------------------------------------------------- autoencoders

@dataclass(frozen=True)
class AEModelSpec:
    """Which autoencoder: a family and a named size preset (hpcvid.models.reducio/cmd *_PRESETS); `overrides`
    replaces single fields of the preset's config (e.g. {motion_channels: 16}), checked when the model is built."""
    kind: Literal["reducio", "cmd"]
    preset: Literal["tiny", "paper"] = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AEDataSpec:
    """Clips for autoencoder training or evaluation: decoded from a manifest, or read from a `pixels` prep dataset.

    Every clip is resized (cover + centre crop) to `resolution`; `include`/`exclude` are glob patterns on video ids
    (e.g. to hold a video out of training and evaluate on it). Each rank decodes its share once and keeps it in
    memory (3 T H W bytes a clip): `max_clips` bounds that for large datasets."""
    source: Literal["manifest", "shards"] = "manifest"
    manifest: Optional[ManifestSpec] = None
    shards: Optional[str] = None                  # folder of a prep dataset written with encoder kind 'pixels'
    clip: ClipSpec = field(default_factory=ClipSpec)
    resolution: tuple[int, int] = (64, 64)        # (height, width)
    include: Optional[list[str]] = None
    exclude: Optional[list[str]] = None
    max_clips: Optional[int] = None               # use about the first N clips (each rank keeps ceil(N / ranks))
    decode_backend: Literal["auto", "decord", "pyav"] = "auto"

    def validate(self, at: str) -> None:
        _positive_or_none(self, at, "max_clips")
        if self.source == "manifest" and (self.manifest is None or self.shards is not None):
            raise _ValueProblem(f"{at}.manifest", "source 'manifest' needs a manifest: section and no shards: path")
        if self.source == "shards" and (self.shards is None or self.manifest is not None):
            raise _ValueProblem(f"{at}.shards", "source 'shards' needs a shards: folder and no manifest: section")
        h, w = self.resolution
        if h <= 0 or w <= 0:
            raise _ValueProblem(f"{at}.resolution", f"must be positive [height, width], got [{h}, {w}]")


@dataclass(frozen=True)
class AELossSpec:
    """Loss weights (METHODS.md §1). l1 is the mean absolute error per pixel; kl is the KL divergence summed over
    a clip's latent and divided by its pixel count (so the weight means what the paper's 1e-6 means); ssim weighs
    1 - SSIM per frame, the perceptual stand-in (no LPIPS/VGG weights offline); gan a hinge 3D PatchGAN with the
    adaptive weight, from gan_start_step on."""
    l1: float = 1.0
    kl: float = 1e-6
    ssim: float = 0.1
    gan: float = 0.0
    gan_start_step: int = 10001
    disc_channels: int = 64
    disc_layers: int = 3
    disc_lr: Optional[float] = None               # null: the generator's lr
    perceptual_weights: Optional[str] = None      # not supported (see validate)

    def validate(self, at: str) -> None:
        for name in ("l1", "kl", "ssim", "gan"):
            if getattr(self, name) < 0:
                raise _ValueProblem(f"{at}.{name}", f"must be >= 0, got {getattr(self, name)}")
        if self.gan_start_step < 0:
            raise _ValueProblem(f"{at}.gan_start_step", f"must be >= 0, got {self.gan_start_step}")
        _positive_or_none(self, at, "disc_channels", "disc_layers", "disc_lr")
        if self.perceptual_weights is not None:
            raise _ValueProblem(f"{at}.perceptual_weights", "an LPIPS loss is not available in hpcvid (it needs "
                                "pretrained VGG features); remove this key: SSIM (loss.ssim) is the perceptual "
                                "stand-in")


@dataclass(frozen=True)
class TrainAESpec:
    """Autoencoder training: `steps` optimizer steps of `batch_size` clips per rank, resumed from OUTPUT."""
    model: AEModelSpec
    data: AEDataSpec
    output: str                                   # run folder: checkpoints/, metrics.jsonl, report, curves
    steps: int = 1000
    batch_size: int = 2                           # clips per rank per step
    lr: float = 1e-4
    warmup_steps: int = 0                         # linear warm-up from 0 to lr
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: Optional[float] = 1.0              # max global gradient norm; null: no clipping
    max_nonfinite_steps: int = 20                 # consecutive steps with a non-finite loss or gradient norm are
                                                  # skipped (no update); this many in a row stop the run (exit 3)
    loss: AELossSpec = field(default_factory=AELossSpec)
    checkpoint_every: int = 500
    keep_last: int = 3                            # complete checkpoints kept (older ones are deleted)
    log_every: int = 10
    probe_clips: int = 4                          # fixed clips whose PSNR/SSIM is measured at the start and end
    seed: int = 0
    parallel: Literal["ddp", "fsdp2"] = "ddp"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"   # auto: bf16 autocast on CUDA, fp32 on CPU
    torch_threads: Optional[int] = None           # null: this rank's share of the cores
    progress: bool = True                         # tqdm bar on rank 0

    def validate(self, at: str) -> None:
        _positive_or_none(self, at, "steps", "batch_size", "lr", "checkpoint_every", "keep_last", "log_every",
                          "probe_clips", "grad_clip", "torch_threads", "max_nonfinite_steps")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise _ValueProblem(f"{at}.warmup_steps", "warmup_steps and weight_decay must be >= 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise _ValueProblem(f"{at}.betas", f"each beta must be in [0, 1), got {list(self.betas)}")
        if self.loss.gan > 0 and self.parallel == "fsdp2":
            raise _ValueProblem(f"{at}.loss.gan", "the GAN loss's adaptive weight needs parallel: ddp "
                                                  "(fsdp2 shards the last decoder layer it reads)")


@dataclass(frozen=True)
class EvalAESpec:
    """Reconstruction quality (PSNR, SSIM per clip and overall) and compression of a trained autoencoder."""
    checkpoint: str                               # a train_ae output folder (its latest checkpoint) or a step-* folder
    data: AEDataSpec
    output: str                                   # folder for report.json and contact_sheet.png
    batch_size: int = 2
    contact_clips: int = 4                        # clips shown in the contact sheet (original row over reconstruction)
    contact_frames: int = 8                       # frames per row, evenly spaced over the clip
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: Optional[int] = None

    def validate(self, at: str) -> None:
        _positive_or_none(self, at, "batch_size", "contact_clips", "contact_frames", "torch_threads")


@dataclass(frozen=True)
class JobSpec:
    """A job file: one optional section per stage."""
    prep: Optional[PrepSpec] = None
    selftest: Optional[SelftestSpec] = None
    train_ae: Optional[TrainAESpec] = None
    eval_ae: Optional[EvalAESpec] = None

    def stage(self, name: str, source: str = "<spec>"):
        section = getattr(self, name, None)
        if section is None:
            raise SpecError(source, name, f"missing: this job file has no '{name}:' section")
        return section


# ---------------------------------------------------------------------------------------------------- loading

class _ValueProblem(Exception):
    """Raised by validate() methods; turned into a SpecError carrying the file name."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key, self.message = key, message


def _positive_or_none(obj: Any, at: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and value <= 0:
            raise _ValueProblem(f"{at}.{name}", f"must be > 0, got {value!r}")


def load_job(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Read a YAML job file, apply `a.b=v` overrides, and validate into a JobSpec (SpecError on any problem)."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise SpecError(source, "", f"cannot read the job file ({e.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        raise SpecError(source, "", f"{line}not valid YAML ({getattr(e, 'problem', e)})") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise SpecError(source, "", f"expected a mapping at the top level, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item, source)
    return parse_spec(JobSpec, raw, source)


def apply_override(raw: dict, item: str, source: str = "--set") -> None:
    """`a.b.c=value`: value is parsed as YAML (so 3 is an int, [64, 64] a list, null is None)."""
    key, sep, value = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise SpecError(source, "", f"--set expects KEY.PATH=VALUE, got {item!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
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
        raise _ValueProblem(at or "<top>", f"expected a mapping, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = _join(at, str(unknown[0]))
        raise _ValueProblem(key, f"unknown key; valid keys here: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        key = _join(at, name)
        if name in raw:
            values[name] = _convert(hints[name], raw[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _ValueProblem(key, "missing required value")
    obj = cls(**values)
    if hasattr(obj, "validate"):
        obj.validate(at or "<top>")
    return obj


def _convert(tp: Any, value: Any, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, key)
        raise TypeError(f"unsupported union type {tp} at {key}")
    if value is None:
        raise _ValueProblem(key, f"expected {_type_name(tp)}, got null")
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
            raise _ValueProblem(key, f"expected int, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _ValueProblem(key, f"expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _ValueProblem(key, f"expected a string, got {_describe(value)}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported type {tp} at {key}")


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else f"a list {json.dumps(value)[:40]}"
    return f"{value!r}"


def _type_name(tp: Any) -> str:
    return {int: "int", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _join(at: str, name: str) -> str:
    return f"{at}.{name}" if at else name


def to_dict(spec: Any) -> Any:
    """A spec as plain JSON-able data (tuples become lists), for digests and records."""
    return json.loads(json.dumps(dataclasses.asdict(spec)))


def digest(data: Any) -> str:
    """A short stable hash of JSON-able data (e.g. a spec section), for telling datasets apart."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
