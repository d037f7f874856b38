"""Throughput benchmarks (`bigasp bench ...`): every figure in docs/PERFORMANCE.md comes from here.

Each bench prints one pasteable Markdown table row and can write a JSON record, so runs on
different machines or commits compare field by field.
"""
