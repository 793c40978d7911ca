"""Training components shared by the training stages: checkpoints, metrics and images, losses, model set-up.

    checkpoint.py   step folders with safetensors weights and weights_only optimizer state; latest valid; keep k
    metrics.py      PSNR, SSIM, the metrics JSONL log, PNG contact sheets and curves (no plotting library needed)
    losses.py       KL, hinge GAN with a 3D PatchGAN discriminator and its adaptive weight
    autoencoder.py  Reducio-VAE / CMD behind one interface: build from a preset, train/eval passes, compression
    distributed.py  data parallelism applied from outside the model (DDP or FSDP2) and full state dicts
"""
