"""Train the tiny demo VAE that ships in `src/bigasp/demo/assets/vae/`.

Why a trained VAE: a random-init VAE's latents carry little of the image, so a demo that
encodes with it could never show a model learning colours and shapes. This script trains a
small diffusers `AutoencoderKL` (SDXL family: 4 latent channels, 8x downsampling) on the
demo's synthetic photos, on CPU, in a few minutes, deterministically for a seed and thread
count. It then sets `scaling_factor` so scaled latents have unit std, as SDXL's 0.13025
does for its own VAE.

    .venv/bin/python scripts/train_demo_vae.py            # rewrites the shipped weights
    .venv/bin/python scripts/train_demo_vae.py --out /tmp/vae --steps 100
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bigasp.demo.synthetic import sample_images
from bigasp.demo.vae import DEMO_VAE_DIR, VAE_CONFIG, image_to_tensor

CROP = 64


def training_tensor(n: int, seed: int) -> torch.Tensor:
    """`n` photos (30% degraded, like the dataset), resized so the short side is 64, centre-cropped."""
    from PIL import Image

    out = []
    for img in sample_images(n, seed=seed, degraded_fraction=0.3):
        s = CROP / min(img.size)
        img = img.resize((max(CROP, round(img.width * s)), max(CROP, round(img.height * s))), Image.LANCZOS)
        left, top = (img.width - CROP) // 2, (img.height - CROP) // 2
        out.append(image_to_tensor(img.crop((left, top, left + CROP, top + CROP))))
    return torch.stack(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEMO_VAE_DIR)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--patch", type=int, default=64, help="train on random square patches of this side")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--colour-weight", type=float, default=4.0, help="weight of the 8x8-pooled colour loss")
    ap.add_argument(
        "--norm-groups", type=int, default=0, help="override the preset's norm_num_groups (0 = keep)"
    )
    ap.add_argument(
        "--latent-colour-weight", type=float, default=2.0, help="weight of the latent colour term"
    )
    ap.add_argument("--kl", type=float, default=1e-6, help="KL weight (small: we want sharp reconstructions)")
    ap.add_argument("--seed", type=int, default=1234, help="data seed; the demo's own photos use other seeds")
    ap.add_argument("--threads", type=int, default=1, help="fixed so the result is reproducible")
    args = ap.parse_args()

    from diffusers import AutoencoderKL

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(args.seed)
    data = training_tensor(args.images, args.seed)
    cfg = dict(VAE_CONFIG)
    if args.norm_groups:
        cfg["norm_num_groups"] = args.norm_groups
    vae = AutoencoderKL.from_config(cfg)
    with torch.no_grad():
        # Start the posterior log-variance near exp(-6): sampled latents are then almost the mean from
        # step 0, so the decoder learns sharp colours instead of averaging over unit-variance noise
        # (which it otherwise does for hundreds of steps). It stays trainable.
        vae.quant_conv.bias[VAE_CONFIG["latent_channels"] :] = -6.0
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / args.steps))
    )
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for step in range(args.steps):
        idx = torch.randint(len(data), (args.batch,), generator=gen).tolist()
        offs = torch.randint(CROP - args.patch + 1, (args.batch, 2), generator=gen).tolist()
        x = torch.stack(
            [data[i, :, t : t + args.patch, c : c + args.patch] for i, (t, c) in zip(idx, offs, strict=True)]
        )
        flip = torch.rand(args.batch, generator=gen) < 0.5  # cheap augmentation, keyed like the rest
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        y = vae.decode(z).sample
        # The pooled term weights each 8x8 block's mean colour heavily: flat colours are what the demo's
        # metrics read, and plain per-pixel losses learn them slowly (images decode with colour casts).
        pooled = torch.nn.functional.avg_pool2d(y - x, 8)
        rec = (y - x).abs().mean() + (y - x).pow(2).mean() + args.colour_weight * pooled.abs().mean()
        # Latent channels 0-2 track the 8x8 mean colour (as SDXL's latents do, roughly): without this the
        # encoder's GroupNorms, on flat-colour images, keep little more than the sign of each colour edge
        # and red/yellow (or green/blue) decode alike.
        aux = (post.mean[:, :3] - torch.nn.functional.avg_pool2d(x, 8)).abs().mean()
        rec = rec + args.latent_colour_weight * aux
        kl = post.kl().mean() / x[0].numel()
        loss = rec + args.kl * kl * x[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  rec {rec.item():.4f}  kl/dim {kl.item():.3f}  {time.time() - t0:.0f}s")

    vae.eval()
    with torch.no_grad():
        lat = torch.cat([vae.encode(data[i : i + 64]).latent_dist.mean for i in range(0, len(data), 64)])
    std = float(lat.std())
    vae.register_to_config(scaling_factor=round(1.0 / std, 5), shift_factor=None)
    print(f"latent std {std:.4f} -> scaling_factor {1.0 / std:.5f}; mean {float(lat.mean()):.4f}")

    # Atomic replace of the output folder: write beside it, then rename.
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".vae-", dir=args.out.parent))
    vae.save_pretrained(str(tmp), safe_serialization=True)
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["_bigasp_note"] = "trained by scripts/train_demo_vae.py " + json.dumps(
        {k: v for k, v in vars(args).items() if k != "out"}
    )
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if args.out.exists():
        shutil.rmtree(args.out)
    os.replace(tmp, args.out)
    size = sum(p.stat().st_size for p in args.out.iterdir())
    print(
        f"wrote {args.out} ({size / 1e6:.2f} MB) in {time.time() - t0:.0f}s; params "
        f"{sum(p.numel() for p in vae.parameters())}; data mean abs {float(np.abs(data.numpy()).mean()):.3f}"
    )


if __name__ == "__main__":
    main()
