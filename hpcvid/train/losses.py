"""Autoencoder losses beyond L1 (METHODS.md §1): KL of the posterior, SSIM, and a hinge GAN with a 3D PatchGAN.

The paper's perceptual term is LPIPS on VGG features; without pretrained weights offline, 1 - SSIM stands in for it
(weighted by loss.ssim). The GAN follows the latent-diffusion autoencoders: hinge loss, a PatchGAN discriminator
(here 3D: it judges space-time patches), and an adaptive weight that balances its gradient against the
reconstruction gradient at the decoder's last layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hpcvid.train.metrics import ssim

ADAPTIVE_WEIGHT_MAX = 1e4     # clamp of the adaptive GAN weight, as in the latent-diffusion autoencoders
LEAKY_SLOPE = 0.2


def kl_per_clip(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over each clip's latent: (B,)."""
    return 0.5 * (mean.float() ** 2 + logvar.float().exp() - 1.0 - logvar.float()).flatten(1).sum(dim=1)


def ssim_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - SSIM, averaged over the batch (frames and channels inside ssim())."""
    return 1.0 - ssim(recon, target).mean()


class PatchDiscriminator3d(nn.Module):
    """A 3D PatchGAN: strided 3D convs that halve H and W (T kept), GroupNorm, LeakyReLU; one logit per patch.

    layers=3, channels=64 are the paper's settings (METHODS.md §1). GroupNorm instead of BatchNorm keeps it free of
    cross-rank batch statistics.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv3d(in_channels, channels, (3, 4, 4), (1, 2, 2), 1),
                                   nn.LeakyReLU(LEAKY_SLOPE)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2 ** i, 8)
            stride = (1, 2, 2) if i < layers else (1, 1, 1)
            blocks += [nn.Conv3d(width, out, (3, 4, 4), stride, 1, bias=False), nn.GroupNorm(min(32, out), out),
                       nn.LeakyReLU(LEAKY_SLOPE)]
            width = out
        blocks.append(nn.Conv3d(width, 1, (3, 4, 4), 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.net(video)                                   # (B, 1, T', h, w) patch logits


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """||d rec / d last|| / ||d g / d last||, clamped: the GAN term's gradient scaled to the reconstruction's."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, ADAPTIVE_WEIGHT_MAX).detach()
