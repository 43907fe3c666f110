"""Measurement: FLOP/MAC accounting and activation memory, graph statistics of attention patterns,
and pictures of them."""

from longrange.analysis.advise import Advice, Candidate, advise, load_calibration, predict
from longrange.analysis.flops import (
    FlopRow,
    compare_counters,
    count_macs,
    flop_rows,
    linear_hook_macs,
    plot_macs,
    saved_activation_bytes,
)
from longrange.analysis.graph import GraphStats, HeadStats, graph_stats
from longrange.analysis.pictures import draw_pattern

__all__ = [
    "Advice", "Candidate", "advise", "load_calibration", "predict",
    "FlopRow", "GraphStats", "HeadStats", "compare_counters", "count_macs", "draw_pattern", "flop_rows",
    "graph_stats", "linear_hook_macs", "plot_macs", "saved_activation_bytes",
]
