"""The video autoencoders (Reducio-VAE, CMD) and their shared layers: shapes, sizes, gradients, conditioning, tiling.

Paper-size models are built on the meta device (no memory, no compute); tiny ones run on small clips on the CPU.
"""
from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
import torch.nn.functional as F

from hpcvid.models import layers
from hpcvid.models.cmd import CMD_PRESETS, CMDAutoencoder, CMDConfig
from hpcvid.models.reducio import REDUCIO_PRESETS, ReducioVAE, run_tiled

# small clips keep this file fast: tiny Reducio needs T % 4 == 0 and H, W % 8 == 0; tiny CMD H, W % 8 == 0
CLIP = (2, 3, 8, 32, 32)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def clip(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*(shape or CLIP), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def tiny_reducio(seed: int = 0) -> ReducioVAE:
    torch.manual_seed(seed)
    return ReducioVAE(REDUCIO_PRESETS["tiny"])


def tiny_cmd(seed: int = 0) -> CMDAutoencoder:
    torch.manual_seed(seed)
    return CMDAutoencoder(CMD_PRESETS["tiny"])


# ---------------------------------------------------------------------------------------------------- paper sizes

def test_reducio_paper_latent_shape_and_size():
    with torch.device("meta"):
        model = ReducioVAE(REDUCIO_PRESETS["paper"])
        mean, logvar = model.encode(torch.empty(1, 3, 16, 256, 256))
        recon = model.decode(model.sample(mean, logvar), torch.empty(1, 3, 256, 256))
    shape = model.latent_shape(16, 256, 256)
    assert shape == (16, 4, 8, 8) == tuple(mean.shape[1:]) == tuple(logvar.shape[1:])
    assert 16 * 256 * 256 // math.prod(shape[1:]) == 4096          # METHODS.md §1: 4096x fewer positions
    assert recon.shape == (1, 3, 16, 256, 256)
    counts = {name: n_params(getattr(model, name)) for name in ("encoder", "content_encoder", "decoder")}
    print(f"Reducio paper params: {counts}, total {n_params(model):,}")
    assert 100e6 < n_params(model) < 400e6


def test_cmd_paper_latent_shapes_and_size():
    with torch.device("meta"):
        model = CMDAutoencoder(CMD_PRESETS["paper"])
        content, z_x, z_y = model.encode(torch.empty(1, 3, 16, 256, 256))
    shapes = model.latent_shapes(16, 256, 256)
    assert shapes == {"content": (3, 256, 256), "z_x": (8, 16, 128), "z_y": (8, 16, 128)}
    assert (tuple(content.shape[1:]), tuple(z_x.shape[1:]), tuple(z_y.shape[1:])) == tuple(shapes.values())
    assert model.latent_shapes() == shapes                           # defaults: the config's training clip
    print(f"CMD paper params: {n_params(model):,}")
    assert 20e6 < n_params(model) < 60e6


# ---------------------------------------------------------------------------------------------------- tiny Reducio

def test_reducio_tiny_shapes_and_round_trip():
    model = tiny_reducio().eval()
    video = clip()
    with torch.no_grad():
        out = model(video)
        mean, logvar = model.encode(video)
        feats = model.encode_content(model.content_image(video))
        recon = model.decode(model.sample(mean, logvar), model.content_image(video), feats)
    latent = model.latent_shape(8, 32, 32)
    assert latent == (16, 2, 4, 4)
    assert out["recon"].shape == recon.shape == video.shape
    assert out["mean"].shape == out["logvar"].shape == out["z"].shape == (2, *latent)
    assert [tuple(f.shape[-2:]) for f in feats] == [(32, 32), (16, 16), (8, 8), (4, 4)]
    z = out["z"].flatten(1)                                          # layer-normalised over (C, T, H, W)
    assert torch.allclose(z.mean(1), torch.zeros(2), atol=1e-5)
    assert torch.allclose(z.var(1, unbiased=False), torch.ones(2), atol=1e-3)
    assert torch.equal(model.content_image(video), video[:, :, 3])    # centre frame (T-1)//2
    print(f"Reducio tiny params: {n_params(model):,}")


def test_reducio_gradients_reach_every_parameter():
    model = tiny_reducio().train()
    video = clip()
    out = model(video, generator=torch.Generator().manual_seed(0))
    (out["recon"] - video).abs().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_reducio_eval_is_deterministic_and_sampling_is_seeded():
    model = tiny_reducio().eval()
    video = clip()
    with torch.no_grad():
        a, b = model(video)["recon"], model(video)["recon"]
        mean, logvar = model.encode(video)
        s1 = model.sample(mean, logvar, torch.Generator().manual_seed(1))
        s2 = model.sample(mean, logvar, torch.Generator().manual_seed(1))
        s3 = model.sample(mean, logvar, torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    assert torch.equal(s1, s2) and not torch.equal(s1, s3)


def test_reducio_decoder_reads_the_content_image():
    """Through its cross-attention, not only through the residual: the decoder's own output (recon minus the
    repeated image) changes with the image once its output layer is no longer zero."""
    model = tiny_reducio().eval()
    torch.nn.init.normal_(model.decoder.conv_out.weight, std=0.05)       # as after some training
    z = torch.randn(1, *model.latent_shape(8, 32, 32))
    one, two = clip(1, 3, 32, 32, seed=1), clip(1, 3, 32, 32, seed=2)
    with torch.no_grad():
        a = model.decode(z, one) - one[:, :, None]
        b = model.decode(z, two) - two[:, :, None]
        c = model.decode(z, one) - one[:, :, None]
    assert torch.equal(a, c)
    assert (a - b).abs().mean() > 1e-3 * a.abs().mean()


@pytest.mark.parametrize("preset", ["tiny", "paper"])
def test_untrained_decoders_return_the_content_frame(preset):
    """content_residual: before any training, every latent decodes to the content frame repeated over time."""
    if preset == "tiny":
        reducio, cmd = tiny_reducio().eval(), tiny_cmd().eval()
        video = clip()
    else:   # paper sizes are checked on their config only (building them costs seconds)
        assert REDUCIO_PRESETS["paper"].content_residual and CMD_PRESETS["paper"].content_residual
        return
    with torch.no_grad():
        recon = reducio(video)["recon"]
        other = reducio.decode(torch.randn_like(reducio(video)["z"]), reducio.content_image(video))
        content, z_x, z_y = cmd.encode(video)
        cmd_recon = cmd.decode(content, torch.rand_like(z_x), torch.rand_like(z_y))
    frame = reducio.content_image(video)[:, :, None].expand_as(video)
    assert torch.equal(recon, frame) and torch.equal(other, frame)
    assert torch.equal(cmd_recon, content[:, :, None].expand_as(video))


def test_checkpoints_without_content_residual_keep_their_decoder():
    """hpcvid 0.1 configs have no content_residual: they load as False, with a decoder that adds nothing."""
    config = dataclasses.replace(REDUCIO_PRESETS["tiny"], content_residual=False)
    torch.manual_seed(0)
    model = ReducioVAE(config).eval()
    assert model.decoder.conv_out.weight.abs().sum() > 0
    video = clip()
    with torch.no_grad():
        recon = model(video)["recon"]
    assert not torch.allclose(recon, model.content_image(video)[:, :, None].expand_as(video))


def test_reducio_tiled_matches_untiled_on_one_tile_and_covers_larger_frames():
    model = tiny_reducio().eval()
    video = clip(1, 3, 8, 32, 32)
    with torch.no_grad():
        mean, logvar = model.encode(video)
        mean_t, logvar_t = model.encode_tiled(video, tile=32, overlap=0.25)
        z = model.normalize_latent(mean)
        image = model.content_image(video)
        recon, recon_t = model.decode(z, image), model.decode_tiled(z, image, tile=32, overlap=0.25)
        big = clip(1, 3, 8, 48, 64)                                  # 2 x 3 tiles of 32 with 8 px overlaps
        mean_b, logvar_b = model.encode_tiled(big, tile=32, overlap=0.25)
        recon_b = model.decode_tiled(model.normalize_latent(mean_b), model.content_image(big), tile=32)
    assert torch.allclose(mean, mean_t, atol=1e-5) and torch.allclose(logvar, logvar_t, atol=1e-5)
    assert torch.allclose(recon, recon_t, atol=1e-5)
    assert mean_b.shape == logvar_b.shape == (1, *model.latent_shape(8, 48, 64))
    assert recon_b.shape == big.shape and torch.isfinite(recon_b).all()


def test_tile_blending_is_a_partition_of_unity():
    x = torch.randn(2, 3, 40, 72)
    same = run_tiled(lambda t, ys, xs: t, x, tile=16, overlap=4, up=1, down=1)
    up = run_tiled(lambda t, ys, xs: F.interpolate(t, scale_factor=2), x, tile=16, overlap=4, up=2, down=1)
    down = run_tiled(lambda t, ys, xs: F.avg_pool2d(t, 4), x, tile=16, overlap=4, up=1, down=4)
    assert torch.allclose(same, x, atol=1e-6)
    assert torch.allclose(up, F.interpolate(x, scale_factor=2), atol=1e-6)
    assert torch.allclose(down, F.avg_pool2d(x, 4), atol=1e-6)


def test_reducio_bad_inputs_name_their_shape():
    model = tiny_reducio()
    for bad in [torch.zeros(1, 3, 6, 32, 32), torch.zeros(1, 3, 8, 30, 32), torch.zeros(1, 4, 8, 32, 32),
                torch.zeros(3, 8, 32, 32)]:
        with pytest.raises(ValueError, match=re.escape(str(tuple(bad.shape)))):
            model.encode(bad)
    z = torch.zeros(1, 16, 2, 4, 4)
    with pytest.raises(ValueError, match=re.escape("(1, 3, 48, 32)")):
        model.decode(z, torch.zeros(1, 3, 48, 32))                   # content image of the wrong size
    with pytest.raises(ValueError, match=re.escape("(1, 8, 2, 4, 4)")):
        model.decode(torch.zeros(1, 8, 2, 4, 4), torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="latent_shape|divisible"):
        model.latent_shape(16, 60, 64)
    with pytest.raises(ValueError, match="tile"):
        model.encode_tiled(torch.zeros(1, 3, 8, 32, 32), tile=30)


@pytest.mark.parametrize("change, words", [
    (dict(temporal_downsample_steps=6), "temporal_downsample_steps"),
    (dict(cross_attn_levels=("mid", 3)), "cross_attn_levels"),
    (dict(cross_attn_levels=(4,)), "content_mults"),                # content maps deeper than any reader
    (dict(patch_size=3), "patch_size"),
    (dict(attention_window=(4, 8)), "attention_window"),
])
def test_reducio_config_rejects_bad_values(change, words):
    with pytest.raises(ValueError, match=words):
        dataclasses.replace(REDUCIO_PRESETS["paper"], **change)


# ---------------------------------------------------------------------------------------------------- tiny CMD

def test_cmd_tiny_shapes_round_trip_and_gradients():
    model = tiny_cmd().train()
    video = clip()
    out = model(video)
    shapes = model.latent_shapes(8, 32, 32)
    assert out["recon"].shape == video.shape
    assert tuple(out["content"].shape[1:]) == shapes["content"] == (3, 32, 32)
    assert tuple(out["z_x"].shape[1:]) == shapes["z_x"] == (8, 8, 4)
    assert tuple(out["z_y"].shape[1:]) == shapes["z_y"] == (8, 8, 4)
    assert out["z_x"].abs().max() <= 1 and out["z_y"].abs().max() <= 1     # tanh
    (out["recon"] - video).abs().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    with torch.no_grad():
        again = model.decode(*model.encode(video))
    assert again.shape == video.shape
    print(f"CMD tiny params: {n_params(model):,}")


def test_cmd_content_frame_is_a_softmax_average_over_time():
    model = tiny_cmd().eval()
    video = clip()
    with torch.no_grad():
        weights = model.content_weights(video)
        content, _, _ = model.encode(video)
        a, b = model(video)["recon"], model(video)["recon"]
    assert weights.shape == video.shape
    assert torch.allclose(weights.sum(dim=2), torch.ones(2, 3, 32, 32), atol=1e-5)
    assert (weights >= 0).all()
    assert torch.allclose(content, (video * weights).sum(2), atol=1e-6)
    assert (content <= video.amax(2) + 1e-6).all() and (content >= video.amin(2) - 1e-6).all()
    assert torch.equal(a, b)                                         # eval output is deterministic


def test_cmd_bad_inputs_name_their_shape():
    model = tiny_cmd()
    for bad in [torch.zeros(1, 3, 8, 30, 32), torch.zeros(1, 3, 32, 32), torch.zeros(1, 1, 8, 32, 32)]:
        with pytest.raises(ValueError, match=re.escape(str(tuple(bad.shape)))):
            model.encode(bad)
    content, z_x, z_y = torch.zeros(1, 3, 32, 32), torch.zeros(1, 8, 8, 4), torch.zeros(1, 8, 8, 4)
    with pytest.raises(ValueError, match=re.escape("(1, 8, 8, 5)")):
        model.decode(content, z_x, torch.zeros(1, 8, 8, 5))
    with pytest.raises(ValueError, match=re.escape("(8, 8, 4)")):
        model.decode(content, z_x[0], z_y)
    with pytest.raises(ValueError, match="heads"):
        CMDConfig(width=100, heads=3)
    with pytest.raises(ValueError, match="image_size"):
        CMDConfig(image_size=(255, 256))


# ---------------------------------------------------------------------------------------------------- layers

def test_window_attention_is_full_attention_on_small_maps():
    torch.manual_seed(0)
    block = layers.WindowSelfAttention3d(32, window=(4, 8, 8), head_dim=16)
    x = torch.randn(2, 32, 3, 5, 6)                                  # smaller than the window everywhere
    tokens = block.norm(x).flatten(2).transpose(1, 2)                # (B, T*H*W, C)
    full = x + block.attn(tokens).transpose(1, 2).reshape(x.shape)
    assert torch.allclose(block(x), full, atol=1e-5)


def test_window_attention_stays_inside_windows_with_padding():
    torch.manual_seed(0)
    block = layers.WindowSelfAttention3d(16, window=(2, 4, 4), head_dim=16)
    block.norm = torch.nn.Identity()                                 # GroupNorm mixes statistics over the map
    x = torch.randn(1, 16, 3, 6, 7)                                  # pads to 4 x 8 x 8
    y = block(x)
    x2 = x.clone()
    x2[:, :, 2, 5, 6] += 1.0                                         # the last, partly padded window
    y2 = block(x2)
    changed = (y2 - y).abs().amax(1)[0] > 1e-6                       # (T, H, W)
    assert changed[2:, 4:, 4:].any() and not changed[:2].any() and not changed[:, :4].any()
    assert not changed[:, :, :4].any()
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_layer_shapes_and_checks():
    assert layers.norm(48).num_groups == 24 and layers.norm(3).num_groups == 3 and layers.norm(128).num_groups == 32
    x = torch.randn(1, 8, 4, 8, 8)
    assert layers.Downsample3d(8, spatial=2, temporal=2, out_channels=16)(x).shape == (1, 16, 2, 4, 4)
    assert layers.Downsample3d(8, spatial=2, temporal=1)(x).shape == (1, 8, 4, 4, 4)
    assert layers.Upsample3d(8, spatial=2, temporal=2, out_channels=4)(x).shape == (1, 4, 8, 16, 16)
    assert layers.ResnetBlock3d(8, 16)(x).shape == (1, 16, 4, 8, 8)
    assert layers.ResnetBlock2d(8)(x[:, :, 0]).shape == (1, 8, 8, 8)
    assert layers.Downsample2d(8)(x[:, :, 0]).shape == (1, 8, 4, 4)
    assert layers.sinusoidal_embedding(torch.arange(5), 7).shape == (5, 7)
    assert layers.pos_embed_3d(2, 3, 4, 64).shape == (24, 64)
    q, ctx = torch.randn(2, 5, 32), torch.randn(2, 7, 24)
    mask = torch.tensor([[True] * 7, [True] * 3 + [False] * 4])
    attn = layers.Attention(32, context_dim=24, head_dim=16)
    out = attn(q, ctx, mask)
    ctx2 = ctx.clone()
    ctx2[1, 3:] = 100.0                                              # masked keys must not matter
    assert out.shape == (2, 5, 32) and torch.allclose(out[1], attn(q, ctx2, mask)[1], atol=1e-6)
    assert layers.CrossAttentionBlock(32, 24)(q, ctx).shape == (2, 5, 32)
    with pytest.raises(ValueError, match=re.escape("(1, 8, 3, 8, 8)")):
        layers.Downsample3d(8, temporal=2)(torch.randn(1, 8, 3, 8, 8))
    with pytest.raises(ValueError, match=re.escape("(2, 5, 31)")):
        attn(torch.randn(2, 5, 31), ctx)
    with pytest.raises(ValueError, match="1 or 2"):
        layers.Upsample3d(8, spatial=3)


def test_content_cross_attention_windows_are_local():
    from hpcvid.models.reducio import ContentCrossAttention
    torch.manual_seed(0)
    cross = ContentCrossAttention(16, 8, window=4, head_dim=16)
    x, content = torch.randn(1, 16, 3, 6, 8), torch.randn(1, 8, 6, 8)   # 2 x 2 windows, the lower ones padded
    y = cross(x, content)
    content2 = content.clone()
    content2[:, :, 5, 1] = torch.randn(8)                            # inside the lower-left window
    changed = (cross(x, content2) - y).abs().amax(1)[0] > 1e-6       # (T, H, W)
    assert changed[:, 4:, :4].all() and not changed[:, :4].any() and not changed[:, :, 4:].any()
    with pytest.raises(ValueError, match=re.escape("(1, 8, 6, 7)")):
        cross(x, content[..., :7])
