"""Pyramidal and full flow matching (hpcvid.flow, METHODS.md §3): windows, path end points, training pairs, the jump's
marginal, block noise, samplers with an oracle velocity, seeds, token counts.

Reference formulas here are written independently of the library (avg_pool3d for Down, interpolate for Up).
Statistical checks compare estimates with their standard errors: a tolerance of Z_ALPHA(m) standard errors, with m
the number of checks in the test, keeps the chance of a false alarm under ALPHA for the whole test (Bonferroni);
the seeds are fixed, so a run is deterministic anyway.
"""
from __future__ import annotations

import math
import time
from statistics import NormalDist

import pytest
import torch
import torch.nn.functional as F

from hpcvid.flow import (PyramidalFlow, block_noise, combine_guidance, default_windows, jump_coefficients,
                         make_flow, sample, text_dropout_mask, up2)

ALPHA = 1e-4                   # chance that a correct implementation fails one statistical test


def z_bound(num_checks: int) -> float:
    """Two-sided normal quantile for ALPHA spread over `num_checks` checks."""
    return NormalDist().inv_cdf(1.0 - ALPHA / (2 * num_checks))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def ref_down(x: torch.Tensor, f: int) -> torch.Tensor:
    return F.avg_pool3d(x, (1, f, f)) if f > 1 else x


def ref_up(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")


def ref_endpoints(flow: PyramidalFlow, x1: torch.Tensor, noise: torch.Tensor, k: int):
    """METHODS.md §3 start/end points of stage k, written out."""
    s, e = flow.windows[k]
    n_k = ref_down(noise, 2 ** k) * 2 ** k
    coarse = ref_up(ref_down(x1, 2 ** (k + 1))) if s > 0 else torch.zeros_like(n_k)
    return s * coarse + (1 - s) * n_k, e * ref_down(x1, 2 ** k) + (1 - e) * n_k


def marginal_errors(x: torch.Tensor, mean: torch.Tensor, sd: float) -> tuple[float, float]:
    """Largest |error| / standard error of the per-pixel means and of the pixel covariance matrix, for draws
    x (N, P) that should be N(mean (P,), sd^2 I). Returns (worst z, bound for these P + P(P+1)/2 checks)."""
    N, P = x.shape
    mean_z = (x.mean(0) - mean).abs() / (sd / math.sqrt(N))                             # (P,)
    cov = torch.cov(x.T)                                                                # (P, P)
    want = sd ** 2 * torch.eye(P, dtype=x.dtype)
    se = torch.full((P, P), sd ** 2 / math.sqrt(N), dtype=x.dtype)                      # off-diagonal: sd^2 / sqrt(N)
    se.diagonal().fill_(sd ** 2 * math.sqrt(2 / (N - 1)))                               # variance: sd^2 sqrt(2/(N-1))
    cov_z = ((cov - want).abs() / se).triu()
    return max(mean_z.max().item(), cov_z.max().item()), z_bound(P + P * (P + 1) // 2)


def oracle_velocity(flow: PyramidalFlow, x1: torch.Tensor, calls: list):
    """The exact velocity of the path towards one known x1: x(t) = m(t) + (1 - t) n on every stage, so
    n = (x - m(t)) / (1 - t) and dx/dt = m'(t) - n."""
    def velocity_fn(x, t, factor):
        calls.append((factor, t.clone(), x.clone()))
        k = int(math.log2(factor))
        s, e = flow.windows[k]
        assert x.shape[-2:] == (x1.shape[-2] // factor, x1.shape[-1] // factor)
        fine = ref_down(x1, factor)
        coarse = ref_up(ref_down(x1, 2 * factor)) if s > 0 else torch.zeros_like(fine)
        tt = t.view(-1, 1, 1, 1, 1)
        m = ((e - tt) * s * coarse + (tt - s) * e * fine) / (e - s)
        return (e * fine - s * coarse) / (e - s) - (x - m) / (1 - tt)
    return velocity_fn


# ---------------------------------------------------------------------------------------------------- windows, shapes

def test_default_windows_and_stage_shapes():
    flow = make_flow("pyramidal")
    assert flow.num_stages == 3 and flow.kind == "pyramidal"
    for (s, e), (s_want, e_want) in zip(flow.windows, [(1 / 2, 1), (1 / 5, 2 / 3), (0, 1 / 3)]):
        assert s == pytest.approx(s_want, abs=1e-15) and e == pytest.approx(e_want, abs=1e-15)
    assert [flow.factor(k) for k in range(3)] == [1, 2, 4]
    assert [flow.stage_shape((2, 4, 5, 32, 48), k) for k in range(3)] == [(2, 4, 5, 32, 48), (2, 4, 5, 16, 24),
                                                                          (2, 4, 5, 8, 12)]
    assert make_flow("full").windows == ((0.0, 1.0),) and make_flow("full").kind == "full"
    # ends split [0, 1] equally; every start sits where the paper's jump (g = 1/3) is exact: e_(k+1) = 2 s_k / (1 + s_k)
    for K in range(1, 6):
        windows = default_windows(K)
        assert [e for _, e in windows] == pytest.approx([(K - k) / K for k in range(K)])
        for k in range(K - 1):
            s = windows[k][0]
            assert windows[k + 1][1] == pytest.approx(2 * s / (1 + s))
    with pytest.raises(ValueError, match="divisible by 2"):
        flow.training_batches(torch.zeros(2, 1, 1, 12, 10))          # 10 is not divisible by 2^(3-1)


def test_jump_coefficients_are_the_papers_on_default_windows_and_derived_otherwise():
    for K in range(2, 6):
        windows = default_windows(K)
        for k in range(K - 1):
            s, e = windows[k][0], windows[k + 1][1]
            a, b, g = jump_coefficients(e, s)
            assert (a, b, g) == pytest.approx(((1 + s) / 2, math.sqrt(3) * (1 - s) / 2, 1 / 3), abs=1e-12)
    # a looser pair (the low stage denoises further than it must): still exact, with weaker anticorrelation
    a, b, g = jump_coefficients(0.6, 0.2)
    c = a * (1 - 0.6)
    assert a * 0.6 == pytest.approx(0.2) and 0 < g < 1 / 3
    assert b ** 2 * (1 + g) == pytest.approx(0.8 ** 2) and b ** 2 * g == pytest.approx(c ** 2)
    # touching windows (e_(k+1) = s_k), the literal reading of "split [0, 1] into thirds": no exact jump exists
    with pytest.raises(ValueError, match=r"2s / \(1 \+ s\)"):
        make_flow("pyramidal", windows=[(2 / 3, 1), (1 / 3, 2 / 3), (0, 1 / 3)])


# ---------------------------------------------------------------------------------------------------- training pairs

def test_endpoints_equal_the_formulas_at_both_ends_of_every_stage():
    flow = make_flow("pyramidal")
    x1 = torch.randn(2, 3, 2, 16, 16, generator=gen(1), dtype=torch.float64)
    noise = torch.randn(2, 3, 2, 16, 16, generator=gen(2), dtype=torch.float64)
    for k, (s, e) in enumerate(flow.windows):
        start, end = flow.endpoints(x1, noise, k)
        want_start, want_end = ref_endpoints(flow, x1, noise, k)
        assert start.shape == want_start.shape == (2, 3, 2, 16 >> k, 16 >> k)
        at_s = flow.point(start, end, k, torch.full((2,), s, dtype=torch.float64))
        at_e = flow.point(start, end, k, torch.full((2,), e, dtype=torch.float64))
        torch.testing.assert_close(at_s, want_start, rtol=0, atol=1e-12)
        torch.testing.assert_close(at_e, want_end, rtol=0, atol=1e-12)
    # the stage noise keeps unit variance at every size
    big = torch.randn(64, 1, 1, 32, 32, generator=gen(3))
    for k in range(3):
        n_k = ref_down(big, 2 ** k) * 2 ** k
        start, _ = flow.endpoints(torch.zeros_like(big), big, k)
        torch.testing.assert_close(start, (1 - flow.windows[k][0]) * n_k)
        assert abs(n_k.var().item() - 1) < 0.05


def test_training_pairs_lie_on_the_segment_and_the_target_is_its_slope():
    flow = make_flow("pyramidal")
    x1 = torch.randn(9, 2, 3, 16, 16, generator=gen(4), dtype=torch.float64)
    noise = torch.randn(9, 2, 3, 16, 16, generator=gen(5), dtype=torch.float64)
    batches = flow.training_batches(x1, gen(6), noise=noise)
    assert [b.stage for b in batches] == [0, 1, 2]
    h = 1e-6
    for b in batches:
        s, e = flow.windows[b.stage]
        start, end = ref_endpoints(flow, x1[b.index], noise[b.index], b.stage)
        frac = ((b.t - s) / (e - s)).view(-1, 1, 1, 1, 1)
        torch.testing.assert_close(b.x_t, start + frac * (end - start), rtol=0, atol=1e-12)
        torch.testing.assert_close(b.target, (end - start) / (e - s), rtol=0, atol=1e-12)
        slope = (flow.point(start, end, b.stage, b.t + h) - flow.point(start, end, b.stage, b.t - h)) / (2 * h)
        torch.testing.assert_close(b.target, slope, rtol=1e-6, atol=1e-6)
        # the noise part of the target is -n_k: the same unit scale on every stage (the chosen convention)
        pure_noise = flow.training_batches(torch.zeros_like(x1), gen(6), noise=noise)[b.stage]
        n_k = ref_down(noise[b.index], b.factor) * b.factor
        torch.testing.assert_close(pure_noise.target, -n_k, rtol=0, atol=1e-12)


def test_batch_split_covers_every_sample_once_with_t_in_its_window():
    flow = make_flow("pyramidal")
    x1 = torch.randn(10, 1, 2, 8, 8, generator=gen(7))
    batches = flow.training_batches(x1, gen(8))
    indices = torch.cat([b.index for b in batches])
    assert sorted(indices.tolist()) == list(range(10))
    assert [len(b.index) for b in batches] == [4, 3, 3]
    for b in batches:
        s, e = flow.windows[b.stage]
        assert b.factor == 2 ** b.stage and b.x_t.shape == (len(b.index), 1, 2, 8 >> b.stage, 8 >> b.stage)
        assert b.t.shape == b.index.shape and bool(((b.t >= s) & (b.t <= e)).all())
    # the deal is a seeded permutation, not the batch position
    deals = {tuple(make_flow("pyramidal").assign_stages(12, gen(seed)).tolist()) for seed in range(5)}
    assert len(deals) > 1 and all(sorted(d) == [0] * 4 + [1] * 4 + [2] * 4 for d in deals)
    # t is uniform over each window: over many draws it reaches both ends of every window
    many = flow.training_batches(torch.zeros(3000, 1, 1, 4, 4), gen(9))
    for b in many:
        s, e = flow.windows[b.stage]
        assert b.t.min() < s + 0.01 * (e - s) and b.t.max() > e - 0.01 * (e - s)
    assert len(flow.training_batches(torch.zeros(2, 1, 1, 4, 4), gen(0))) == 2     # fewer samples than stages


def test_full_flow_is_the_straight_line_from_noise_to_data():
    flow = make_flow("full")
    x1 = torch.randn(5, 2, 3, 6, 10, generator=gen(10), dtype=torch.float64)   # any H, W: no pyramid
    noise = torch.randn(5, 2, 3, 6, 10, generator=gen(11), dtype=torch.float64)
    (b,) = flow.training_batches(x1, gen(12), noise=noise)
    assert b.stage == 0 and b.factor == 1 and b.index.tolist() == list(range(5))
    t = b.t.view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(b.x_t, t * x1 + (1 - t) * noise, rtol=0, atol=1e-12)
    torch.testing.assert_close(b.target, x1 - noise, rtol=0, atol=1e-12)
    assert bool(((b.t >= 0) & (b.t <= 1)).all())


def test_text_dropout_mask():
    B, p = 20000, 0.1
    mask = text_dropout_mask(B, p, gen(13))
    assert mask.dtype == torch.bool and mask.shape == (B,)
    assert abs(mask.float().mean().item() - p) < z_bound(1) * math.sqrt(p * (1 - p) / B)
    assert torch.equal(mask, text_dropout_mask(B, p, gen(13)))
    assert not torch.equal(mask, text_dropout_mask(B, p, gen(14)))
    assert not text_dropout_mask(100, 0.0, gen(0)).any() and text_dropout_mask(100, 1.0, gen(0)).all()
    with pytest.raises(ValueError, match="must be in"):
        text_dropout_mask(4, 1.5)


# ---------------------------------------------------------------------------------------------------- jump renoising

def blocks_of(x: torch.Tensor) -> torch.Tensor:
    """(N, H, W) -> (N * H/2 * W/2, 4): the entries of every 2x2 block, row-major inside the block."""
    N, H, W = x.shape
    return x.reshape(N, H // 2, 2, W // 2, 2).permute(0, 1, 3, 2, 4).reshape(-1, 4)


def test_block_noise_has_the_block_covariance_and_makes_upsampled_noise_iid():
    N = 20000
    for g in (1 / 3, 0.2):
        noise = block_noise((N, 1, 1, 4, 4), g, gen(15), dtype=torch.float64)
        want = (1 + g) * torch.eye(4, dtype=torch.float64) - g * torch.ones(4, 4, dtype=torch.float64)
        # the 16 pixels of a 4x4 image (4 blocks): block-diagonal covariance, blocks independent
        pixels = noise.reshape(N, 16)
        cov = torch.cov(pixels.T)
        in_block = blocks_of(torch.arange(16.0).reshape(1, 4, 4)).long()             # (4 blocks, 4) pixel ids
        full_want = torch.zeros(16, 16, dtype=torch.float64)
        for ids in in_block:
            full_want[ids[:, None], ids[None, :]] = want
        se = torch.sqrt((full_want.diagonal()[:, None] * full_want.diagonal()[None, :] + full_want ** 2) / N)
        assert ((cov - full_want).abs() / se).max() < z_bound(16 * 17 // 2)
    # at g = 1/3 the block mean is exactly zero: the fresh noise is pure detail
    assert blocks_of(block_noise((50, 1, 1, 8, 8), 1 / 3, gen(16)).reshape(50, 8, 8)).mean(1).abs().max() < 1e-6
    # 1/2 Up(z) + sqrt(3)/2 n' (the jump's noise at s = 0) is i.i.d. with unit variance over a 4x4 image
    low = torch.randn(N, 1, 1, 2, 2, generator=gen(17), dtype=torch.float64)
    mixed = 0.5 * up2(low) + math.sqrt(3) / 2 * block_noise((N, 1, 1, 4, 4), 1 / 3, gen(18), dtype=torch.float64)
    worst, bound = marginal_errors(mixed.reshape(N, 16), torch.zeros(16, dtype=torch.float64), 1.0)
    assert worst < bound


def test_block_noise_is_one_batched_draw():
    """A 256x256 field of 2x2 blocks for a batch of 16 maps (262,144 blocks): a Python loop over blocks would take
    seconds; one batched draw takes milliseconds."""
    block_noise((1, 1, 1, 8, 8), 1 / 3, gen(0))                       # warm-up
    started = time.perf_counter()
    noise = block_noise((4, 4, 1, 256, 256), 1 / 3, gen(19))
    elapsed = time.perf_counter() - started
    assert noise.shape == (4, 4, 1, 256, 256) and elapsed < 0.5, f"{elapsed:.3f} s"


def test_jump_gives_the_next_stage_start_marginal():
    flow = make_flow("pyramidal")
    N = 4000
    x1 = 2 * torch.randn(1, 1, 1, 8, 8, generator=gen(20), dtype=torch.float64)       # one fixed clip
    noise = torch.randn(N, 1, 1, 8, 8, generator=gen(21), dtype=torch.float64)
    for k in (1, 0):                                                                   # jumps 2 -> 1, 1 -> 0
        s = flow.windows[k][0]
        _, x_end = flow.endpoints(x1.expand(N, -1, -1, -1, -1), noise, k + 1)
        x_start = flow.jump(x_end, k + 1, gen(22 + k))                                 # (N, 1, 1, 8>>k, 8>>k)
        want_mean = s * ref_up(ref_down(x1, 2 ** (k + 1)))                             # start formula's mean
        P = x_start[0].numel()
        worst, bound = marginal_errors(x_start.reshape(N, P), want_mean.reshape(P), 1 - s)
        assert worst < bound, f"jump {k + 1} -> {k}: worst z {worst:.1f} > {bound:.1f}"


def test_literal_formula_on_touching_windows_misses_the_marginal():
    """Why the default windows are not touching thirds: with e_2 = s_1 = 1/3 the paper's coefficients give mean
    s(1 + s)/2 U instead of s U, variance (1 - s)^2 (3 + (1 + s)^2) / 4 instead of (1 - s)^2, and covariance
    (1 - s)^2 ((1 + s)^2 - 1) / 4 instead of 0 inside each 2x2 block."""
    N, s = 4000, 1 / 3
    x1 = 2 * torch.randn(1, 1, 1, 8, 8, generator=gen(20), dtype=torch.float64)
    noise = torch.randn(N, 1, 1, 8, 8, generator=gen(21), dtype=torch.float64)
    n_2 = ref_down(noise, 4) * 4
    x_end = s * ref_down(x1, 4) + (1 - s) * n_2                                        # stage 2 ending at t = 1/3
    fresh = block_noise((N, 1, 1, 4, 4), 1 / 3, gen(23), dtype=torch.float64)
    literal = (1 + s) / 2 * up2(x_end) + math.sqrt(3) * (1 - s) / 2 * fresh
    worst, bound = marginal_errors(literal.reshape(N, 16), (s * ref_up(ref_down(x1, 4))).reshape(16), 1 - s)
    assert worst > 2 * bound                                  # the check above would catch it


# ---------------------------------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("kind", ["pyramidal", "full"])
def test_sampler_with_the_oracle_velocity_reaches_the_data(kind):
    flow = make_flow(kind)
    x1 = torch.randn(1, 2, 3, 16, 16, generator=gen(24), dtype=torch.float64)
    calls = []
    out = sample(flow, oracle_velocity(flow, x1, calls), (3, 2, 3, 16, 16), steps=5, generator=gen(25),
                 dtype=torch.float64)
    assert out.shape == (3, 2, 3, 16, 16) and out.dtype == torch.float64
    torch.testing.assert_close(out, x1.expand_as(out), rtol=0, atol=1e-8)
    factors = [f for f, _, _ in calls]
    assert factors == sum(([2 ** k] * 5 for k in reversed(range(flow.num_stages))), [])
    for f, t, _ in calls:
        s, e = flow.windows[int(math.log2(f))]
        assert t.shape == (3,) and bool(((t >= s) & (t < e)).all())


def test_sampler_state_after_each_jump_has_the_stage_start_marginal():
    flow = make_flow("pyramidal")
    N = 3000
    x1 = 2 * torch.randn(1, 1, 1, 8, 8, generator=gen(26), dtype=torch.float64)
    calls = []
    sample(flow, oracle_velocity(flow, x1, calls), (N, 1, 1, 8, 8), steps=(2, 3, 2), generator=gen(27),
           dtype=torch.float64)
    firsts = {}
    for factor, t, x in calls:
        firsts.setdefault(factor, (t, x))
    assert sorted(firsts) == [1, 2, 4] and len(calls) == 7
    for factor, (t, x) in firsts.items():
        k = int(math.log2(factor))
        s = flow.windows[k][0]
        assert torch.all(t == s)
        want_mean = s * ref_up(ref_down(x1, 2 * factor)) if s > 0 else torch.zeros_like(x[:1])
        P = x[0].numel()
        worst, bound = marginal_errors(x.reshape(N, P), want_mean.reshape(P), 1 - s)
        assert worst < bound, f"stage {k} start: worst z {worst:.1f} > {bound:.1f}"


def test_guidance_and_steps_validation():
    cond, uncond = torch.full((2, 3), 3.0), torch.full((2, 3), 1.0)
    assert torch.equal(combine_guidance(cond, uncond, 1.0), cond)
    assert torch.equal(combine_guidance(cond, uncond, 0.0), uncond)
    assert torch.equal(combine_guidance(cond, uncond, 7.0), torch.full((2, 3), 15.0))
    with pytest.raises(ValueError, match="one positive int per stage"):
        sample(make_flow("pyramidal"), lambda x, t, f: x, (1, 1, 1, 8, 8), steps=(2, 2))


# ---------------------------------------------------------------------------------------------------- seeds, dtypes

def test_seeds_give_identical_draws():
    flow = make_flow("pyramidal")
    x1 = torch.randn(6, 2, 2, 8, 8, generator=gen(28))

    def draws(seed):
        batches = flow.training_batches(x1, gen(seed))
        out = sample(flow, lambda x, t, f: -x, (2, 2, 2, 8, 8), steps=2, generator=gen(seed))
        return [b.x_t for b in batches] + [b.t for b in batches] + [b.index for b in batches] + [out]

    same = zip(draws(1), draws(1))
    assert all(torch.equal(a, b) for a, b in same)
    assert not all(torch.equal(a, b) for a, b in zip(draws(1), draws(2)) if a.shape == b.shape)
    assert torch.equal(block_noise((2, 8, 8), 1 / 3, gen(3)), block_noise((2, 8, 8), 1 / 3, gen(3)))


def test_dtypes_follow_the_data():
    flow = make_flow("pyramidal")
    for dtype, t_dtype in ((torch.float64, torch.float64), (torch.bfloat16, torch.float32)):
        (b, *_) = flow.training_batches(torch.randn(3, 1, 1, 8, 8).to(dtype), gen(0))
        assert b.x_t.dtype == b.target.dtype == dtype and b.t.dtype == t_dtype
        seen = []
        out = sample(flow, lambda x, t, f: seen.append(t.dtype) or -x, (1, 1, 1, 8, 8), steps=1, generator=gen(0),
                     dtype=dtype)
        assert out.dtype == dtype and set(seen) == {t_dtype}


# ---------------------------------------------------------------------------------------------------- cost, factory

def test_tokens_per_step():
    pyramid, full = make_flow("pyramidal"), make_flow("full")
    shape = (6, 16, 8, 64, 64)
    assert pyramid.tokens_per_step(shape, 2) / full.tokens_per_step(shape, 2) == (1 + 1 / 4 + 1 / 16) / 3
    assert full.tokens_per_step(shape, (2, 4, 4)) == 6 * 4 * 16 * 16
    # the count is what training_batches really feeds, also for a batch that does not split evenly
    x1 = torch.zeros(7, 1, 4, 32, 32)
    fed = sum(b.x_t.shape[0] * (b.x_t.shape[2] // 1) * (b.x_t.shape[3] // 2) * (b.x_t.shape[4] // 2)
              for b in pyramid.training_batches(x1, gen(0)))
    assert pyramid.tokens_per_step(x1.shape, (1, 2, 2)) == fed
    with pytest.raises(ValueError, match="not divisible by the patch"):
        pyramid.tokens_per_step((3, 1, 1, 16, 16), 8)                 # stage 2 is 4x4


def test_make_flow_names_and_errors():
    assert make_flow("pyramidal", num_stages=4).windows == default_windows(4)
    with pytest.raises(ValueError, match="unknown flow kind 'diffusion'"):
        make_flow("diffusion")
    with pytest.raises(ValueError, match="one stage"):
        make_flow("full", num_stages=3)
    with pytest.raises(ValueError, match="full-resolution stage 0 must end at t = 1"):
        make_flow("pyramidal", num_stages=2, windows=[(0.3, 0.9), (0.0, 0.5)])
