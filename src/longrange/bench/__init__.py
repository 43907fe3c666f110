"""`longrange bench`: how one attention layer's time and memory scale with sequence length.

    from longrange.bench import make_settings, run_bench
    result = run_bench(make_settings("quick", lengths="1024,2048"))

Each (mechanism, length, mode) point runs in a fresh process (`longrange.bench.point`) for honest
peak memory; peers from other libraries (`hf-longformer`, `hf-bigbird`) run through the same
harness when installed. Results go to CSV/JSON plus a log-log plot with fitted slopes.
"""

from longrange.bench.harness import PRESETS, BenchSettings, make_settings, run_bench, run_point_subprocess
from longrange.bench.report import fit_slope, plot_scaling, slopes
from longrange.bench.specs import PEERS, known_mechanisms, layer_flops

__all__ = [
    "PEERS", "PRESETS", "BenchSettings", "fit_slope", "known_mechanisms", "layer_flops",
    "make_settings", "plot_scaling", "run_bench", "run_point_subprocess", "slopes",
]
