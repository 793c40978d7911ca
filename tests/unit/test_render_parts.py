"""The render stage's bookkeeping without models: prompt files, the rank plan, ranges on disk, sliding windows, the
packet-copy join."""
import json

import numpy as np
import pytest

from hpcvid.config import UserError
from hpcvid.data.prompts import PromptError, VideoRequest, read_prompts, slug
from hpcvid.data.video import join_mp4, write_mp4
from hpcvid.stages.render import slide
from hpcvid.stages.render_plan import Plan, RangeStore


def test_text_and_jsonl_prompt_files(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    text = tmp_path / "p.txt"
    text.write_text('a "quoted" prompt: yes\n\n  ünïcode 🎬\n', encoding="utf-8")
    assert [r.prompts for r in read_prompts(text)] == [('a "quoted" prompt: yes',), ("  ünïcode 🎬",)]
    lines = [json.dumps("two\nlines"), json.dumps({"segments": ["a", "b", "c"], "image": "a.png", "seed": 4}),
             json.dumps({"prompt": "x", "name": "mine"})]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    first, story, named = read_prompts(jsonl)
    assert first.prompts == ("two\nlines",) and first.name == "0000-two-lines"
    assert story.image == str(tmp_path / "a.png") and story.seed == 4 and named.name == "mine"
    assert [story.prompt_of(c, 9) for c in range(9)] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert slug("$(rm -rf ~) ; A/B") == "rm-rf-a-b" and slug("!!!") == "video"


@pytest.mark.parametrize("line, message", [
    ("{not json", "not JSON"),
    ('{"prompt": "a", "segments": ["b"]}', 'exactly one of "prompt" and "segments"'),
    ('{"segments": []}', "non-empty strings"),
    ('{"prompt": "a", "name": "../up"}', '"name" must be'),
    ('{"prompt": "a", "image": "missing.png"}', "is not a file"),
    ('{"prompt": "a", "seed": -1}', '"seed" must be'),
    ('[1, 2]', "expected a prompt string or an object"),
])
def test_prompt_file_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "p.jsonl"
    path.write_text('"fine"\n' + line + "\n")
    with pytest.raises(PromptError, match=f"^{path} line 2: .*{message}"):
        read_prompts(path)


def test_duplicate_names_and_empty_files(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "name": "v"}\n{"prompt": "b", "name": "v"}\n')
    with pytest.raises(PromptError, match="entries 1 and 2 are both named 'v'"):
        read_prompts(path)
    path.write_text("\n\n")
    with pytest.raises(PromptError, match="no prompts"):
        read_prompts(path)
    assert VideoRequest("n", ("only",)).prompt_of(5, 6) == 0


def test_plan_units_runs_and_segments():
    plan = Plan.make(clips=37, windows=[2, 4], segment_clips=8, world=3)
    assert plan.unit == 8 and plan.runs == ((0, 16), (16, 32), (32, 40)) and plan.padded == 40
    assert plan.segments(2) == [(32, 37)]                     # cut at the video's end, padding has none
    assert plan.segments()[:2] == [(0, 8), (8, 16)] and len(plan.segments()) == 5
    with pytest.raises(UserError, match="use at most 2 ranks"):
        Plan.make(clips=9, windows=[2], segment_clips=8, world=3)


def test_ranges_written_by_one_layout_are_read_by_another(tmp_path):
    store = RangeStore(tmp_path / "k", (2,))
    data = np.arange(20, dtype=np.float32).reshape(10, 2)
    store.write(0, data[:6])                                  # an earlier run with 2 ranks
    assert not store.covers(0, 10) and store.covers(2, 6)
    store.write(6, data[6:])
    assert store.covers(0, 10) and np.array_equal(store.read(3, 9), data[3:9])
    store.clear(5, 7)                                         # both files overlap [5, 7)
    assert not store.covers(0, 1)
    np.save(tmp_path / "k" / "000000-000004.npy", np.zeros((4, 3), np.float32))
    with pytest.raises(UserError, match="expected float32 \\(4, 2\\)"):
        store.read(0, 4)
    with pytest.raises(ValueError, match="expected float32"):
        store.write(0, np.zeros((2, 2), np.float64))


def test_slide_covers_everything_with_the_overlap():
    calls = []
    slide(10, 4, 1, lambda start, known: calls.append((start, known)))
    assert calls == [(0, 0), (3, 1), (6, 1)]
    calls.clear()
    slide(9, 4, 1, lambda start, known: calls.append((start, known)))
    assert calls == [(0, 0), (3, 1), (5, 2)]                  # the last window ends at the end


def test_join_copies_packets_and_refuses_another_encoding(tmp_path):
    frames = [np.full((12, 32, 32, 3), 40 * i, np.uint8) for i in range(3)]
    parts = [tmp_path / f"{i}.mp4" for i in range(3)]
    for part, f in zip(parts, frames):
        write_mp4(part, f, 8.0)
    assert join_mp4(parts, tmp_path / "all.mp4") == 36
    import av

    with av.open(str(tmp_path / "all.mp4")) as container:
        got = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(got) == 36 and abs(int(got[30].mean()) - 80) <= 2
    write_mp4(tmp_path / "big.mp4", np.zeros((4, 64, 64, 3), np.uint8), 8.0)
    with pytest.raises(ValueError, match="big.mp4 was encoded differently"):
        join_mp4([parts[0], tmp_path / "big.mp4"], tmp_path / "bad.mp4")
    assert not (tmp_path / "bad.mp4").exists()
