"""`longrange advise`: which attention for this length, machine, memory budget and job.

    advice = lr.analysis.advise(16384, job="training", memory_budget="2GiB",
                                calibration="bench-results/calibration.json")
    advice.choice           # the fastest candidate that fits (a Candidate), or None
    print(advice.table())   # every candidate: predicted time and memory, or why it was ruled out

The cost model, for one attention layer at length n and batch B (what `longrange bench` measures):

- time = MACs / rate. MACs: what the module computes on its path (`module.macs(n)`, the count
  `longrange flops` prints and tests/test_flops.py checks against FlopCounterMode), x3 for training
  (forward + backward). Rate: with a calibration file (`longrange bench` writes calibration.json beside
  results.json) the mechanism's own measured MACs per second on this machine, interpolated in log n
  between the measured lengths and held flat beyond them; otherwise the dense matmul probe's rate (the
  file's, or measured now) times EFFICIENCY.
- memory = activation bytes x a measured factor. Activation bytes: what autograd saves for one training
  forward (`saved_activation_bytes`), measured at ACTIVATION_LENGTHS and extended as a·n + b·n². Factor:
  the bench's peak-memory growth over those bytes at the calibrated lengths, per mode (interpolated the
  same way); 1 without calibration.

Candidates: every registered mechanism (or those named), with the calibration's options (else the
config defaults); a causal job uses the causal variant. Ruled out, each with its reason: no causal
variant; not exact softmax attention over a graph when `exact=True` (a mechanism is exact when its
oracle is `Attention.reference_attend`, softmax over its `dense_mask`; low-rank, kernel, hashing and
relative-position models bring their own oracle); predicted memory above the budget; a build or
measurement error. The rest are ranked by predicted time.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from longrange.analysis.flops import build_for_length, saved_activation_bytes
from longrange.core.config import ConfigError
from longrange.core.interface import Attention
from longrange.measure import matmul_probe
from longrange.mechanisms import ATTENTIONS, capabilities, list_attentions

CALIBRATION_FORMAT = "longrange-calibration/1"
#: dense-matmul rate a mechanism is assumed to reach without calibration
EFFICIENCY = 0.5
#: lengths the activation bytes are measured at (then extended as a·n + b·n²)
ACTIVATION_LENGTHS = (1024, 2048)
JOBS = {"inference": "fwd", "training": "fwdbwd"}
MIB = 2**20
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


@dataclasses.dataclass
class Candidate:
    """One mechanism and config: its predictions, and why it was ruled out (None: it qualifies)."""

    mechanism: str
    options: dict[str, Any]
    exact: bool
    macs: int | None = None  # for the job: forward, or forward + backward (x3)
    time_ms: float | None = None
    memory_mb: float | None = None
    basis: str = ""  # what the predictions rest on
    ruled_out: str | None = None
    rank: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Advice:
    n: int
    job: str
    causal: bool
    exact: bool
    device: str
    memory_budget_mb: float | None
    calibration: str | None
    candidates: list[Candidate]  # ranked ones first (fastest first), then the ruled-out ones

    @property
    def choice(self) -> Candidate | None:
        return next((c for c in self.candidates if c.ruled_out is None), None)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["choice"] = None if self.choice is None else self.choice.mechanism
        return d

    def table(self) -> str:
        """A Markdown table: rank, mechanism, options, predicted time and memory, basis, ruled out because."""
        budget = "no memory budget" if self.memory_budget_mb is None else f"budget {self.memory_budget_mb:,.0f} MiB"
        lines = [f"{self.job}, n = {self.n}, {'causal' if self.causal else 'bidirectional'}, "
                 f"{'exact only' if self.exact else 'approximate allowed'}, {self.device}, {budget}",
                 "", "| rank | mechanism | options | time ms | memory MiB | basis | ruled out because |",
                 "|---|---|---|---|---|---|---|"]
        for c in self.candidates:
            opts = ", ".join(f"{k}={v}" for k, v in c.options.items() if k != "causal") or "-"
            lines.append(f"| {c.rank or '-'} | {c.mechanism} | {opts} | {_fmt(c.time_ms)} | {_fmt(c.memory_mb)} | "
                         f"{c.basis} | {c.ruled_out or ''} |")
        return "\n".join(lines)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:,.0f}" if x >= 10 else f"{x:.2f}"


# -- inputs ------------------------------------------------------------------------------------------------------
def parse_bytes(value) -> int | None:
    """'2GiB', '512 MiB', '1.5G', 3e9 -> bytes (K/M/G/T alone are binary); None stays None."""
    if value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
        return None if value is None else int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m[2].lower() not in _UNITS:
        raise ConfigError(f"memory budget must be a size like 2GiB, 512MiB or a number of bytes, got {value!r}",
                          "memory_budget")
    return int(float(m[1]) * _UNITS[m[2].lower()])


def load_calibration(path) -> dict[str, Any]:
    """A calibration.json written by `longrange bench` (a file, or the results folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / "calibration.json"
    if not path.is_file():
        raise ConfigError(f"no calibration file at {path}: run `longrange bench --out DIR` first (it writes "
                          "DIR/calibration.json)", "calibration")
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"cannot read the calibration file {path}: {err}", "calibration") from None
    if not isinstance(data, dict) or data.get("format") != CALIBRATION_FORMAT:
        raise ConfigError(f"{path} is not a longrange calibration file (format {CALIBRATION_FORMAT})", "calibration")
    data["path"] = str(path)
    return data


def is_exact(name: str) -> bool:
    """Softmax attention over the mechanism's graph: its oracle is the base `reference_attend`."""
    return ATTENTIONS.get(name)[1].reference_attend is Attention.reference_attend


# -- the model -----------------------------------------------------------------------------------------------------
def _points(calib, name, mode, device, dtype) -> list[dict[str, Any]]:
    if calib is None:
        return []
    rows = [p for p in calib["points"] if p["mechanism"] == name and p["mode"] == mode
            and p.get("device", "cpu") == device and p.get("dtype", "fp32") == dtype and p.get("time_ms")]
    return sorted(rows, key=lambda p: p["n"])


def interpolate(points: list[tuple[int, float]], n: int) -> float | None:
    """Value at n from (length, value) pairs: linear in log n between them, flat beyond them (log-space)."""
    pts = [(math.log(x), math.log(y)) for x, y in points if y and y > 0]
    if not pts:
        return None
    x = math.log(n)
    if x <= pts[0][0]:
        return math.exp(pts[0][1])
    if x >= pts[-1][0]:
        return math.exp(pts[-1][1])
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= x <= x1:
            w = 0 if x1 == x0 else (x - x0) / (x1 - x0)
            return math.exp(y0 + w * (y1 - y0))
    return None  # pragma: no cover


def forward_macs(name: str, n: int, dim: int, heads: int, options: dict, global_tokens: int) -> int:
    module = build_for_length(name, n, dim, heads, options)
    g = global_tokens if capabilities(name).global_tokens else 0
    return (module.macs(n, global_tokens=g) if g else module.macs(n)).total


@functools.lru_cache(maxsize=256)
def _activation_fit(name: str, options_json: str, dim: int, heads: int) -> tuple[float, float]:
    """(a, b) with saved activation bytes ~ a·n + b·n², from ACTIVATION_LENGTHS (batch 1, fp32)."""
    (n0, n1), options = ACTIVATION_LENGTHS, json.loads(options_json)
    torch.manual_seed(0)
    y0, y1 = (saved_activation_bytes(build_for_length(name, n, dim, heads, options), n, dim) for n in (n0, n1))
    b = max((y1 / n1 - y0 / n0) / (n1 - n0), 0.0)
    a = max(y0 / n0 - b * n0, 0.0)
    return a, b


def activation_bytes(name: str, n: int, dim: int, heads: int, options: dict) -> float:
    """Bytes autograd saves for one training forward at length n, batch 1 (measured short, extended)."""
    a, b = _activation_fit(name, json.dumps(options, sort_keys=True, default=str), dim, heads)
    return a * n + b * n * n


def predict(name: str, n: int, *, job: str = "inference", dim: int = 768, heads: int = 12, batch: int = 1,
            options: dict | None = None, device: str = "cpu", dtype: str = "fp32", calibration=None,
            global_tokens: int = 1, probe_gflops: float | None = None) -> Candidate:
    """Predicted time and memory of mechanism `name` at length n for `job` (no ruling out)."""
    mode = JOBS[job]
    options = dict(options or {})
    cand = Candidate(name, options, is_exact(name))
    factor = 3 if mode == "fwdbwd" else 1
    macs = forward_macs(name, n, dim, heads, options, global_tokens) * batch
    cand.macs = macs * factor
    pts = _points(calibration, name, mode, device, dtype)
    rates = [(p["n"], p["flops"] / 2 / p["time_ms"] * batch / max(p.get("batch", 1), 1))
             for p in pts if p.get("flops")]  # MACs per ms, calibrated (x3 already in fwdbwd flops)
    rate = interpolate(rates, n)
    if rate is not None:
        cand.time_ms = cand.macs / rate
        cand.basis = f"calibrated {mode} at n={','.join(_k(p['n']) for p in pts)}"
    elif probe_gflops:
        cand.time_ms = cand.macs / (probe_gflops * 1e9 / 2 * EFFICIENCY / 1e3)
        cand.basis = f"matmul probe x {EFFICIENCY}"
    act = activation_bytes(name, n, dim, heads, options) * batch
    mem = [(p["n"], p["mem_mb"] * MIB / (activation_bytes(name, p["n"], dim, heads, options) * p.get("batch", 1)))
           for p in pts if (p.get("mem_mb") or 0) >= 1]
    ratio = interpolate(mem, n)
    cand.memory_mb = act * (1.0 if ratio is None else ratio) / MIB
    if ratio is None:
        cand.basis += ", memory = saved activations" if cand.basis else "memory = saved activations"
    return cand


def _k(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def advise(n: int, *, job: str = "inference", causal: bool = False, exact: bool = True, memory_budget=None,
           device: str = "cpu", dtype: str = "fp32", dim: int = 768, heads: int = 12, batch: int = 1,
           mechanisms: list[str] | tuple[str, ...] | None = None, options: dict[str, dict] | None = None,
           calibration=None, global_tokens: int = 1) -> Advice:
    """Rank the mechanisms for one attention layer at length n (see the module docstring for the model).

    job: "inference" (forward) or "training" (forward + backward); causal: the job needs a causal
    variant; exact: only softmax attention over a graph (False also admits low-rank, kernel, hashing and
    relative-position models); memory_budget: bytes or a size like "2GiB" (None: no limit); calibration:
    a calibration.json (or its results folder, or the loaded dict) from `longrange bench` on this machine;
    mechanisms: the candidates (default: the calibrated ones, else every registered one); options:
    {mechanism: {option: value}} over the calibration's (else the config defaults)."""
    if job not in JOBS:
        raise ConfigError(f"job must be one of {list(JOBS)}, got {job!r}", "job")
    if not isinstance(n, int) or n <= 0:
        raise ConfigError(f"length must be a positive int, got {n!r}", "length")
    budget = parse_bytes(memory_budget)
    calib = load_calibration(calibration) if isinstance(calibration, (str, Path)) else calibration
    names = list(mechanisms) if mechanisms else _default_names(calib)
    for name in names:
        if name not in list_attentions():
            raise ConfigError(f"unknown mechanism {name!r}; registered: {', '.join(list_attentions())}", "mechanisms")
    probe = _probe(calib, device, dim, dtype)
    rows = []
    for name in names:
        opts = {**_calibrated_options(calib, name), **((options or {}).get(name) or {})}
        if causal and capabilities(name).causal:
            opts["causal"] = True
        cand = Candidate(name, opts, is_exact(name))
        try:
            cand = predict(name, n, job=job, dim=dim, heads=heads, batch=batch, options=opts, device=device,
                           dtype=dtype, calibration=calib, global_tokens=global_tokens, probe_gflops=probe)
        except (TypeError, ValueError, RuntimeError) as err:  # a config it cannot take, a failed measurement
            cand.ruled_out = f"cannot run: {err}"[:200]
        cand.ruled_out = cand.ruled_out or _why_not(name, cand, causal, exact, budget)
        rows.append(cand)
    ranked = sorted((c for c in rows if c.ruled_out is None),
                    key=lambda c: (math.inf if c.time_ms is None else c.time_ms, c.macs or 0))
    for i, c in enumerate(ranked, 1):
        c.rank = i
    out = ranked + [c for c in rows if c.ruled_out is not None]
    return Advice(n, job, causal, exact, device, None if budget is None else budget / MIB,
                  None if calib is None else calib.get("path", "given"), out)


def _why_not(name, cand: Candidate, causal: bool, exact: bool, budget: int | None) -> str | None:
    if causal and not capabilities(name).causal:
        return "no causal variant"
    if exact and not cand.exact:
        return "not exact softmax attention over a graph (approximate allowed: --approximate)"
    if budget is not None and cand.memory_mb is not None and cand.memory_mb * MIB > budget:
        return f"predicted memory {cand.memory_mb:,.0f} MiB > budget {budget / MIB:,.0f} MiB"
    return None


def _default_names(calib) -> list[str]:
    if calib is not None:
        names = sorted({p["mechanism"] for p in calib["points"]} & set(list_attentions()))
        if names:
            return names
    return list_attentions()


def _calibrated_options(calib, name: str) -> dict[str, Any]:
    """The options the calibration measured `name` with (its last point's)."""
    pts = [p for p in (calib or {}).get("points", []) if p["mechanism"] == name]
    return dict(pts[-1].get("options") or {}) if pts else {}


def _probe(calib, device: str, dim: int, dtype: str) -> float | None:
    """GFLOP/s of the dense matmul: the calibration's, else measured now (when the device is here)."""
    if calib is not None and calib.get("machine", {}).get("probe_gflops"):
        return float(calib["machine"]["probe_gflops"])
    if device == "cuda" and not torch.cuda.is_available():
        return None
    return matmul_probe(dim=dim, threads=torch.get_num_threads(), device=device, dtype=dtype)["gflops"]
