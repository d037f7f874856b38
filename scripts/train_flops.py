"""Model FLOPs per training sample as the trainer counts them (bigasp.flops.TrainFlops), on `meta`.

    .venv/bin/python scripts/train_flops.py [--preset sdxl-base] [--res 1024x1024] [--chunks 1 2 3]

Prints one row per (chunks, TE1 trained) so docs/PERFORMANCE.md can quote the MFU denominator.
"""

from __future__ import annotations

import argparse
import time

from bigasp.flops import TrainFlops
from bigasp.models import build_preset


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="sdxl-base")
    ap.add_argument("--res", default="1024x1024", help="HEIGHTxWIDTH in pixels")
    ap.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 3])
    args = ap.parse_args()
    h, w = (int(x) // 8 for x in args.res.split("x"))
    print("| preset | res | chunks | TE1 trained | TFLOP/sample (fwd+bwd) | count time (s) |")
    print("|---|---|---|---|---|---|")
    for te1 in (True, False):
        model = build_preset(args.preset, ("unet", "text_encoder", "text_encoder_2"), device="meta")
        model.unet.requires_grad_(True)
        model.text_encoder_2.requires_grad_(False)
        model.text_encoder.requires_grad_(te1)
        if te1:  # as the trainer: the penultimate-layer conditioning never reaches the last layer
            inner = getattr(model.text_encoder, "text_model", model.text_encoder)  # transformers 4 vs 5
            inner.encoder.layers[-1].requires_grad_(False)
            inner.final_layer_norm.requires_grad_(False)
        counter = TrainFlops(model.unet, model.text_encoder, model.text_encoder_2)
        for n in args.chunks:
            t = time.perf_counter()
            f = counter.per_sample(h, w, n)
            dt = time.perf_counter() - t
            print(f"| {args.preset} | {args.res} | {n} | {te1} | {f / 1e12:.3f} | {dt:.1f} |")


if __name__ == "__main__":
    main()
