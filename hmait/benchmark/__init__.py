"""Measuring speed and memory: one timer, one memory measure, one hardware record and one table
writer (:mod:`hmait.benchmark.measure`), used by the model comparison against timm's Swin
(:mod:`hmait.benchmark.models`) and the masked-attention operator benchmark
(:mod:`hmait.benchmark.attention`). The command-line tools are ``tools/analysis/benchmark.py``
and ``tools/analysis/benchmark_attention.py``.
"""
from .measure import hardware_record, markdown_table, peak_memory_mib, record, time_alternating

__all__ = ['hardware_record', 'markdown_table', 'peak_memory_mib', 'record', 'time_alternating']
