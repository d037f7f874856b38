"""Model FLOPs per training sample as the trainer counts them (bigasp.train.flops), on `meta`.

    .venv/bin/python scripts/train_flops.py [--preset sdxl-base] [--res 1024x1024] [--chunks 1 2 3]

Prints one row per (chunks, TE1 trained) so docs/PERFORMANCE.md can quote the MFU denominator.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

from bigasp.models import build_preset
from bigasp.train.flops import FlopCounter


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="sdxl-base")
    ap.add_argument("--res", default="1024x1024", help="HEIGHTxWIDTH in pixels")
    ap.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 3])
    args = ap.parse_args()
    h, w = (int(x) // 8 for x in args.res.split("x"))
    model = build_preset(args.preset, ("unet", "text_encoder", "text_encoder_2"), device="meta")
    print("| preset | res | chunks | TE1 trained | TFLOP/sample | count time (s) |")
    print("|---|---|---|---|---|---|")
    for te1 in (True, False):
        cfg = SimpleNamespace(model=SimpleNamespace(train_text_encoder=te1, train_text_encoder_2=False))
        counter = FlopCounter(model, cfg)
        for n in args.chunks:
            t = time.perf_counter()
            f = counter.per_sample(h, w, n)
            print(
                f"| {args.preset} | {args.res} | {n} | {te1} | {f / 1e12:.3f} | {time.perf_counter() - t:.1f} |"
            )


if __name__ == "__main__":
    main()
