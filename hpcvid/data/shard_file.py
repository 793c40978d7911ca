"""One shard file of a prep dataset: its HDF5 layout (format versions 1 and 2), the writer and the one reader.

Version 2 (written since hpcvid 0.2) stores what is shared once and what compresses compressed:

    /clips/<HxW>/latents                  (N, ...)   the encoder's latents
    /clips/<HxW>/clip_id, video_id        (N,) str   ids; clip_id = video_id@start_frame
    /clips/<HxW>/row, start_frame         (N,) int64
    /clips/<HxW>/stride (int32), fps (float32), text_index (int32: the clip's row of /text)
    /clips/<HxW>/images/<name>/data       (bytes,) uint8: the encoder's pictures (e.g. the content frame), each a
    /clips/<HxW>/images/<name>/offsets    (N+1,) int64  complete PNG or WebP file; attrs codec, quality, shape
    /clips/<HxW>/extras/<name>            (N, ...)   encoder extras that are not pictures
    /text/caption                         (K,) str   each distinct caption of the shard once
    /text/states, /text/offsets           (sum L_k, D) float16, (K+1,) int64: caption k's token states are
                                          states[offsets[k]:offsets[k+1]], unpadded (absent with text encoder none)

Version 1 (read only): the caption and its padded token states per clip (caption, text_emb (N, L, D) float16,
text_mask (N, L) bool), pictures as raw uint8 in extras/<name>. `ShardReader` gives the same clip dicts for both.
"""
from __future__ import annotations

import contextlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import h5py
import numpy as np

import hpcvid
from hpcvid.config import UserError
from hpcvid.io import commit, temporary_path

SHARD_FORMAT = "hpcvid-shard"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
STR = h5py.string_dtype(encoding="utf-8")
ID_FIELDS = ("clip_id", "video_id", "row", "start_frame", "stride", "fps")
IMAGE_CODECS = ("png", "webp")
CHUNK_BYTES = 1024 * 1024      # streamed latents: at most this much a chunk (h5py's advice: 10 KiB to 1 MiB)
MAX_IMAGE_SIDE = 16384          # a stored picture larger than this is not one of ours (and would be a memory bomb)


def bucket_name(bucket: tuple[int, int]) -> str:
    return f"{bucket[0]}x{bucket[1]}"


def clip_id(video_id: str, start_frame: int) -> str:
    return f"{video_id}@{start_frame}"


class ShardFormatError(UserError):
    """A shard that does not match the documented format (wrong attrs, shapes, dtypes or offsets)."""


@dataclass
class ClipRecord:
    """What is stored beside each clip's latent."""
    video_id: str
    caption: str
    row: int
    start_frame: int
    stride: int
    fps: float


# ---------------------------------------------------------------------------------------------------- pictures

def encode_image(image: np.ndarray, codec: str, quality: int) -> bytes:
    """uint8 (3, H, W) -> the bytes of a PNG (lossless) or WebP (lossy at `quality`) file, with Pillow."""
    from PIL import Image

    buf = io.BytesIO()
    picture = Image.fromarray(np.ascontiguousarray(image.transpose(1, 2, 0)), mode="RGB")
    if codec == "png":
        picture.save(buf, format="PNG", compress_level=6)
    else:
        picture.save(buf, format="WEBP", quality=quality, method=4)
    return buf.getvalue()


def decode_image(data: bytes, shape: tuple[int, int, int], where: str) -> np.ndarray:
    """The bytes of a stored picture -> uint8 (3, H, W), refusing any other size or mode (checked before decoding)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as picture:
            if (3, picture.height, picture.width) != tuple(shape) or picture.mode not in ("RGB", "RGBA"):
                raise ShardFormatError(f"{where}: picture is {picture.mode} {picture.height}x{picture.width}, the "
                                       f"shard says {list(shape)}")
            array = np.asarray(picture.convert("RGB"))                     # (H, W, 3)
    except ShardFormatError:
        raise
    except Exception as e:      # noqa: BLE001 - Pillow raises many kinds for damaged bytes
        raise ShardFormatError(f"{where}: not a readable picture ({type(e).__name__}: {e})") from None
    return np.ascontiguousarray(array.transpose(2, 0, 1))                   # (3, H, W)


# ---------------------------------------------------------------------------------------------------- writing

class ShardWriter:
    """Appends encoded clips to one shard under a temporary name; `commit()` makes it visible atomically.

    Latents and extras (large, fixed size per clip) stream to disk in chunks of one batch. Everything small or
    ragged (ids, captions, token states, pictures) is kept in memory and written once, at its exact size, on
    commit: with resizable chunked datasets, the half-empty last chunk of each small field cost more than the
    clips themselves in small shards. The file uses HDF5's newer format (1.10+: compact chunk indexes)."""

    def __init__(self, path: Path, attrs: dict[str, Any], compression: str = "auto", image_codec: str = "png",
                 image_quality: int = 95):
        if image_codec not in IMAGE_CODECS:
            raise ValueError(f"image_codec must be one of {IMAGE_CODECS}, got {image_codec!r}")
        self.path = Path(path)
        self.tmp = temporary_path(self.path)
        self.compression, self.image_codec, self.image_quality = compression, image_codec, image_quality
        self.file = h5py.File(self.tmp, "w", libver=("v110", "latest"))
        self.file.attrs.update({"format": SHARD_FORMAT, "format_version": FORMAT_VERSION,
                                "hpcvid_version": hpcvid.__version__, "created": time.time()})
        for key, value in attrs.items():
            self.file.attrs[key] = value if isinstance(value, (str, int, float)) else json.dumps(value)
        self.counts: dict[str, int] = {}
        self._ids: dict[str, dict[str, list]] = {}                  # bucket -> field -> values
        self._pictures: dict[tuple[str, str], list[bytes]] = {}     # (bucket, name) -> files
        self._picture_shapes: dict[tuple[str, str], tuple[int, ...]] = {}
        self._captions: dict[str, int] = {}
        self._states: list[np.ndarray] = []
        self.field_bytes: dict[str, int] = {}

    # ------------------------------------------------------------------------------------------------ text

    def caption_row(self, caption: str) -> Optional[int]:
        """The caption's row of /text if it is stored already (its states need not be computed again)."""
        return self._captions.get(caption)

    def add_caption(self, caption: str, states: Optional[np.ndarray] = None) -> int:
        """Store a caption once, with its unpadded token states (L, D) when there is a text encoder."""
        if caption in self._captions:
            return self._captions[caption]
        if (states is None) != (not self._states) and self._captions:
            raise ValueError("captions with and without token states in one shard")
        if states is not None:
            if states.ndim != 2 or (self._states and states.shape[1] != self._states[0].shape[1]):
                raise ValueError(f"caption states must be (L, D) with one D per shard, got {states.shape}")
            self._states.append(states.astype(np.float16))
        self._captions[caption] = len(self._captions)
        return self._captions[caption]

    # ------------------------------------------------------------------------------------------------ clips

    def _filters(self, dtype: np.dtype) -> dict[str, Any]:
        choice = self.compression
        if choice == "auto":   # integer pixels compress well; float latents barely do and cost CPU
            choice = "gzip" if np.issubdtype(dtype, np.integer) else "none"
        if choice == "gzip":
            return {"compression": "gzip", "compression_opts": 4, "shuffle": True}
        return {"compression": "lzf"} if choice == "lzf" else {}

    def _stream(self, group: h5py.Group, name: str, data: np.ndarray) -> None:
        """Append to a resizable dataset chunked by the first batch (at most CHUNK_BYTES a chunk)."""
        if name not in group:
            per_row = max(1, int(np.prod(data.shape[1:])) * data.dtype.itemsize)
            rows = max(1, min(len(data), CHUNK_BYTES // per_row))
            group.create_dataset(name, shape=(0, *data.shape[1:]), maxshape=(None, *data.shape[1:]),
                                 dtype=data.dtype, chunks=(rows, *data.shape[1:]), **self._filters(data.dtype))
        dset = group[name]
        if dset.shape[1:] != data.shape[1:]:
            raise ValueError(f"{self.path}:{group.name}/{name}: shape {data.shape[1:]} != {dset.shape[1:]}")
        n = dset.shape[0]
        dset.resize(n + data.shape[0], axis=0)
        dset[n:] = data

    def add(self, bucket: tuple[int, int], latents: np.ndarray, records: list[ClipRecord], text_rows: list[int],
            extras: Optional[dict[str, np.ndarray]] = None, images: Optional[dict[str, np.ndarray]] = None) -> None:
        """Append B clips of one bucket: latents (B, ...), their /text rows, extras (B, ...), pictures uint8
        (B, 3, H, W) stored as PNG/WebP files."""
        if not latents.shape[0] == len(records) == len(text_rows):
            raise ValueError(f"{len(records)} records and {len(text_rows)} text rows for {latents.shape[0]} latents")
        if any(r is None or not 0 <= r < len(self._captions) for r in text_rows):
            raise ValueError(f"text rows {text_rows} do not all name a stored caption (add_caption first)")
        name = bucket_name(bucket)
        group = self.file.require_group(f"clips/{name}")
        group.attrs["bucket"] = list(bucket)
        self._stream(group, "latents", latents)
        for key, value in (extras or {}).items():
            self._stream(group.require_group("extras"), key, value)
        ids = self._ids.setdefault(name, {key: [] for key in ID_FIELDS + ("text_index",)})
        for r, text_row in zip(records, text_rows):
            for key, value in (("clip_id", clip_id(r.video_id, r.start_frame)), ("video_id", r.video_id),
                               ("row", r.row), ("start_frame", r.start_frame), ("stride", r.stride), ("fps", r.fps),
                               ("text_index", text_row)):
                ids[key].append(value)
        for key, value in (images or {}).items():
            if value.dtype != np.uint8 or value.ndim != 4 or value.shape[1] != 3 or len(value) != len(records):
                raise ValueError(f"pictures {key!r} must be uint8 (B, 3, H, W), got {value.dtype} {value.shape}")
            shape = self._picture_shapes.setdefault((name, key), tuple(value.shape[1:]))
            if tuple(value.shape[1:]) != shape:
                raise ValueError(f"pictures {key!r} of bucket {name}: shape {value.shape[1:]} != {shape}")
            files = self._pictures.setdefault((name, key), [])
            files += [encode_image(picture, self.image_codec, self.image_quality) for picture in value]
        self.counts[name] = self.counts.get(name, 0) + len(records)

    def _write_small(self) -> None:
        """Ids, captions, token states and pictures, each at its exact size (see the class docstring)."""
        dtypes = {"clip_id": STR, "video_id": STR, "row": np.int64, "start_frame": np.int64, "stride": np.int32,
                  "fps": np.float32, "text_index": np.int32}
        for name, fields in self._ids.items():
            group = self.file[f"clips/{name}"]
            for key, values in fields.items():
                data = np.array(values, dtype=object).astype(STR) if dtypes[key] is STR else \
                    np.array(values, dtype=dtypes[key])
                group.create_dataset(key, data=data, dtype=dtypes[key])
        for (name, key), files in self._pictures.items():
            sub = self.file.require_group(f"clips/{name}/images/{key}")
            sub.attrs.update({"codec": self.image_codec, "quality": self.image_quality,
                              "shape": list(self._picture_shapes[(name, key)])})
            sub.create_dataset("data", data=np.frombuffer(b"".join(files), np.uint8))
            sub.create_dataset("offsets", data=np.cumsum([0] + [len(f) for f in files], dtype=np.int64))
        text = self.file.require_group("text")
        text.create_dataset("caption", data=np.array(list(self._captions), dtype=object).astype(STR), dtype=STR)
        if self._states:
            text.create_dataset("states", data=np.concatenate(self._states))
            text.create_dataset("offsets", data=np.cumsum([0] + [len(s) for s in self._states], dtype=np.int64))

    def commit(self) -> int:
        """Close, fsync and rename into place; returns the file size in bytes (field_bytes says where they go)."""
        self._write_small()
        self.file.attrs["num_clips"] = sum(self.counts.values())
        self.file.attrs["buckets"] = json.dumps(self.counts)
        self.field_bytes = field_bytes(self.file)
        self.file.close()
        size = commit(self.tmp, self.path)
        self.field_bytes["hdf5_structure"] = size - sum(self.field_bytes.values())
        return size

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.file.close()
        with contextlib.suppress(OSError):
            self.tmp.unlink()


def field_bytes(f: h5py.File) -> dict[str, int]:
    """Bytes stored per field of a shard (compressed size; strings by their UTF-8 length), grouped as a person
    would ask: latents, text, each picture or extra by name, and the per-clip ids."""
    sizes: dict[str, int] = {}

    def stored(dset: h5py.Dataset) -> int:
        if h5py.check_string_dtype(dset.dtype) is not None:
            return sum(len(v) if isinstance(v, bytes) else len(str(v).encode()) for v in dset[()])
        return int(dset.id.get_storage_size())

    def visit(name: str, obj: Any) -> None:
        if not isinstance(obj, h5py.Dataset):
            return
        parts = name.split("/")
        if parts[0] == "text" or parts[-1] in ("caption", "text_emb", "text_mask", "text_index"):
            key = "text"
        elif parts[-1] == "latents":
            key = "latents"
        elif len(parts) >= 4 and parts[2] in ("images", "extras"):
            key = parts[3]
        else:
            key = "ids"
        sizes[key] = sizes.get(key, 0) + stored(obj)

    f.visititems(visit)
    return sizes


# ---------------------------------------------------------------------------------------------------- reading

def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class _Bucket:
    """One bucket's group, checked: its clip count and the small arrays that locate each clip's caption and
    pictures (a few bytes a clip, kept while the file is open)."""
    group: h5py.Group
    clips: int
    text_rows: Optional[np.ndarray]                                   # (N,) rows of /text; None in format 1
    images: dict[str, tuple[h5py.Dataset, np.ndarray, tuple[int, int, int]]]   # name -> data, offsets (N+1,), shape


class ShardReader:
    """Clips of one shard, of format version 1 or 2, as plain numpy / str values: all in order, or any by index.

        with ShardReader(path) as shard:
            for clip in shard:      # latents, clip_id, video_id, caption, row, start_frame, stride, fps, bucket,
                ...                 # text_states (L, D) float16 when stored, and each picture/extra by name
            two = shard.read("64x64", [7, 2])     # the same dicts for clips 7 and 2: only their bytes are read

    Shapes, dtypes and offsets are checked against each other before anything is returned (ShardFormatError): the
    whole shard by `validate()`, which iteration runs first; a bucket's own fields before `read` first touches it.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as e:
            raise ShardFormatError(f"{self.path}: not a readable HDF5 file ({e})") from None
        version = int(self.file.attrs.get("format_version", -1))
        if self.file.attrs.get("format") != SHARD_FORMAT or version not in READABLE_VERSIONS:
            self.file.close()
            raise ShardFormatError(f"{self.path}: attrs.format: not an hpcvid shard of format version "
                                   f"{' or '.join(map(str, READABLE_VERSIONS))}")
        self.version = version
        self._checked: dict[str, _Bucket] = {}
        self._text = self._read_text() if version >= 2 else None

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.file.close()

    @property
    def buckets(self) -> dict[str, int]:
        return {name: group["latents"].shape[0] for name, group in self.file.get("clips", {}).items()}

    @property
    def latent_shapes(self) -> dict[str, list[int]]:
        """Each bucket's per-clip latent shape (from the dataset's header: nothing is read)."""
        return {name: list(group["latents"].shape[1:]) for name, group in self.file.get("clips", {}).items()}

    def _read_text(self) -> tuple[list[str], Optional[h5py.Dataset], Optional[np.ndarray]]:
        text = self.file.get("text")
        if text is None or "caption" not in text:
            raise ShardFormatError(f"{self.path}: /text/caption: missing")
        captions = [_str(c) for c in text["caption"][()]]
        if "states" not in text:
            return captions, None, None
        offsets = text["offsets"][()]
        if (len(offsets) != len(captions) + 1 or offsets[0] != 0 or np.any(np.diff(offsets) < 0)
                or offsets[-1] != text["states"].shape[0] or text["states"].dtype != np.float16):
            raise ShardFormatError(f"{self.path}: /text/offsets do not fit {len(captions)} captions and states "
                                   f"{text['states'].shape} {text['states'].dtype}")
        return captions, text["states"], offsets

    def _bucket(self, name: str) -> _Bucket:
        """A bucket's datasets checked to agree in length, dtype and offsets (once per open file)."""
        if name in self._checked:
            return self._checked[name]
        group = self.file.get(f"clips/{name}")
        if not isinstance(group, h5py.Group) or "latents" not in group:
            raise ShardFormatError(f"{self.path}: clips/{name}: no such bucket (the shard has "
                                   f"{', '.join(self.buckets) or 'none'})")
        n = group["latents"].shape[0]
        per_clip = ID_FIELDS + (("text_index",) if self.version >= 2 else
                                ("caption",) + tuple(k for k in ("text_emb", "text_mask") if k in group))
        for key in per_clip:
            if key not in group or group[key].shape[0] != n:
                got = group[key].shape[0] if key in group else "no"
                raise ShardFormatError(f"{self.path}: clips/{name}/{key}: {got} entries for {n} clips")
        if "text_emb" in group and group["text_emb"].dtype != np.float16:
            raise ShardFormatError(f"{self.path}: clips/{name}/text_emb: dtype {group['text_emb'].dtype}")
        text_rows, images = None, {}
        if self.version >= 2:
            text_rows = group["text_index"][()]
            if n and (text_rows.min() < 0 or text_rows.max() >= len(self._text[0])):
                raise ShardFormatError(f"{self.path}: clips/{name}/text_index: outside the {len(self._text[0])} "
                                       f"captions of /text")
            for key, sub in group.get("images", {}).items():
                offsets = sub["offsets"][()]
                if (len(offsets) != n + 1 or offsets[0] != 0 or np.any(np.diff(offsets) <= 0)
                        or offsets[-1] != sub["data"].shape[0] or sub.attrs.get("codec") not in IMAGE_CODECS):
                    raise ShardFormatError(f"{self.path}: clips/{name}/images/{key}: offsets or codec do not "
                                           f"fit {n} clips")
                images[key] = (sub["data"], offsets, tuple(int(s) for s in sub.attrs["shape"]))
        for key, dset in group.get("extras", {}).items():
            if dset.shape[0] != n:
                raise ShardFormatError(f"{self.path}: clips/{name}/extras/{key}: {dset.shape[0]} entries for {n} "
                                       f"clips")
        self._checked[name] = _Bucket(group, n, text_rows, images)
        return self._checked[name]

    def validate(self, latent_shapes: Optional[dict[str, list[int]]] = None) -> int:
        """Check every bucket's datasets agree in length, dtype and (optionally) latent shape; returns the clips."""
        total = 0
        for name, shape in self.latent_shapes.items():
            total += self._bucket(name).clips
            expected = (latent_shapes or {}).get(name)
            if expected and shape != list(expected):
                raise ShardFormatError(f"{self.path}: clips/{name}/latents: shape {shape}, expected {list(expected)}")
        if total != int(self.file.attrs.get("num_clips", -1)):
            raise ShardFormatError(f"{self.path}: attrs.num_clips: {self.file.attrs.get('num_clips')} but {total} "
                                   f"clips stored")
        return total

    def ids(self, bucket: str, names: Sequence[str] = ID_FIELDS) -> dict[str, np.ndarray]:
        """Per-clip id fields of one bucket whole (strings as str): what indexing a dataset needs, without reading
        a latent."""
        unknown = [key for key in names if key not in ID_FIELDS]
        if unknown:
            raise ValueError(f"ids: {unknown} are not id fields; choose from {ID_FIELDS}")
        group = self._bucket(bucket).group
        return {key: group[key].asstr()[()] if key in ("clip_id", "video_id") else group[key][()] for key in names}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Every clip, bucket by bucket in stored order, read a block of about CHUNK_BYTES of latents at a time."""
        self.validate()
        for name, n in self.buckets.items():
            latents = self.file[f"clips/{name}/latents"]
            block = max(1, CHUNK_BYTES // max(1, int(np.prod(latents.shape[1:])) * latents.dtype.itemsize))
            for start in range(0, n, block):
                yield from self.read(name, range(start, min(n, start + block)))

    def read(self, bucket: str, indices: Sequence[int]) -> list[dict[str, Any]]:
        """The clips at `indices` of one bucket (any order, repeats allowed), as iteration gives them: only their
        rows of each dataset are read (HDF5 reads just the chunks that hold them) and only their pictures decoded."""
        checked = self._bucket(bucket)
        wanted = np.asarray(indices, dtype=np.int64).reshape(-1)
        if wanted.size == 0:
            return []
        if wanted.min() < 0 or wanted.max() >= checked.clips:
            raise IndexError(f"{self.path}: clips/{bucket}: clip indices must lie in [0, {checked.clips}), got "
                             f"{int(wanted.min())}..{int(wanted.max())}")
        unique, position = np.unique(wanted, return_inverse=True)   # h5py reads increasing indices
        contiguous = int(unique[-1] - unique[0]) + 1 == len(unique)
        rows = slice(int(unique[0]), int(unique[-1]) + 1) if contiguous else unique
        group = checked.group
        values = {key: group[key][rows] for key in ID_FIELDS + ("latents",)}
        extras = {key: dset[rows] for key, dset in group.get("extras", {}).items()}
        texts = self._texts(checked, unique, rows)
        clips = []
        for j, i in enumerate(unique.tolist()):
            clip = {key: values[key][j] for key in values}
            for key in ("clip_id", "video_id"):
                clip[key] = _str(clip[key])
            clip["bucket"] = bucket
            clip.update(texts[j])
            for key, (data, offsets, shape) in checked.images.items():
                clip[key] = decode_image(data[offsets[i]:offsets[i + 1]].tobytes(), shape,
                                         f"{self.path}:clips/{bucket}/images/{key}[{i}]")
            for key, value in extras.items():
                clip[key] = value[j]
            clips.append(clip)
        return [dict(clips[p]) for p in position.tolist()]

    def _texts(self, checked: _Bucket, unique: np.ndarray, rows: Any) -> list[dict[str, Any]]:
        """Each clip's caption and, when stored, its unpadded token states (L, D) float16 (clips of one caption
        share one array)."""
        group = checked.group
        if checked.text_rows is None:       # version 1: per clip, padded with a mask
            captions = [_str(c) for c in group["caption"][rows]]
            if "text_emb" not in group:
                return [{"caption": c} for c in captions]
            states, mask = group["text_emb"][rows], group["text_mask"][rows]       # (n, L, D), (n, L)
            return [{"caption": c, "text_states": s[m]} for c, s, m in zip(captions, states, mask)]
        captions, states, offsets = self._text
        by_row: dict[int, dict[str, Any]] = {}
        for k in checked.text_rows[unique].tolist():
            if k not in by_row:
                by_row[k] = {"caption": captions[k]}
                if states is not None:
                    by_row[k]["text_states"] = states[offsets[k]:offsets[k + 1]]   # (L_k, D)
        return [by_row[k] for k in checked.text_rows[unique].tolist()]
