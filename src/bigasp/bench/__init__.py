"""Throughput benchmarks (`bigasp bench ...`): every figure in docs/PERFORMANCE.md comes from here.

Each bench prints one pasteable Markdown table row and can write a JSON record, so runs on
different machines or commits compare field by field.
"""

# Dense bf16/fp16 tensor-core peak of one H100 SXM (spec sheet; ../shared/reference/performance.md).
# Here, not in common.py, so `bigasp --help` need not import torch.
H100_BF16_PEAK_TFLOPS = 989.4
