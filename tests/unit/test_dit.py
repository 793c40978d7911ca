"""The video DiT family (keyframe and motion models): shapes at every pyramid factor, adaLN-zero, conditioning on
t / text / mask / content frames, the replaceable temporal attention, positions, gradients, paper sizes, checks.

Tiny presets run on the CPU; paper presets are built on the meta device (no memory, no compute). The untrained
model outputs exactly zero, so tests that look at what the output depends on perturb every weight first.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import re

import pytest
import torch
from torch import nn

from hpcvid.models import layers
from hpcvid.models.dit import (DIT_PRESETS, DiT, DiTConfig, MotionCond, grid_coords, pos_embed, token_coords)

B, L = 2, 6                       # batch, text tokens
PIXELS = 32                       # keyframe-tiny frames (patch 4: 8x8 tokens at full resolution, 2x2 at 1/4)
LATENT, CONTENT = 8, 64           # motion-tiny: 8x8 latent cells of 64x64 content frames (s = 8), the tiny Reducio's
SMALL = 4                         # a 4x4 latent of 32x32 frames: the same code at a quarter of the cost


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed))


@functools.lru_cache(maxsize=None)
def _built(kind: str, perturb: bool) -> DiT:
    torch.manual_seed(0)
    model = DiT(DIT_PRESETS[f"{kind}-tiny"]).eval()
    if perturb:
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.add_(0.05 * randn(*p.shape, seed=1000 + i))
    return model


def tiny(kind: str, perturb: bool = True) -> DiT:
    """A fresh copy of a tiny model (built once per file); perturb: noise added to every weight, so the
    zero-initialised layers pass signals on."""
    return copy.deepcopy(_built(kind, perturb))


def text_inputs(seed: int = 1, valid: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.zeros(B, L, dtype=torch.bool)
    mask[:, :valid] = True
    return randn(B, L, 384, seed=seed), mask


def inputs(kind: str, k: int = 2, factor: int = 1, seed: int = 0, latent: int = SMALL) -> dict:
    """Keyword arguments of one forward: k frames (keyframe) or k clips (motion, `latent` x `latent` cells at full
    resolution), at pyramid factor `factor`."""
    text, mask = text_inputs()
    t = torch.rand(B, generator=gen(seed + 7))
    if kind == "keyframe":
        x, cond = randn(B, 3, k, PIXELS // factor, PIXELS // factor, seed=seed), None
    else:
        px = latent * CONTENT // LATENT
        x = randn(B, 16, 4 * k, latent // factor, latent // factor, seed=seed)
        cond = MotionCond(randn(B, 3, k, px, px, seed=seed + 1), randn(B, 3, px, px, seed=seed + 2))
    return dict(x=x, t=t, text=text, text_mask=mask, cond=cond, spatial_factor=factor)


def run(model: DiT, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(**kw)


def differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a - b).abs().max().item() > 1e-4


class Zeros(nn.Module):
    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(h)


class Recorder(nn.Module):
    """Wraps a temporal module, records the shapes it is called with, and returns what it returns."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.shapes = inner, []

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(h.shape))
        return self.inner(h)


# ---------------------------------------------------------------------------------------------------- shapes, init

@pytest.mark.parametrize("kind", ["keyframe", "motion"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("factor", [1, 2, 4])
def test_output_has_the_input_shape(kind, k, factor):
    model = tiny(kind)
    kw = inputs(kind, k, factor, latent=LATENT)
    v = run(model, **kw)
    assert v.shape == kw["x"].shape and v.dtype == kw["x"].dtype
    assert torch.isfinite(v).all() and v.abs().max() > 0


@pytest.mark.parametrize("kind", ["keyframe", "motion"])
def test_untrained_model_outputs_exactly_zero_until_the_final_layer_moves(kind):
    model = tiny(kind, perturb=False)
    kw = inputs(kind, 2)
    assert torch.equal(run(model, **kw), torch.zeros_like(kw["x"]))               # adaLN-zero + zero final layer
    with torch.no_grad():
        model.final.linear.weight.normal_(0, 0.02, generator=gen(3))
    assert run(model, **kw).abs().max() > 1e-3


def test_tiny_presets_are_small_undropped_and_expose_their_blocks():
    for kind in ("keyframe", "motion"):
        model = tiny(kind, perturb=False)
        print(f"{kind}-tiny params: {model.num_params():,}")
        assert 2e5 < model.num_params() < 2e6
        assert not any(isinstance(m, nn.Dropout) for m in model.modules())
        assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) == model.config.depth
        assert model.sharding_units() == list(model.blocks)


# ---------------------------------------------------------------------------------------------------- conditioning

@pytest.mark.parametrize("kind", ["keyframe", "motion"])
def test_output_depends_on_t_and_text_but_not_on_masked_tokens(kind):
    model = tiny(kind)
    kw = inputs(kind, 2)
    base = run(model, **kw)
    assert differs(run(model, **{**kw, "t": kw["t"] + 0.1}), base)
    text = kw["text"].clone()
    text[:, 1] += 1.0                                                   # a real token
    assert differs(run(model, **{**kw, "text": text}), base)
    text = kw["text"].clone()
    text[:, -1] = randn(B, 384, seed=9) * 100                           # a masked token: changes nothing at all
    assert torch.equal(run(model, **{**kw, "text": text}), base)
    mask = kw["text_mask"].clone()
    mask[:, -1] = True                                                  # the same token, now unmasked
    assert differs(run(model, **{**kw, "text": text, "text_mask": mask}), base)


@pytest.mark.parametrize("kind", ["keyframe", "motion"])
def test_fully_masked_text_attends_to_the_null_token(kind):
    model = tiny(kind)
    kw = inputs(kind, 2)
    empty = torch.zeros_like(kw["text_mask"])
    v = run(model, **{**kw, "text_mask": empty})
    assert torch.isfinite(v).all()
    assert differs(v, run(model, **kw))                                 # dropping the text changes the velocity
    assert torch.equal(v, run(model, **{**kw, "text": randn(B, L, 384, seed=5), "text_mask": empty}))


def test_motion_model_reads_each_clips_content_frame_and_the_next_clips():
    """With temporal attention off, clip k's output depends on its own frame and the next one (k+1, or next_frame
    for the last clip), and on no other."""
    model = tiny("motion")
    model.replace_temporal_attention(lambda name, old: Zeros())
    kw = inputs("motion", 3)
    base = run(model, **kw)
    by_clip = lambda v: v.view(B, 16, 3, 4, SMALL, SMALL).transpose(1, 2)   # (B, K, C, T', h, w)

    def changed(cond: MotionCond) -> list[bool]:
        v = by_clip(run(model, **{**kw, "cond": cond}))
        return [differs(v[:, k], by_clip(base)[:, k]) for k in range(3)]

    frames = kw["cond"].frames.clone()
    frames[:, :, 2] += 0.5                                              # clip 2's frame: clip 2 (own), clip 1 (next)
    assert changed(dataclasses.replace(kw["cond"], frames=frames)) == [False, True, True]
    frames = kw["cond"].frames.clone()
    frames[:, :, 0] += 0.5                                              # clip 0's frame: only clip 0
    assert changed(dataclasses.replace(kw["cond"], frames=frames)) == [True, False, False]
    nxt = kw["cond"].next_frame + 0.5                                   # the clip after the window: the last clip
    assert changed(dataclasses.replace(kw["cond"], next_frame=nxt)) == [False, False, True]
    no_next = MotionCond(kw["cond"].frames)                             # last clip of the video: zeros and flag 0
    assert changed(no_next) == [False, False, True]
    flagged_off = MotionCond(kw["cond"].frames, nxt, torch.zeros(B, dtype=torch.bool))
    assert torch.equal(run(model, **{**kw, "cond": flagged_off}), run(model, **{**kw, "cond": no_next}))
    # temporal attention back on: the content of one clip reaches the other clips
    model = tiny("motion")
    frames = kw["cond"].frames.clone()
    frames[:, :, 2] += 0.5
    v = by_clip(run(model, **{**kw, "cond": dataclasses.replace(kw["cond"], frames=frames)}))
    assert differs(v[:, 0], by_clip(run(model, **kw))[:, 0])


# ---------------------------------------------------------------------------------------------------- temporal path

@pytest.mark.parametrize("kind", ["keyframe", "motion"])
def test_temporal_attention_connects_frames_and_can_be_replaced(kind):
    model = tiny(kind)
    kw = inputs(kind, 3)
    x2 = kw["x"].clone()
    x2[:, :, 0] += 1.0                                                  # change frame 0 only
    last = kw["x"].shape[2] - 1
    base = run(model, **kw)
    assert differs(run(model, **{**kw, "x": x2})[:, :, last], base[:, :, last])   # it reaches the last frame

    names = [name for name, _ in model.temporal_attention_modules()]
    assert names == [f"blocks.{i}.temporal" for i in range(model.config.depth)]
    model.replace_temporal_attention(lambda name, old: Recorder(old))
    assert torch.equal(run(model, **kw), base)                          # a pass-through wrapper changes nothing ...
    T, S = kw["x"].shape[2], (kw["x"].shape[3] // model.config.patch_size) ** 2
    for name, module in model.temporal_attention_modules():
        assert isinstance(module, Recorder) and model.get_submodule(name) is module
        assert module.shapes == [(B * S, T, model.config.width)]        # ... and is what ran: (B h w, T, C), once

    model.replace_temporal_attention(lambda name, old: Zeros())
    independent = run(model, **kw)
    assert differs(independent, base)
    assert torch.equal(run(model, **{**kw, "x": x2})[:, :, 1:], independent[:, :, 1:])   # frames now independent


def test_a_temporal_module_of_the_wrong_shape_is_named():
    model = tiny("keyframe")
    model.replace_temporal_attention(lambda name, old: nn.Identity() if name != "blocks.1.temporal" else
                                     type("Half", (nn.Module,), {"forward": lambda self, h: h[:, :1]})())
    with pytest.raises(ValueError, match=r"temporal module must map \(B\*h\*w, T, C\) = \(128, 2, 128\).*Half"):
        run(model, **inputs("keyframe", 2))


# ---------------------------------------------------------------------------------------------------- positions

def test_coarse_tokens_sit_at_the_mean_of_the_full_resolution_tokens_they_cover():
    full = grid_coords(2, 8, 8).view(2, 8, 8, 3)                        # (T, y, x, (t, y, x))
    assert torch.equal(full[1, 3, 5], torch.tensor([1.0, 3.0, 5.0]))    # full resolution: integer token indices
    for factor in (2, 4):
        coarse = grid_coords(2, 8 // factor, 8 // factor, factor).view(2, 8 // factor, 8 // factor, 3)
        blocks = full.view(2, 8 // factor, factor, 8 // factor, factor, 3).mean(dim=(2, 4))
        assert torch.allclose(coarse, blocks)                           # the 2x2 (4x4) block's mean coordinate
    assert torch.equal(token_coords(2, 2), torch.tensor([0.5, 2.5]))    # centre of full tokens {0, 1} and {2, 3}
    assert torch.allclose(token_coords(2, 4), token_coords(4, 2).view(2, 2).mean(1))   # consistent across stages
    # the embedding is the sin-cos of those coordinates; at factor 1 it is layers.pos_embed_3d exactly
    assert torch.equal(pos_embed(3, 4, 4, 96), layers.pos_embed_3d(3, 4, 4, 96))
    coarse = pos_embed(1, 2, 2, 96, factor=2).view(2, 2, 96)
    dt, dh, dw = layers.pos_embed_3d_dims(96)
    centre_y = layers.sinusoidal_embedding(torch.tensor([2.5]), dh)[0]  # y of coarse row 1 = mean of rows 2 and 3
    assert torch.allclose(coarse[1, 0, dt:dt + dh], centre_y)


def test_the_forward_places_tokens_by_the_spatial_factor():
    """The same keyframe input read as a full-resolution image or as the 1/2 stage of a larger one: only the token
    positions differ, and so does the output."""
    model = tiny("keyframe")
    kw = inputs("keyframe", 1, factor=2)
    assert differs(run(model, **kw), run(model, **{**kw, "spatial_factor": 1}))


# ---------------------------------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("kind", ["keyframe", "motion"])
def test_gradients_reach_every_parameter(kind):
    model = tiny(kind).train()
    kw = inputs(kind, 2)
    if kind == "motion":                                                 # one sample with a next clip, one without
        kw["cond"] = dataclasses.replace(kw["cond"], has_next=torch.tensor([True, False]))
    model(**kw).square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"


def test_recomputing_blocks_runs_each_block_twice_and_gives_the_same_gradients():
    """Activation checkpointing: every block's forward runs again in backward; names, output and gradients stay."""
    grads, calls = {}, {}
    for recompute in (False, True):
        model = tiny("motion").train()
        model.recompute_blocks = recompute
        count = [0]
        # pre-hooks: the recomputation stops once it has what backward needs, before forward hooks would fire
        for block in model.blocks:
            block.register_forward_pre_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        model(**inputs("motion", 2)).square().mean().backward()
        grads[recompute] = {name: p.grad for name, p in model.named_parameters()}
        calls[recompute] = count[0]
    depth = len(model.blocks)
    assert (calls[False], calls[True]) == (depth, 2 * depth)
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------------- paper sizes

@pytest.mark.parametrize("kind, shape, cond_shape, tokens", [
    ("keyframe", (1, 3, 4, 256, 256), None, 4 * 1024),                      # 4 keyframes of 256x256, patch 8
    ("motion", (1, 16, 16, 8, 8), (1, 3, 4, 256, 256), 4 * 256),            # 4 clips of 16x256x256, patch 1
])
def test_paper_presets_build_on_meta_with_sane_sizes(kind, shape, cond_shape, tokens):
    with torch.device("meta"):
        model = DiT(DIT_PRESETS[f"{kind}-paper"])
        cond = None if cond_shape is None else MotionCond(torch.empty(cond_shape), torch.empty(cond_shape[:2] +
                                                                                             cond_shape[3:]))
        v = model(torch.empty(shape), torch.empty(1), torch.empty(1, 64, 384), torch.ones(1, 64, dtype=torch.bool),
                  cond)
    per_stage = [model.num_tokens(shape[2], shape[3] // f, shape[4] // f) for f in (1, 2, 4)]
    print(f"{kind}-paper params: {model.num_params():,}; tokens per stage (1, 1/2, 1/4): {per_stage}")
    assert v.shape == shape and v.is_meta
    assert 0.9e9 < model.num_params() < 1.3e9
    assert per_stage[0] == tokens and per_stage == [tokens, tokens // 4, tokens // 16]


# ---------------------------------------------------------------------------------------------------- checks

def test_bad_inputs_raise_value_errors_naming_the_shape():
    key, mot = tiny("keyframe", perturb=False), tiny("motion", perturb=False)
    kw = inputs("keyframe", 2)
    bad = [({"x": torch.zeros(B, 3, 2, 30, 32)}, "(2, 3, 2, 30, 32)"),           # not divisible by the patch
           ({"x": torch.zeros(B, 4, 2, 32, 32)}, "(2, 4, 2, 32, 32)"),           # wrong channels
           ({"x": torch.zeros(B, 3, 32, 32)}, "(2, 3, 32, 32)"),                 # no time axis
           ({"t": torch.zeros(B, 1)}, "(2, 1)"),
           ({"text": torch.zeros(B, L, 100)}, "(2, 6, 100)"),
           ({"text_mask": torch.ones(B, L)}, "(2, 6)"),                          # not bool
           ({"text_mask": torch.ones(B, L + 1, dtype=torch.bool)}, "(2, 7)"),
           ({"spatial_factor": 3}, "3"),
           ({"cond": MotionCond(torch.zeros(B, 3, 2, 64, 64))}, "takes no cond")]
    for change, words in bad:
        with pytest.raises(ValueError, match=re.escape(words)):
            key(**{**kw, **change})
    kw = inputs("motion", 2, latent=LATENT)
    frames = kw["cond"].frames
    bad = [({"x": torch.zeros(B, 16, 6, 8, 8)}, "(2, 16, 6, 8, 8)"),             # T not a multiple of T' = 4
           ({"cond": None}, "MotionCond"),
           ({"cond": MotionCond(frames[..., :32, :32])}, "(2, 3, 2, 32, 32)"),   # content not at full resolution
           ({"cond": MotionCond(frames[:, :, :1])}, "(2, 3, 1, 64, 64)"),        # one content frame for two clips
           ({"cond": MotionCond(frames, torch.zeros(B, 3, 32, 32))}, "(2, 3, 32, 32)"),
           ({"cond": MotionCond(frames, has_next=torch.ones(B, dtype=torch.bool))}, "has_next"),
           ({"spatial_factor": 2}, "(2, 3, 2, 128, 128)")]                       # x is then the 1/2 stage of 16x16
    for change, words in bad:
        with pytest.raises(ValueError, match=re.escape(words)):
            mot(**{**kw, **change})


@pytest.mark.parametrize("change, words", [
    ({"kind": "image"}, "kind"), ({"width": 100, "heads": 3}, "divisible by heads"), ({"depth": 0}, "depth"),
    ({"patch_size": 2.0}, "patch_size"), ({"mlp_ratio": 0}, "mlp_ratio"),
])
def test_config_rejects_bad_values(change, words):
    with pytest.raises(ValueError, match=words):
        DiTConfig(**change)
