"""Autoencoder training pieces: metrics and losses, checkpoints, the training log (JSONL, TensorBoard), PNGs and plots,
specs, compression figures, prep encoders.

Everything here runs in this process on tiny inputs; the stages end to end are in tests/integration/test_train_ae_e2e.py.
"""
from __future__ import annotations

import json
import math
import os

import av
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from hpcvid.config import SpecError, UserError, load_job
from hpcvid.stages.encoders import CMDPrepEncoder, ReducioPrepEncoder, build_prep_encoder, file_digest
from hpcvid.train import checkpoint as ck
from hpcvid.train.autoencoder import (build_model, check_clip_size, compression, config_to_dict, load_autoencoder,
                                      model_config, reconstruct, train_pass)
from hpcvid.train.checkpoint import full_state, load_full_state
from hpcvid.train.losses import PatchDiscriminator3d, adaptive_gan_weight, hinge_d_loss, kl_per_clip, ssim_loss
from hpcvid.train.metrics import (MetricsLog, TrainingLog, frame_changes, psnr, read_jsonl, read_tensorboard, ssim,
                                  temporal_error)
from hpcvid.train.pictures import contact_sheet, curves_png, plot_curves, write_png


def rand_video(*shape, seed=0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def decode_png(path) -> np.ndarray:
    """A PNG decoded by FFmpeg (PyAV), not by our writer's code."""
    with av.open(str(path)) as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24")


# ---------------------------------------------------------------------------------------------------- metrics

def test_temporal_error_measures_motion_differences_in_grey_levels():
    g = torch.Generator().manual_seed(0)
    y = torch.rand(2, 3, 6, 8, 8, generator=g) * 2 - 1                      # (B, C, T, H, W) in [-1, 1]
    assert torch.allclose(temporal_error(y, y), torch.zeros(2))
    assert torch.allclose(temporal_error(y + 0.3, y), torch.zeros(2), atol=1e-5)   # an offset is no motion
    still = y[:, :, 2:3].expand_as(y)                                        # a repeated frame: y's own motion
    own = (y[:, :, 1:] - y[:, :, :-1]).abs().flatten(1).mean(1) * 127.5
    assert torch.allclose(temporal_error(still, y), own, rtol=1e-5)
    jump = torch.zeros(1, 3, 5, 4, 4)
    jump[:, :, 3:] = 1.0                                                     # a cut between frames 2 and 3
    assert frame_changes(jump).tolist() == [[0.0, 0.0, 127.5, 0.0]]
    with pytest.raises(ValueError, match="T>=2"):
        temporal_error(y[:, :, :1], y[:, :, :1])


def test_psnr_matches_the_formula():
    x = torch.zeros(2, 3, 4, 8, 8)
    y = x.clone()
    y[0] += 0.1                                              # MSE 0.01 in [-1, 1]: 10 log10(2^2 / 0.01)
    y[1] += 0.5                                              # MSE 0.25
    got = psnr(y, x)
    assert got.shape == (2,)
    assert got[0].item() == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-4)
    assert got[1].item() == pytest.approx(10 * math.log10(4 / 0.25), abs=1e-4)
    # the same as the uint8 convention: peak 255 over the 0..255 values
    a, b = ((x + 1) * 127.5), ((y + 1) * 127.5)
    mse = ((a - b) ** 2).flatten(1).mean(1)
    assert torch.allclose(got, 10 * torch.log10(255 ** 2 / mse), atol=1e-3)


def test_ssim_is_one_for_identical_and_falls_with_noise():
    x = rand_video(2, 3, 4, 32, 32).clamp(-1, 1)
    x = torch.nn.functional.avg_pool3d(x, (1, 3, 3), 1, (0, 1, 1))   # some structure, not pure noise
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)
    values = [ssim((x + s * rand_video(*x.shape, seed=1)).clamp(-1, 1), x).mean().item() for s in (0.05, 0.2, 0.6)]
    assert values[0] > values[1] > values[2], values
    assert values[0] < 1.0 and values[2] < 0.5
    assert ssim(x[:, :, 0], x[:, :, 0]).shape == (2,)       # images (B, C, H, W) too
    x.requires_grad_(True)                                   # and differentiable: the loss uses it
    ssim_loss(x * 0.5, x.detach()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_ssim_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="share"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))


def test_kl_hinge_discriminator_and_adaptive_weight():
    mean, logvar = torch.zeros(2, 4, 1, 2, 2), torch.zeros(2, 4, 1, 2, 2)
    assert torch.equal(kl_per_clip(mean, logvar), torch.zeros(2))               # the prior itself: KL 0
    assert kl_per_clip(mean + 1, logvar)[0].item() == pytest.approx(0.5 * 16)   # 0.5 * sum(mu^2)
    disc = PatchDiscriminator3d(3, channels=8, layers=3)
    logits = disc(rand_video(2, 3, 4, 32, 32))
    assert logits.shape[:2] == (2, 1) and logits.shape[2] == 4                  # T kept, space reduced to patches
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)).item() == 0.0   # confident and right
    assert hinge_d_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(1.0)
    layer = torch.nn.Conv3d(3, 3, 1)
    out = layer(rand_video(1, 3, 2, 32, 32))
    w = adaptive_gan_weight(out.abs().mean(), -disc(out).mean(), layer.weight)
    assert w.ndim == 0 and 0 < w.item() <= 1e4 and not w.requires_grad


# ---------------------------------------------------------------------------------------------------- PNG, logs

def read_picture(path) -> np.ndarray:
    """A PNG as Pillow reads it, RGB (matplotlib writes RGBA)."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_png_round_trips_through_pillow_and_ffmpeg(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    write_png(tmp_path / "a.png", image)
    assert np.array_equal(read_picture(tmp_path / "a.png"), image)
    assert np.array_equal(decode_png(tmp_path / "a.png"), image)           # FFmpeg agrees, pixel for pixel
    grey = image[..., 0]
    write_png(tmp_path / "grey.png", grey)
    with Image.open(tmp_path / "grey.png") as im:
        assert im.mode == "L" and np.array_equal(np.asarray(im), grey)
    with pytest.raises(ValueError, match="uint8"):
        write_png(tmp_path / "f.png", np.zeros((4, 5, 3), np.float32))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "grey.png"]   # no temporary file left behind


def test_contact_sheet_puts_originals_over_reconstructions(tmp_path):
    original = np.zeros((8, 16, 16, 3), np.uint8)
    original[..., 0] = 200                                   # red clip
    original[:, 3, 5] = (0, 255, 0)                          # one green pixel, to follow through the enlargement
    recon = np.zeros_like(original)
    recon[..., 2] = 200                                      # blue reconstruction
    sheet = contact_sheet([(original, recon), (original, recon)], frames=4, min_frame=32)
    k, pad = 2, 8                                            # 16 px frames enlarged to 32; 4 x gap 2 around
    assert sheet.dtype == np.uint8 and sheet.shape[1] == 4 * (16 * k + 2) - 2 + 2 * pad
    assert sheet.shape[0] == 2 * (2 * 16 * k + 2) + 3 * pad
    top, bottom = sheet[pad + 5, pad + 5], sheet[pad + 16 * k + 2 + 5, pad + 5]
    assert tuple(top) == (200, 0, 0) and tuple(bottom) == (0, 0, 200)
    tile = sheet[pad:pad + 16 * k, pad:pad + 16 * k]         # nearest neighbour: every pixel a sharp k x k block
    assert np.array_equal(tile, original[0].repeat(k, axis=0).repeat(k, axis=1))
    write_png(tmp_path / "sheet.png", sheet)
    assert np.array_equal(read_picture(tmp_path / "sheet.png"), sheet)
    assert np.array_equal(decode_png(tmp_path / "sheet.png"), sheet)


def test_metrics_log_drops_redone_steps_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in (10, 20, 30):
        log.write({"step": step, "loss": 1.0 / step})
    with open(path, "a") as f:
        f.write('{"step": 40, "lo')                          # a torn last line from a crash
    MetricsLog(path, resume_step=20)                         # resumed from the step-20 checkpoint
    assert [r["step"] for r in read_jsonl(path)] == [10, 20]
    MetricsLog(path)                                         # a fresh run starts a fresh log
    assert not path.exists()


def test_training_log_writes_jsonl_and_tensorboard_and_purges_on_resume(tmp_path):
    with TrainingLog(tmp_path) as log:
        for step in (10, 20, 30):
            log.write({"step": step, "loss": 1.0 / step, "skipped": 0, "stage": {"0": 2.0 * step}, "note": "x"})
    assert read_jsonl(tmp_path / "metrics.jsonl") == [
        {"step": s, "loss": 1.0 / s, "skipped": 0, "stage": {"0": 2.0 * s}, "note": "x"} for s in (10, 20, 30)]
    tb = read_tensorboard(tmp_path / "tensorboard")
    assert sorted(tb) == ["loss", "skipped", "stage/0"]                  # numbers only; nested dicts as outer/inner
    assert [s for s, _ in tb["loss"]] == [10, 20, 30]
    assert [v for _, v in tb["loss"]] == pytest.approx([0.1, 0.05, 1 / 30])   # stored as float32
    assert tb["stage/0"] == [(10, 20.0), (20, 40.0), (30, 60.0)]

    with TrainingLog(tmp_path, resume_step=20) as log:     # resumed from the step-20 checkpoint: 30 is redone
        log.write({"step": 30, "loss": 0.5, "grad_norm": float("nan")})
        log.write({"step": 40, "loss": 0.25})
    assert [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == \
        [(10, 0.1), (20, 0.05), (30, 0.5), (40, 0.25)]
    tb = read_tensorboard(tmp_path / "tensorboard")
    assert tb["loss"] == [(10, pytest.approx(0.1)), (20, pytest.approx(0.05)), (30, 0.5), (40, 0.25)]   # no doubles
    assert "grad_norm" not in tb                                          # NaN: null in the JSONL, no TB point
    assert [s for s, _ in tb["stage/0"]] == [10, 20]                      # the old run's step 30 is hidden

    with TrainingLog(tmp_path) as log:                     # a fresh run: the old JSONL and events go
        log.write({"step": 1, "loss": 3.0})
    assert len(list((tmp_path / "tensorboard").iterdir())) == 1
    assert read_tensorboard(tmp_path / "tensorboard") == {"loss": [(1, 3.0)]}
    with pytest.raises(RuntimeError, match="closed"):
        log.write({"step": 2, "loss": 1.0})
    with pytest.raises(ValueError, match="integer 'step'"):
        TrainingLog(tmp_path / "b").write({"loss": 1.0})


def test_training_log_of_other_ranks_writes_nothing(tmp_path):
    log = TrainingLog(tmp_path / "run", enabled=False)
    log.write({"step": 1, "loss": 1.0})
    log.close()
    assert not (tmp_path / "run").exists()


def coloured(image: np.ndarray, rgb: tuple[int, int, int], tol: int = 40) -> int:
    """How many pixels are within `tol` of a colour."""
    return int((np.abs(image.astype(int) - rgb).max(axis=2) <= tol).sum())


def skipped_bands(image: np.ndarray) -> int:
    """Columns that are mostly the translucent red of the skipped-step lines (from top to bottom of a plot)."""
    pink = np.abs(image.astype(int) - (255, 166, 166)).max(axis=2) <= 25
    return int((pink.sum(axis=0) > 200).sum())


def test_curves_png_draws_losses_log_scale_psnr_and_skipped_steps(tmp_path):
    records = [{"step": s, "loss": 1.0 / s, "l1": 0.5 / s, "kl": 3.0, "psnr": 10 + s / 10, "skipped": 0}
               for s in range(10, 310, 10)]
    records[12].update(loss=None, l1=None, skipped=5, nonfinite=["l1", "loss"])   # a skipped interval: a gap
    curves_png(records, tmp_path / "curves.png")
    image = read_picture(tmp_path / "curves.png")
    assert image.shape == (400, 1280, 3)                                  # two 640 x 400 panels
    assert coloured(image, (31, 119, 180)) > 500                          # matplotlib's first line colour: loss
    assert coloured(image[:, 640:], (31, 119, 180)) > 300                 # and PSNR in the right panel
    assert 0 < skipped_bands(image[:, :640]) < 5                          # one thin red line at the skipped step
    curves_png([{"step": s, "loss": 1.0 / s} for s in (1, 2)], tmp_path / "no_psnr.png")
    assert read_picture(tmp_path / "no_psnr.png").shape == (400, 640, 3)  # no PSNR logged: one panel


def test_plot_curves_is_generic_over_keys(tmp_path):
    records = [{"step": s, "loss/stage0": 2.0 / s, "loss/stage1": 1.0 / s, "grad_norm": 5.0, "lr": 1e-4}
               for s in range(1, 101)]
    plot_curves(records, ["loss/stage0", "loss/stage1", "grad_norm", "lr"], tmp_path / "dit.png", "DiT")
    image = read_picture(tmp_path / "dit.png")
    assert image.shape == (400, 640, 3) and image.std() > 10
    for colour in [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]:   # one line per key
        assert coloured(image, colour, tol=30) > 100, colour
    assert skipped_bands(image) == 0                                      # nothing skipped, no red line
    plot_curves([{"step": 1, "g_loss": -0.5}, {"step": 2, "g_loss": 0.5}], ["g_loss", "absent"],
                tmp_path / "linear.png")                                  # a negative value: linear axis, no error
    blank = read_picture(tmp_path / "linear.png")
    assert blank.shape == (400, 640, 3) and coloured(blank, (31, 119, 180)) > 20


# ---------------------------------------------------------------------------------------------------- checkpoints

def trained_pair(kind: str, seed: int = 0):
    """A tiny model and its AdamW after two steps on random clips."""
    torch.manual_seed(seed)
    model = build_model(kind, model_config(kind, "tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(2):
        recon, _ = train_pass(kind, model, rand_video(1, 3, 4, 16, 16, seed=step), torch.Generator().manual_seed(1))
        opt.zero_grad()
        recon.abs().mean().backward()
        opt.step()
    return model, opt


def save(folder, kind, model, opt, step=2):
    weights, optim = full_state(model, opt)
    meta = {"step": step, "model": {"kind": kind, "preset": "tiny", "overrides": {},
                                    "config": config_to_dict(model.config)}}
    return ck.save_checkpoint(folder, {"model": weights}, {"optimizer": optim}, meta)


@pytest.mark.parametrize("kind", ["reducio", "cmd"])
def test_checkpoint_save_load_gives_identical_outputs_and_optimizer(tmp_path, kind):
    model, opt = trained_pair(kind)
    folder = save(ck.step_dir(tmp_path, 2), kind, model, opt)
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json", "model.safetensors", "optimizer.pt"]

    loaded_kind, cfg, fresh, meta = load_autoencoder(tmp_path)          # the output folder: its latest checkpoint
    assert loaded_kind == kind and meta["step"] == 2 and cfg == model.config
    video = rand_video(2, 3, 4, 16, 16, seed=5)
    model.eval()
    with torch.no_grad():
        assert torch.equal(reconstruct(kind, model, video), reconstruct(kind, fresh, video))

    fresh.train()
    model.train()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    load_full_state(fresh, fresh_opt, ck.load_weights(folder), ck.load_state(folder, "optimizer"))
    a, b = opt.state_dict(), fresh_opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i, state in a["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["state"][i][key]), (i, key)
    for m, o in ((model, opt), (fresh, fresh_opt)):                     # one more step: still identical
        recon, _ = train_pass(kind, m, video, torch.Generator().manual_seed(3))
        o.zero_grad()
        recon.abs().mean().backward()
        o.step()
    for (name, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name


def test_optimizer_file_loads_with_weights_only_and_refuses_pickled_code(tmp_path):
    model, opt = trained_pair("cmd")
    folder = save(tmp_path / "step", "cmd", model, opt)
    state = torch.load(folder / "optimizer.pt", weights_only=True)      # plain data: loads under weights_only
    assert set(state) == {"state", "param_groups"}

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"state": Evil()}, folder / "optimizer.pt")
    with pytest.raises(UserError, match="cannot load"):
        ck.load_state(folder, "optimizer")


def test_latest_valid_checkpoint_ignores_incomplete_folders(tmp_path):
    model, opt = trained_pair("cmd")
    for step in (100, 200, 300):
        save(ck.step_dir(tmp_path, step), "cmd", model, opt, step)
    (ck.step_dir(tmp_path, 300) / "meta.json").unlink()                  # crashed before its marker
    ck.step_dir(tmp_path, 400).mkdir()                                   # crashed early
    assert ck.latest_checkpoint(tmp_path) == ck.step_dir(tmp_path, 200)
    with open(ck.step_dir(tmp_path, 200) / "model.safetensors", "ab") as f:
        f.write(b"x")                                                    # a file that is not what meta.json says
    assert ck.latest_checkpoint(tmp_path) == ck.step_dir(tmp_path, 100)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [100]
    with pytest.raises(UserError, match="incomplete or damaged"):
        ck.resolve_checkpoint(ck.step_dir(tmp_path, 200))
    with pytest.raises(UserError, match="no complete checkpoint"):
        ck.resolve_checkpoint(tmp_path / "checkpoints")
    with pytest.raises(UserError, match="no such"):
        ck.resolve_checkpoint(tmp_path / "nothing")


def test_keep_last_prunes_old_and_stale_incomplete(tmp_path):
    model, opt = trained_pair("cmd")
    for step in (1, 2, 3, 4):
        save(ck.step_dir(tmp_path, step), "cmd", model, opt, step)
    ck.step_dir(tmp_path, 0).mkdir()                         # an old crash's leftover
    ck.step_dir(tmp_path, 5).mkdir()                         # being written right now (newer): left alone
    removed = ck.prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["step-000000", "step-000001", "step-000002"]
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["step-000003", "step-000004", "step-000005"]


def test_weights_that_do_not_fit_are_a_user_error(tmp_path):
    model, opt = trained_pair("cmd")
    folder = save(tmp_path / "step", "cmd", model, opt)
    meta = json.loads((folder / "meta.json").read_text())
    meta["model"]["config"]["width"] = 64                    # a config that does not match the weights
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="do not fit the model"):
        load_autoencoder(folder)


def damage(path, offset=None, data=b"\xff" * 64):
    """Overwrite bytes in place (the size stays): 0xFF in float32 data reads as NaN. The hash cache is cleared as a
    later process (the resume) would start without it."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2 if offset is None else offset)
        f.write(data)
    assert os.path.getsize(path) == size
    ck._HASHED.clear()


def test_checkpoint_records_sha256_of_every_file(tmp_path):
    import hashlib

    model, opt = trained_pair("cmd")
    folder = save(ck.step_dir(tmp_path, 2), "cmd", model, opt)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["format_version"] == 2 and set(meta["sha256"]) == set(meta["files"]) == {"model.safetensors",
                                                                                          "optimizer.pt"}
    for name, digest in meta["sha256"].items():
        assert digest == hashlib.sha256((folder / name).read_bytes()).hexdigest(), name
    assert ck.check_checkpoint(folder) == (meta, None) and ck.has_hashes(meta)


@pytest.mark.parametrize("file, offset", [("model.safetensors", None), ("optimizer.pt", None),
                                          ("model.safetensors", 0)], ids=["weights", "optimizer", "header"])
def test_latest_valid_skips_a_checkpoint_damaged_in_place(tmp_path, file, offset):
    model, opt = trained_pair("cmd")
    for step in (1, 2, 3):
        save(ck.step_dir(tmp_path, step), "cmd", model, opt, step)
    damage(ck.step_dir(tmp_path, 3) / file, offset)
    assert ck.latest_checkpoint(tmp_path) == ck.step_dir(tmp_path, 3)     # by sizes alone it still looks complete
    warnings = []
    assert ck.latest_valid_checkpoint(tmp_path, warnings.append) == ck.step_dir(tmp_path, 2)
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert f"{ck.step_dir(tmp_path, 3) / file}: content differs from the sha256" in warnings[0]
    # eval/prep: the damaged step folder, or an output folder whose newest checkpoint it is, is a one-line UserError
    for given in (ck.step_dir(tmp_path, 3), tmp_path):
        with pytest.raises(UserError, match=f"{file}: content differs") as err:
            load_autoencoder(given)
        assert "\n" not in str(err.value)
    assert load_autoencoder(ck.step_dir(tmp_path, 2))[3]["step"] == 2


def test_damaged_files_without_hashes_are_one_line_user_errors(tmp_path):
    """Format-1 checkpoints (no sha256) are checked by size only: the loaders themselves must turn damage into a
    UserError naming the file, never a traceback."""
    model, opt = trained_pair("cmd")
    folder = save(ck.step_dir(tmp_path, 1), "cmd", model, opt)
    meta = json.loads((folder / "meta.json").read_text())
    del meta["sha256"]
    (folder / "meta.json").write_text(json.dumps(meta))
    assert ck.check_checkpoint(folder)[1] is None and not ck.has_hashes(ck.check_checkpoint(folder)[0])
    good = (folder / "model.safetensors").read_bytes()
    damage(folder / "model.safetensors")                                  # NaN in the middle of the tensor data
    with pytest.raises(UserError, match=r"model\.safetensors: \d+ tensor\(s\) hold NaN or inf"):
        load_autoencoder(folder)
    (folder / "model.safetensors").write_bytes(good)
    damage(folder / "model.safetensors", offset=0)                        # the header's length field
    with pytest.raises(UserError, match=r"model\.safetensors: cannot read the weights, damaged") as err:
        load_autoencoder(folder)
    assert "\n" not in str(err.value)
    for offset in (0, None):
        damage(folder / "optimizer.pt", offset)
        with pytest.raises(UserError, match=r"optimizer\.pt: cannot load|optimizer\.pt: .*NaN"):
            ck.load_state(folder, "optimizer")


def test_pruning_never_loses_good_checkpoints_to_a_damaged_newer_one(tmp_path):
    model, opt = trained_pair("cmd")
    for step in (1, 2, 3, 4):
        save(ck.step_dir(tmp_path, step), "cmd", model, opt, step)
    damage(ck.step_dir(tmp_path, 4) / "model.safetensors")
    warnings = []
    assert ck.prune_checkpoints(tmp_path, keep_last=2, warn=warnings.append) == []   # newest damaged: nothing goes
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [1, 2, 3, 4]
    assert len(warnings) == 1 and "not pruning" in warnings[0] and "step-000004" in warnings[0]
    save(ck.step_dir(tmp_path, 5), "cmd", model, opt, 5)                  # a resumed run saves a good newer one
    removed = ck.prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["step-000001", "step-000002", "step-000004"]
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [3, 5]        # the two newest good ones
    assert all(ck.check_checkpoint(ck.step_dir(tmp_path, s))[1] is None for s in (3, 5))


def test_verification_hashes_each_unchanged_file_once(tmp_path, monkeypatch):
    model, opt = trained_pair("cmd")
    folder = save(ck.step_dir(tmp_path, 1), "cmd", model, opt)
    calls = []
    real = ck._hash_file
    monkeypatch.setattr(ck, "_hash_file", lambda path: calls.append(path.name) or real(path))
    for _ in range(3):
        assert ck.check_checkpoint(folder)[1] is None
    assert calls == []                                                    # hashed while written: nothing to redo
    ck._HASHED.clear()
    for _ in range(3):
        assert ck.check_checkpoint(folder)[1] is None
    assert sorted(calls) == ["model.safetensors", "optimizer.pt"]         # once each, then cached
    st = (folder / "optimizer.pt").stat()
    os.utime(folder / "optimizer.pt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))   # touched: hashed again
    assert ck.check_checkpoint(folder)[1] is None and calls.count("optimizer.pt") == 2


def test_non_finite_state_is_never_saved(tmp_path):
    from hpcvid.config import RunStopped

    model, opt = trained_pair("cmd")
    weights, optim = full_state(model, opt)
    key = next(iter(weights))
    weights[key] = weights[key].clone()
    weights[key].view(-1)[0] = float("nan")
    with pytest.raises(RunStopped, match=f"not saved.*NaN or inf.*{key}"):
        ck.save_checkpoint(ck.step_dir(tmp_path, 1), {"model": weights}, {"optimizer": optim}, {"step": 1})
    assert not (ck.step_dir(tmp_path, 1) / "meta.json").exists() and ck.list_checkpoints(tmp_path) == []


def test_metrics_lines_stay_strict_json(tmp_path):
    def strict(line):
        return json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in {line}"))

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": NaN}\n{"step": 2, "loss": 1.0}\n')   # a log from before strict_record
    log = MetricsLog(path, resume_step=2)
    log.write({"step": 3, "loss": float("nan"), "grad_norm": float("inf"), "l1": 0.5, "x": [1.0, -math.inf]})
    lines = [strict(ln) for ln in path.read_text().splitlines()]
    assert lines[0] == {"step": 1, "loss": None, "nonfinite": ["loss"]} and lines[1] == {"step": 2, "loss": 1.0}
    assert lines[2] == {"step": 3, "loss": None, "grad_norm": None, "l1": 0.5, "x": [1.0, None],
                        "nonfinite": ["grad_norm", "loss", "x"]}
    assert read_jsonl(path) == lines
    curves_png(lines, tmp_path / "curves.png")                            # nulls are gaps, not a crash
    assert read_picture(tmp_path / "curves.png").shape == (400, 640, 3)


# ---------------------------------------------------------------------------------------------------- configs

def test_compression_figures_of_the_presets():
    r = compression("reducio", model_config("reducio", "paper"), 16, 256, 256)
    assert r["latent_shapes"] == {"latent": [16, 4, 8, 8]} and r["latent_elements"] == 4096
    assert r["pixel_elements"] == 3 * 16 * 256 * 256 and r["pixels_per_latent_element"] == 768
    assert r["latent_bytes_per_clip"] == 8192 and r["latent_plus_side_bytes_per_clip"] == 8192 + 3 * 256 * 256
    c = compression("cmd", model_config("cmd", "paper"), 16, 256, 256)
    assert c["latent_shapes"] == {"z_x": [8, 16, 128], "z_y": [8, 16, 128]} and c["pixels_per_latent_element"] == 96
    assert compression("reducio", model_config("reducio", "tiny"), 16, 64, 64)["latent_shapes"]["latent"] == \
        [16, 4, 8, 8]
    assert compression("cmd", model_config("cmd", "tiny"), 16, 64, 64)["latent_elements"] == 2 * 8 * 16 * 8
    with torch.device("meta"):                               # the figures agree with the models' own shapes
        model = build_model("cmd", model_config("cmd", "paper"))
        _, z_x, z_y = model.encode(torch.empty(1, 3, 16, 256, 256))
    assert z_x.numel() + z_y.numel() == c["latent_elements"]


def test_model_config_overrides_and_sizes():
    cfg = model_config("cmd", "tiny", {"motion_channels": 16, "image_size": [32, 32]})
    assert cfg.motion_channels == 16 and cfg.image_size == (32, 32)
    with pytest.raises(UserError, match="'widht' is not a CMDConfig field"):
        model_config("cmd", "tiny", {"widht": 64})
    with pytest.raises(UserError, match="divisible"):
        model_config("cmd", "tiny", {"width": 100, "heads": 3})
    with pytest.raises(UserError, match=r"does not fit the reducio model: T must be divisible by 4 and H, W by 8"):
        check_clip_size("reducio", model_config("reducio", "tiny"), 6, 64, 64)
    with pytest.raises(UserError, match="patch size 8"):
        check_clip_size("cmd", model_config("cmd", "tiny"), 16, 60, 64)


def write_spec(tmp_path, section: str, body: dict):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({section: body}))
    return path


TRAIN = {"model": {"kind": "reducio"}, "data": {"manifest": {"kind": "folder", "path": "v"}}, "output": "o"}


@pytest.mark.parametrize("change, key, words", [
    ({"loss": {"perceptual_weights": "/w/vgg.pth"}}, "train_ae.loss.perceptual_weights", "SSIM"),
    ({"loss": {"gan": 0.1}, "parallel": "fsdp2"}, "train_ae.loss.gan", "parallel: ddp"),
    ({"data": {"source": "shards", "shards": "d", "manifest": {"kind": "folder", "path": "v"}}},
     "train_ae.data.shards", "no manifest"),
    ({"data": {"source": "manifest"}}, "train_ae.data.manifest", "needs a manifest"),
    ({"model": {"kind": "vqgan"}}, "train_ae.model.kind", "'reducio', 'cmd'"),
    ({"betas": [0.9, 1.5]}, "train_ae.betas", "[0, 1)"),
    ({"steps": 0}, "train_ae.steps", "> 0"),
    ({"data": {"manifest": {"kind": "folder", "path": "v"}, "resolution": [64, 0]}}, "train_ae.data.resolution",
     "positive"),
])
def test_train_spec_errors_name_the_key(tmp_path, change, key, words):
    with pytest.raises(SpecError) as err:
        load_job(write_spec(tmp_path, "train_ae", {**TRAIN, **change}))
    assert err.value.key == key and words in err.value.message, str(err.value)


def test_prep_encoder_spec_needs_a_checkpoint(tmp_path):
    base = {"manifest": {"kind": "folder", "path": "v"}, "output": "o"}
    with pytest.raises(SpecError) as err:
        load_job(write_spec(tmp_path, "prep", {**base, "encoder": {"kind": "reducio"}}))
    assert err.value.key == "prep.encoder.checkpoint"
    with pytest.raises(SpecError) as err:
        load_job(write_spec(tmp_path, "prep", {**base, "encoder": {"kind": "cmd", "checkpoint": "c", "downsample": 2}}))
    assert err.value.key == "prep.encoder.downsample"
    job = load_job(write_spec(tmp_path, "prep", {**base, "encoder": {"kind": "cmd", "checkpoint": "c"}}))
    assert job.prep.encoder.kind == "cmd"


def test_job_files_validate():
    from pathlib import Path

    jobs = Path(__file__).resolve().parents[2] / "jobs"
    for name in ("tiny_reducio", "tiny_cmd", "paper_reducio", "paper_cmd", "quickstart_reducio_prep"):
        job = load_job(jobs / f"{name}.yaml")
        if job.train_ae is not None:
            t = job.train_ae
            cfg = model_config(t.model.kind, t.model.preset, t.model.overrides)
            check_clip_size(t.model.kind, cfg, t.data.clip.num_frames, *t.data.resolution)
    assert load_job(jobs / "paper_reducio.yaml").train_ae.model.preset == "paper"


# ---------------------------------------------------------------------------------------------------- prep encoders

def test_prep_encoders_from_checkpoints(tmp_path):
    clips = np.random.default_rng(0).integers(0, 256, (2, 8, 32, 48, 3), dtype=np.uint8)   # (B, T, H, W, 3)
    for kind, cls in (("reducio", ReducioPrepEncoder), ("cmd", CMDPrepEncoder)):
        model, opt = trained_pair(kind)
        folder = save(ck.step_dir(tmp_path / kind, 2), kind, model, opt)
        from hpcvid.config import EncoderSpec

        encoder = build_prep_encoder(EncoderSpec(kind=kind, checkpoint=str(tmp_path / kind)))
        assert isinstance(encoder, cls) and encoder.name == kind
        assert encoder.digest() == file_digest(folder / "model.safetensors")
        assert encoder.config()["kind"] == kind and encoder.latent_dtype() == "float16"
        out = encoder.encode(clips)
        assert out.latents.dtype == np.float16 and out.latents.shape[1:] == encoder.latent_shape(8, (32, 48))
        assert out.images["content"].shape == (2, 3, 32, 48) and out.images["content"].dtype == np.uint8
        model.eval()
        x = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        with torch.no_grad():
            if kind == "reducio":
                want = model.normalize_latent(model.encode(x)[0])
                assert np.array_equal(out.images["content"], clips[:, 3].transpose(0, 3, 1, 2))   # centre (T-1)//2
            else:
                _, z_x, z_y = model.encode(x)
                want = torch.cat([z_x, z_y], dim=-1)
        assert np.allclose(out.latents.astype(np.float32), want.numpy(), atol=2e-2, rtol=1e-2)
        with pytest.raises(UserError, match="does not fit"):
            encoder.latent_shape(8, (30, 48))
    from hpcvid.config import EncoderSpec

    with pytest.raises(UserError, match="holds a 'cmd' model"):
        build_prep_encoder(EncoderSpec(kind="reducio", checkpoint=str(tmp_path / "cmd")))
