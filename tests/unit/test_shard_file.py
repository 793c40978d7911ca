"""hpcvid.data.shard_file: format 2 written and read back exactly, format 1 still read, damage refused in one line."""
from __future__ import annotations

import io

import h5py
import numpy as np
import pytest

from hpcvid.data.shard_file import (ClipRecord, ShardFormatError, ShardReader, ShardWriter, decode_image,
                                    encode_image, field_bytes)

RNG = np.random.default_rng(0)


def picture(seed: int, h: int = 32, w: int = 48) -> np.ndarray:
    """A smooth picture (codec friendly) that differs by seed: uint8 (3, H, W)."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([(x * 5 + seed * 40) % 256, (y * 7 + seed * 11) % 256, (x + y + seed) % 256]).astype(np.uint8)


def write_v2(path, captions=("a cat", "a cat", "a dog"), with_states=True, codec="png"):
    writer = ShardWriter(path, {"shard": 0}, image_codec=codec)
    records, rows, states = [], [], {}
    for i, caption in enumerate(captions):
        if writer.caption_row(caption) is None:
            states[caption] = RNG.standard_normal((3 + len(caption), 8)).astype(np.float16) if with_states else None
            writer.add_caption(caption, states[caption])
        records.append(ClipRecord(f"v{i}", caption, i, 10 * i, 2, 12.5))
        rows.append(writer.caption_row(caption))
    latents = RNG.standard_normal((len(captions), 4, 2, 2, 3)).astype(np.float16)
    pictures = np.stack([picture(i) for i in range(len(captions))])
    writer.add((32, 48), latents, records, rows, images={"content": pictures})
    size = writer.commit()
    return size, writer.field_bytes, latents, pictures, states


def test_format_2_round_trip(tmp_path):
    path = tmp_path / "s.h5"
    size, sizes, latents, pictures, states = write_v2(path)
    assert sum(sizes.values()) == size == path.stat().st_size                   # every byte accounted for
    with ShardReader(path) as shard:
        assert shard.version == 2 and shard.buckets == {"32x48": 3}
        assert shard.validate({"32x48": [4, 2, 2, 3]}) == 3
        clips = list(shard)
    assert [c["clip_id"] for c in clips] == ["v0@0", "v1@10", "v2@20"]
    for i, c in enumerate(clips):
        assert np.array_equal(c["latents"], latents[i]) and np.array_equal(c["content"], pictures[i])   # PNG: exact
        assert c["caption"] == ("a cat", "a cat", "a dog")[i] and c["fps"] == np.float32(12.5)
        assert np.array_equal(c["text_states"], states[c["caption"]])            # unpadded, as given
    with h5py.File(path) as f:                                                   # the shared caption once
        assert len(f["text/caption"]) == 2 and f["text/states"].shape == (sum(len(s) for s in states.values()), 8)


def test_webp_is_smaller_on_real_frames_and_close(sample_videos):
    """A real camera frame (the bikes sample, 640x272): WebP q95 is the lossy option for a reason."""
    from hpcvid.data.video import VideoReader

    with VideoReader(sample_videos["bikes"]) as r:
        frame = np.ascontiguousarray(r.get_frames([100])[0].transpose(2, 0, 1))     # (3, 272, 640)
    png, webp = encode_image(frame, "png", 95), encode_image(frame, "webp", 95)
    assert len(webp) < len(png) / 2
    back = decode_image(webp, frame.shape, "here")
    mse = ((back.astype(float) - frame.astype(float)) ** 2).mean()
    assert 10 * np.log10(255 ** 2 / mse) > 35                                     # dB
    assert np.array_equal(decode_image(png, frame.shape, "here"), frame)          # PNG: exact


def test_without_text_encoder_captions_are_still_stored(tmp_path):
    write_v2(tmp_path / "s.h5", with_states=False)
    with ShardReader(tmp_path / "s.h5") as shard:
        clips = list(shard)
    assert [c["caption"] for c in clips] == ["a cat", "a cat", "a dog"] and "text_states" not in clips[0]


def test_captions_with_and_without_states_in_one_shard_are_refused(tmp_path):
    writer = ShardWriter(tmp_path / "s.h5", {})
    writer.add_caption("a", np.zeros((2, 4), np.float16))
    with pytest.raises(ValueError, match="with and without"):
        writer.add_caption("b")
    writer.abort()
    assert list(tmp_path.iterdir()) == []                                        # nothing left behind


def write_v1(path, bucket: str, fields: dict, pictures: dict) -> None:
    """A format-1 shard laid out as docs/shard_format.md describes it, written with h5py alone: the per-clip
    `fields` of one bucket (lists of str become utf-8 strings) and pictures as raw uint8 in extras/<name>."""
    with h5py.File(path, "w") as f:
        f.attrs.update({"format": "hpcvid-shard", "format_version": 1, "num_clips": len(fields["latents"])})
        g = f.create_group(f"clips/{bucket}")
        for key, values in fields.items():
            if isinstance(values[0], str):
                g.create_dataset(key, data=np.array(values, dtype=object).astype(h5py.string_dtype()))
            else:
                g.create_dataset(key, data=values)
        for key, values in pictures.items():
            g.create_dataset(f"extras/{key}", data=values)


def test_format_1_is_still_read(tmp_path):
    path = tmp_path / "old.h5"
    n, L, D = 2, 5, 8
    emb = RNG.standard_normal((n, L, D)).astype(np.float16)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], bool)
    emb[~mask] = 0
    fields = {"latents": np.arange(n * 6, dtype=np.float16).reshape(n, 6), "clip_id": ["a@0", "b@3"],
              "video_id": ["a", "b"], "caption": ["x", "y"], "text_emb": emb, "text_mask": mask}
    fields |= {key: np.arange(n, dtype=dtype) for key, dtype in (("row", np.int64), ("start_frame", np.int64),
                                                                  ("stride", np.int32), ("fps", np.float32))}
    write_v1(path, "32x48", fields, {"content": np.stack([picture(0), picture(1)])})
    with ShardReader(path) as shard:
        assert shard.version == 1
        clips = list(shard)
        again = shard.read("32x48", [1, 0, 1])
    assert [c["caption"] for c in clips] == ["x", "y"]
    assert clips[0]["text_states"].shape == (3, D) and clips[1]["text_states"].shape == (2, D)
    assert np.array_equal(clips[1]["content"], picture(1))
    assert [c["clip_id"] for c in again] == ["b@3", "a@0", "b@3"]
    assert np.array_equal(again[0]["text_states"], clips[1]["text_states"])


def test_read_by_index_gives_what_iteration_gives(tmp_path):
    """Any order, repeats, a gap: the same dicts as iteration, read without the rest of the bucket."""
    path = tmp_path / "s.h5"
    write_v2(path, captions=("a cat", "a dog", "a cat", "a bird", "a dog"))
    with ShardReader(path) as shard:
        every = list(shard)
        picked = shard.read("32x48", [4, 0, 2, 4])
        assert shard.read("32x48", []) == []
        assert shard.ids("32x48", ("video_id", "start_frame"))["video_id"].tolist() == [f"v{i}" for i in range(5)]
        with pytest.raises(IndexError, match=r"\[0, 5\)"):
            shard.read("32x48", [5])
        with pytest.raises(ShardFormatError, match="no such bucket"):
            shard.read("64x64", [0])
    for got, i in zip(picked, [4, 0, 2, 4]):
        want = every[i]
        assert set(got) == set(want)
        for key, value in want.items():
            assert np.array_equal(got[key], value) if isinstance(value, np.ndarray) else got[key] == value, key
    assert picked[0] is not picked[3]                                             # a repeat is its own dict


@pytest.mark.parametrize("damage", ["offsets", "text_index", "picture_bytes", "num_clips", "format"])
def test_damaged_shards_are_one_line_errors(tmp_path, damage):
    path = tmp_path / "s.h5"
    write_v2(path)
    with h5py.File(path, "r+") as f:
        g = f["clips/32x48"]
        if damage == "offsets":
            f["text/offsets"][-1] = 999
        elif damage == "text_index":
            g["text_index"][0] = 7
        elif damage == "picture_bytes":
            data = g["images/content/data"]
            data[: data.shape[0] // 2] = 0                                        # the first PNG file destroyed
        elif damage == "num_clips":
            f.attrs["num_clips"] = 4
        else:
            f.attrs["format_version"] = 9
    with pytest.raises(ShardFormatError) as err:
        with ShardReader(path) as shard:
            list(shard)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_picture_of_another_size_is_refused_before_decoding():
    data = encode_image(picture(0, 64, 64), "png", 95)
    with pytest.raises(ShardFormatError, match="64x64"):
        decode_image(data, (3, 32, 48), "here")
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (48, 32)).save(buf, format="PNG")                             # grey, not RGB
    with pytest.raises(ShardFormatError, match="L 32x48"):
        decode_image(buf.getvalue(), (3, 32, 48), "here")


def test_field_bytes_name_the_fields(tmp_path):
    write_v2(tmp_path / "s.h5")
    with h5py.File(tmp_path / "s.h5") as f:
        sizes = field_bytes(f)
    assert set(sizes) == {"latents", "text", "content", "ids"}
    assert sizes["latents"] == 3 * 4 * 2 * 2 * 3 * 2                             # float16, uncompressed
