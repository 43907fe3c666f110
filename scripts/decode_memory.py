"""Decoding memory against the number of generated tokens: the pattern-following cache stays flat.

    python scripts/decode_memory.py                         # local window 512 + 4 sinks vs full, 1K..64K
    python scripts/decode_memory.py --lengths 1024,4096 --hf   # also a tiny HF Llama on longrange-local
    python scripts/decode_memory.py --only full,hf --lengths 16384                # a subset

Each (model, attention, length) point runs in a fresh process (honest peak memory): a random
byte-level `CausalLM` (dim 128, 2 layers, no position table, so any length) generates N tokens
greedily from a 16-token prompt through `CausalLM.generate(cache=...)`; with `--hf`, a random
`LlamaForCausalLM` (dim 128, 2 layers, 4 query / 2 key-value heads, RoPE) on `longrange-local`
generates through `lr.hf.LongrangeCache`. Printed per point: the cache's bytes at the end and its
largest size on the way, the keys per layer it holds, the process's resident-set growth over the
set-up (`longrange.measure.MemoryMeter`) and tokens/s (a shared CPU: compare within one run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CONFIGS = {  # label -> (attention, options): the bounded cache and the growing one
    "local w=512 + 4 sinks": ("local", {"window": 1024, "sink_tokens": 4}),
    "full": ("full", {}),
}


def run_point(spec: dict) -> dict:
    import torch

    from longrange.measure import MemoryMeter

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    n = spec["n"]
    meter = MemoryMeter(torch.device("cpu"))
    sizes = []
    if spec["model"] == "hf":
        model, cache, prompt = _hf_model(spec)
        meter.start()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, cache=cache, pad_token_id=0,
                           streamer=_Every(1024, lambda: sizes.append(cache.nbytes())))
        keys = cache.memory_tokens()
    else:
        from longrange.models import CausalLM
        from longrange.models.memory import byte_lm_config

        cfg = byte_lm_config(spec["attention"], dim=128, heads=4, layers=2, ffn_dim=512, options=spec["options"])
        model = CausalLM(cfg).eval()
        prompt = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
        cache = model.new_cache()
        meter.start()
        t0 = time.perf_counter()
        count = [0]

        def every(_tokens):
            count[0] += 1
            if count[0] % 1024 == 0:
                sizes.append(cache.nbytes())

        model.generate(prompt, max_new_tokens=n, cache=cache, streamer=every)
        keys = cache.memory_tokens()
    seconds = time.perf_counter() - t0
    memory = meter.stop()
    return {**spec, "cache_bytes": cache.nbytes(), "cache_bytes_max": max(sizes + [cache.nbytes()]),
            "keys_per_layer": keys, "tokens_per_s": n / seconds, "rss_growth_mb": memory["mem_mb"]}


class _Every:
    """A transformers streamer calling `fn` every k generated tokens."""

    def __init__(self, k, fn):
        self.k, self.fn, self.count = k, fn, -1  # the first `put` is the prompt

    def put(self, value):
        self.count += 1
        if self.count and self.count % self.k == 0:
            self.fn()

    def end(self):
        pass


def _hf_model(spec):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import longrange as lr

    lr.hf.register()
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1 << 20,
                      bos_token_id=0, eos_token_id=None, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    model.set_attn_implementation("longrange-local")
    model.config.longrange = spec["options"]
    prompt = torch.randint(1, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    return model, lr.hf.LongrangeCache(), prompt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="1024,4096,16384,65536", help="generated tokens per point")
    p.add_argument("--full-max", type=int, default=16384, help="longest length for `full` (its cache grows)")
    p.add_argument("--hf", action="store_true", help="also a tiny HF Llama on longrange-local + LongrangeCache")
    p.add_argument("--hf-max", type=int, default=16384, help="longest length for the HF model")
    p.add_argument("--only", help="comma-separated subset of: local, full, hf (default: local, full, and hf with --hf)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (decoding is many small ops: 1 is fastest)")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--point", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.point:
        print(json.dumps(run_point(json.loads(args.point))), flush=True)
        return
    lengths = [int(x) for x in args.lengths.split(",")]
    only = set(args.only.split(",")) if args.only else {"local", "full"} | ({"hf"} if args.hf else set())
    points = []
    for label, (attention, options) in CONFIGS.items():
        if attention not in only:
            continue
        for n in lengths:
            if attention == "full" and n > args.full_max:
                continue
            points.append({"model": "CausalLM", "label": label, "attention": attention, "options": options, "n": n,
                           "threads": args.threads})
    if "hf" in only:
        label, (_, options) = next(iter(CONFIGS.items()))
        points += [{"model": "hf", "label": f"HF Llama, {label}", "attention": "local", "options": options, "n": n,
                    "threads": args.threads} for n in lengths if n <= args.hf_max]
    rows = []
    print("| model | attention | generated | cache bytes (end) | cache bytes (max) | keys/layer | RSS growth MiB | "
          "tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in points:
        proc = subprocess.run([sys.executable, __file__, "--point", json.dumps(spec)], capture_output=True, text=True)
        line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("{")), None)
        if line is None:
            print(f"| {spec['model']} | {spec['label']} | {spec['n']} | failed: {proc.stderr.strip()[-300:]} |")
            continue
        r = json.loads(line)
        rows.append(r)
        print(f"| {r['model']} | {r['label']} | {r['n']} | {r['cache_bytes']:,} | {r['cache_bytes_max']:,} | "
              f"{r['keys_per_layer']} | {r['rss_growth_mb']:.1f} | {r['tokens_per_s']:.0f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
