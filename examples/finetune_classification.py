"""Fine-tune a long-attention Encoder on a built-in synthetic task, on CPU, in a few minutes.

The task ("find the marker"): sequences of random tokens with a marker token, one of four, put
at a few random places in the second half; the label is which marker it is. With a small sliding window the classifier's
CLS token sees the marker only through global attention (longformer: CLS is global), so the task
checks that information flows across the whole sequence.

    python examples/finetune_classification.py                        # ~2-4 minutes on 2 CPU cores
    python examples/finetune_classification.py --attention bigbird --opt block_size=32
    python examples/finetune_classification.py --init bert-long/      # from `longrange convert` output
    python examples/finetune_classification.py --steps 2 --length 64  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from longrange.models import Encoder, ModelConfig

MARKERS = 4  # tokens 1..4 are the markers, 0 is padding, the rest is noise
COPIES = 4  # places the marker appears at


def make_batch(batch: int, length: int, vocab: int, gen: torch.Generator):
    """ids [B, N] (token 0 = CLS slot, the marker at COPIES random places), labels [B], keep [B, N]."""
    ids = torch.randint(MARKERS + 2, vocab, (batch, length), generator=gen)
    ids[:, 0] = MARKERS + 1  # CLS
    labels = torch.randint(0, MARKERS, (batch,), generator=gen)
    where = torch.randint(length // 2, length - length // 8, (batch, COPIES), generator=gen)  # far from CLS
    ids[torch.arange(batch)[:, None], where] = (labels + 1)[:, None]
    lengths = torch.randint(length - length // 8, length + 1, (batch,), generator=gen)
    keep = torch.arange(length)[None, :] < lengths[:, None]
    return ids.masked_fill(~keep, 0), labels, keep


def build_model(args) -> Encoder:
    if args.init:
        return Encoder.from_pretrained(args.init, head="classification", num_labels=MARKERS).train()
    options = {"window": 32} if args.attention in ("longformer", "local") else {}
    options.update(args.opt)
    config = ModelConfig(vocab_size=args.vocab, dim=args.dim, heads=4, layers=args.layers, ffn_dim=2 * args.dim,
                         max_length=args.length, attention=args.attention, attention_options=options,
                         head="classification", num_labels=MARKERS, dropout=0.0, pad_token_id=0)
    return Encoder(config)


def evaluate(model, args, batches: int = 4) -> float:
    gen = torch.Generator().manual_seed(args.seed + 1)
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for _ in range(batches):
            ids, labels, keep = make_batch(args.batch_size, args.length, args.vocab, gen)
            correct += int((model(ids, attention_mask=keep).logits.argmax(-1) == labels).sum())
            total += len(labels)
    model.train()
    return correct / total


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--attention", default="longformer")
    p.add_argument("--opt", action="append", default=[], help="attention option KEY=VALUE (JSON value)")
    p.add_argument("--init", default=None, help="a longrange checkpoint folder to start from")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=100)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="save the fine-tuned model here (save_pretrained)")
    args = p.parse_args(argv)
    args.opt = {k: json.loads(v) for k, _, v in (o.partition("=") for o in args.opt)}
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = build_model(args)
    args.vocab, args.length = model.config.vocab_size, min(args.length, model.config.max_length)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    start, loss = time.time(), float("nan")
    columns = (TextColumn("[bold]fine-tune"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
               TimeRemainingColumn())
    with Progress(*columns) as progress:
        task = progress.add_task("train", total=args.steps, loss="-")
        for _ in range(args.steps):
            ids, labels, keep = make_batch(args.batch_size, args.length, args.vocab, gen)
            out = model(ids, attention_mask=keep, labels=labels)
            opt.zero_grad()
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss = out.loss.item()
            progress.update(task, advance=1, loss=f"{loss:.3f}")
    result = {"steps": args.steps, "final_loss": loss, "accuracy": evaluate(model, args),
              "seconds": round(time.time() - start, 1)}
    print(json.dumps(result))
    if args.out:
        model.save_pretrained(args.out)
    return result


if __name__ == "__main__":
    main()
