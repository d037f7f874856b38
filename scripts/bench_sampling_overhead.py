"""Host-side cost of bigasp's sampling loop, without the UNet.

Replaces the UNet with a stub that returns its input, so what is timed is everything bigasp
adds per step: the guided denoiser (batch assembly, timestep, CFG/PAG combination) and the
sampler update, on a tiny latent so tensor arithmetic is negligible. Also times the schedules
(beta inverts the Beta CDF in Python). On a GPU this overhead overlaps the UNet's kernels
because the loop never syncs; the figure says how much CPU time a step needs.

Usage: OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_sampling_overhead.py [--steps 200]
"""

from __future__ import annotations

import argparse
import time

import torch

from bigasp.sample import sigmas
from bigasp.sample.guidance import Conditioning, GuidedDenoiser
from bigasp.sample.model_sampling import model_sampling
from bigasp.sample.samplers import iid_noise_sampler, run_sampler


class StubUNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=True):
        return (sample,)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cond = Conditioning(torch.zeros(1, 154, 64), torch.zeros(1, 32), torch.zeros(1, 6))
    print("| sampler | kind | guidance | µs/step |")
    print("|---|---|---|---|")
    for kind, name in (("flow", "euler"), ("eps", "dpmpp_2m_sde"), ("eps", "dpmpp_3m_sde")):
        ms = model_sampling(kind, 1.0)
        sig = sigmas(kind, "karras", args.steps).tolist()
        for label, cfg, pag in (("CFG", 3.0, 0.0), ("CFG+PAG", 3.0, 2.0)):
            den = GuidedDenoiser(StubUNet(), ms, cond, cond, cfg=cfg, pag=pag)
            x = torch.randn(1, 4, 8, 8)
            ns = iid_noise_sampler(x, torch.Generator().manual_seed(0))
            run_sampler(name, den, x, sig[:4], ms=ms, noise_sampler=ns)
            t = time.perf_counter()
            run_sampler(name, den, x, sig, ms=ms, noise_sampler=ns)
            per = (time.perf_counter() - t) / args.steps * 1e6
            print(f"| {name} | {kind} | {label} | {per:.0f} |")
    print()
    print("| schedule | steps | ms |")
    print("|---|---|---|")
    for sched, kind in (("beta", "flow"), ("normal", "flow"), ("karras", "eps")):
        t = time.perf_counter()
        sigmas(kind, sched, 30, 1.0)
        print(f"| {sched} ({kind}) | 30 | {(time.perf_counter() - t) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
