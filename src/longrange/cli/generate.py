"""`longrange generate DIR`: stream a model's continuation of a prompt with the pattern-following cache.

    longrange generate lm-local/ --prompt-file prompt.txt --max-new-tokens 2000 --opt window=512 --opt sink_tokens=4
    longrange generate hf-llama/ --prompt-file prompt.txt --max-new-tokens 200 --attention local --opt window=1024

DIR is a `CausalLM` folder (`longrange lm train --out`, byte-level: the prompt file's bytes are the
tokens) or a HF causal-LM folder with its tokenizer (run on `longrange-ATTENTION` via `lr.hf.register()`
with `model.config.longrange` = the --opt settings, decoding into `lr.hf.LongrangeCache`). Tokens are
written to stdout as they come; tokens/s and the cache's bytes go to stderr at the end.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from longrange.cli.options import key_values

Opt = typer.Option


def generate(
    model: Annotated[Path, typer.Argument(help="A CausalLM folder (byte-level) or a HF causal-LM folder.")],
    prompt_file: Annotated[Path, Opt("--prompt-file", help="The prompt (our byte-level models read its bytes).")],
    max_new_tokens: Annotated[int, Opt("--max-new-tokens", help="Tokens to generate.")] = 200,
    attention: Annotated[str | None, Opt(help="Attention to decode with (default: the model's own; HF models: "
                                              "local).")] = None,
    opt: Annotated[list[str] | None, Opt("--opt", help="Attention option KEY=VALUE, repeatable, e.g. --opt window=512 "
                                                      "--opt sink_tokens=4.")] = None,
    do_sample: Annotated[bool, Opt("--sample/--greedy", help="Sample (--temperature, --top-k) or argmax.")] = False,
    temperature: Annotated[float, Opt(help="Sampling temperature.")] = 1.0,
    top_k: Annotated[int | None, Opt("--top-k", help="Sample from the k most likely tokens.")] = None,
    seed: Annotated[int, Opt(help="Seed of the sampling.")] = 0,
    threads: Annotated[int, Opt(help="torch.set_num_threads (decoding is many small ops: 1 is often fastest).")] = 1,
    json_out: Annotated[Path | None, Opt("--json", help="Also write tokens/s and the cache's bytes here.")] = None,
) -> None:
    """Generate from a prompt, streaming tokens; report tokens/s and the decoding cache's bytes."""
    import torch

    if not prompt_file.is_file():
        raise typer.BadParameter(f"{prompt_file} is not a file", param_hint="--prompt-file")
    if max_new_tokens < 0:
        raise typer.BadParameter(f"must be >= 0, got {max_new_tokens}", param_hint="--max-new-tokens")
    if not (model / "config.json").is_file():
        raise typer.BadParameter(f"{model} holds no config.json: not a model folder", param_hint="MODEL")
    torch.set_num_threads(threads)
    options = key_values(opt)
    meta = json.loads((model / "config.json").read_text())
    run = _ours if meta.get("format") == "longrange" else _hf  # our checkpoints say so (models.checkpoint.FORMAT)
    t0 = time.perf_counter()
    count, nbytes, keys = run(model, prompt_file, max_new_tokens, attention, options, do_sample, temperature, top_k,
                              torch.Generator().manual_seed(seed))
    seconds = time.perf_counter() - t0
    sys.stdout.flush()
    result = {"tokens": count, "seconds": seconds, "tokens_per_s": count / seconds if seconds else None,
              "cache_bytes": nbytes, "cache_keys_per_layer": keys}
    typer.echo(f"\n{count} tokens in {seconds:.1f} s ({result['tokens_per_s']:.1f} tokens/s); decoding cache "
               f"{nbytes:,} bytes ({keys} keys per layer at most)", err=True)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n")


def _ours(folder, prompt_file, max_new_tokens, attention, options, do_sample, temperature, top_k, generator):
    import torch

    from longrange.models import CausalLM
    from longrange.models.checkpoint import read_config

    _, config = read_config(folder)
    overrides = {}
    if attention is not None or options:
        base = {} if attention not in (None, config.attention) else dict(config.attention_options)
        overrides = {"attention": attention or config.attention, "attention_options": {**base, **options}}
    try:
        lm = CausalLM.from_pretrained(folder, **overrides)
    except (OSError, TypeError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="MODEL/--attention/--opt") from None
    if lm.config.vocab_size < 256:
        raise typer.BadParameter(f"{folder} has vocab_size={lm.config.vocab_size}; `generate` reads the prompt as "
                                 "bytes and needs a byte-level model (vocab 256+)", param_hint="MODEL")
    data = prompt_file.read_bytes()
    if not data:
        raise typer.BadParameter(f"{prompt_file} is empty", param_hint="--prompt-file")
    ids = torch.tensor(list(data), dtype=torch.long)[None]
    cache = lm.new_cache()
    out = sys.stdout.buffer

    def stream(tokens):
        token = int(tokens[0])
        if token < 256:
            out.write(bytes([token]))
            out.flush()

    try:
        lm.generate(ids, max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                    generator=generator, cache=cache, streamer=stream)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--max-new-tokens/--attention") from None
    return max_new_tokens, cache.nbytes(), cache.memory_tokens()


def _hf(folder, prompt_file, max_new_tokens, attention, options, do_sample, temperature, top_k, generator):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    import longrange as lr

    lr.hf.register()
    name = f"longrange-{attention or 'local'}"
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=name, local_files_only=True).eval()
    except (OSError, ValueError, KeyError) as e:
        raise typer.BadParameter(f"cannot load a HF causal LM with its tokenizer from {folder}: {e}",
                                 param_hint="MODEL") from None
    model.config.longrange = options
    enc = tokenizer(prompt_file.read_text(), return_tensors="pt")
    cache = lr.hf.LongrangeCache()
    if do_sample:
        torch.manual_seed(generator.initial_seed())
    try:
        out = model.generate(**enc, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=do_sample,
                             temperature=temperature, top_k=top_k, cache=cache, streamer=TextStreamer(tokenizer),
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id or 0)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--attention/--opt") from None
    return out.shape[1] - enc["input_ids"].shape[1], cache.nbytes(), cache.memory_tokens()
