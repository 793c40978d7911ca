"""Training components shared by the training stages (train_ae, train): everything around a model but the model.

    checkpoint.py   step folders: safetensors weights + weights_only optimizer state, meta.json with sha256 of every
                    file, verified resume, pruning; full state dicts whatever the parallelism
    sharded.py      the same folders written with torch.distributed.checkpoint (each rank its shards)
    ema.py          an exponential moving average of the weights, in the model's own sharding
    preempt.py      SIGUSR2/SIGTERM: finish the step, save, hand the signal on (submitit requeues)
    runtime.py      device, threads, per-step seeds, warm-up + cosine, config presets with overrides, matmul peak
    metrics.py      PSNR, SSIM, temporal error; the strict JSONL + TensorBoard log
    pictures.py     PNG files, contact sheets, curves (Pillow, matplotlib)
    losses.py       KL, hinge GAN with a 3D PatchGAN discriminator and its adaptive weight
    autoencoder.py  Reducio-VAE / CMD behind one interface: build from a preset, train/eval passes, compression
"""
