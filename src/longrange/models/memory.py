"""Segment-level recurrence for `CausalLM` with `xl` / `compressive` attention: the memory state, its
update, streaming perplexity and segment-recurrent training.

The state is explicit: `CausalLM.forward(ids, memory=state)` returns `out.memory`, the next state,
detached (gradients stop at segment boundaries). Per layer it holds

    mem  [B, m, C]   the layer's INPUT hidden states at the last m positions (m <= mem_len)
    cmem [B, cm, C]  compressive only: compressed older memories (cm <= cmem_len)

and their masks ([B, m] / [B, cm] bool, True = real token; None = all real). The update of one
layer after a segment h_in [B, n, C]:  cat = [mem ; h_in];  XL: mem' = cat[-mem_len:].
Compressive: the o = len(cat) - mem_len oldest slots leave the FIFO; the largest multiple of
compression_rate c among them, k = o - o % c, is compressed into k / c slots appended to cmem (which
keeps its last cmem_len); the o % c others stay in mem until a whole group of c can leave (so mem
may hold up to c - 1 slots beyond mem_len; nothing is dropped uncompressed).

    state = lm.new_memory(batch_size=1)                 # or memory=None: starts empty
    for segment in segments:                             # [1, n] each, n <= config.max_length
        out = lm(segment, memory=state)                  # out.logits, out.memory, out.aux_loss
        state = out.memory
    stream_perplexity(lm, token_tensor, segment_len=128, mem_len=512)   # longer memory than training
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from longrange.core.config import ConfigError, check_nonnegative_int, check_positive_int
from longrange.core.files import replace_folder, sync_tree
from longrange.mechanisms import capabilities
from longrange.mechanisms.memory import check_rate_divides, join_masks
from longrange.models.checkpoint import (
    WEIGHTS_NAME,
    check_finite,
    read_safetensors,
    unique_state_dict,
    write_checkpoint,
)
from longrange.models.config import ModelConfig
from longrange.models.training import (
    NonFiniteLoss,
    StopOnInterrupt,
    TrainingInterrupted,
    apply_update,
    backward,
    check_loss,
    nonfinite_parameters,
)


@dataclasses.dataclass
class LayerMemory:
    """One layer's memory: mem [B, m, C] (+ mask [B, m]) and cmem [B, cm, C] (+ mask [B, cm])."""

    mem: torch.Tensor
    cmem: torch.Tensor
    mem_mask: torch.Tensor | None = None
    cmem_mask: torch.Tensor | None = None


@dataclasses.dataclass
class MemoryState:
    """Per-layer memories of a segment-recurrent CausalLM, passed and returned explicitly.

    mem_len / cmem_len: when set, override every layer's configured lengths for the updates made
    with this state (e.g. evaluate with a longer memory than in training)."""

    layers: list[LayerMemory]
    mem_len: int | None = None
    cmem_len: int | None = None
    tokens: int = 0  # positions seen so far

    @classmethod
    def empty(cls, layers: int, batch_size: int, dim: int, *, device=None, dtype=torch.float32,
              mem_len: int | None = None, cmem_len: int | None = None) -> MemoryState:
        check_positive_int("batch_size", batch_size)
        blank = torch.zeros(batch_size, 0, dim, device=device, dtype=dtype)
        return cls([LayerMemory(blank, blank) for _ in range(layers)], mem_len=mem_len, cmem_len=cmem_len)

    @property
    def mem(self) -> list[torch.Tensor]:
        return [layer.mem for layer in self.layers]

    @property
    def cmem(self) -> list[torch.Tensor]:
        return [layer.cmem for layer in self.layers]

    @property
    def batch_size(self) -> int:
        return self.layers[0].mem.shape[0]

    def memory_tokens(self) -> int:
        """Largest number of slots (memory + compressed) any layer keeps."""
        return max((layer.mem.shape[1] + layer.cmem.shape[1] for layer in self.layers), default=0)

    def check(self, layers: int, batch_size: int, dim: int) -> None:
        """A clear error when this state belongs to another model or batch."""
        if not isinstance(self.layers, list) or len(self.layers) != layers:
            got = len(self.layers) if isinstance(self.layers, list) else type(self.layers).__name__
            raise ValueError(f"memory has {got} layers, the model has {layers}: pass the state this model "
                             "returned (or lm.new_memory(batch_size))")
        for i, layer in enumerate(self.layers):
            for name, t in (("mem", layer.mem), ("cmem", layer.cmem)):
                if t.dim() != 3 or t.shape[0] != batch_size or t.shape[2] != dim:
                    raise ValueError(f"memory layer {i} {name} must be [B, M, C] = [{batch_size}, M, {dim}] "
                                     f"(batch size of input_ids), got {list(t.shape)}; start a new state "
                                     "with lm.new_memory(batch_size) when the batch size changes")
        for name in ("mem_len", "cmem_len"):
            if getattr(self, name) is not None:
                check_nonnegative_int(f"memory.{name}", getattr(self, name))


def memory_lengths(attention, state: MemoryState, mem_len: int | None) -> tuple[int, int]:
    """(mem_len, cmem_len) of one layer: call argument > state override > the layer's config."""
    cfg = attention.config
    m = mem_len if mem_len is not None else state.mem_len if state.mem_len is not None else cfg.mem_len
    check_nonnegative_int("mem_len", m)
    rate = getattr(cfg, "compression_rate", None)
    if rate is None:
        return m, 0
    check_rate_divides("mem_len", m, rate)
    return m, state.cmem_len if state.cmem_len is not None else cfg.cmem_len


def attention_inputs(layer: LayerMemory, view: Callable, compressive: bool) -> dict:
    """The keyword inputs of a layer's self-attention: its memory (as the attention sees it: `view`
    is the block's pre-norm, or identity) and, for compressive layers, the compressed memory."""
    kw = {"memory": view(layer.mem), "memory_mask": layer.mem_mask}
    if compressive:
        kw.update(compressed_memory=view(layer.cmem), compressed_mask=layer.cmem_mask)
    return kw


def update_layer(attention, layer: LayerMemory, h_in: torch.Tensor, keep: torch.Tensor | None, mem_len: int,
                 cmem_len: int, frozen_view: Callable) -> tuple[LayerMemory, torch.Tensor | None]:
    """The layer's next memory after a segment h_in [B, n, C] (its input hidden states), detached,
    and the compressive reconstruction loss (None when nothing was compressed or for XL).
    frozen_view: what the attention applies to its input, with parameters detached (pre-norm)."""
    m, n = layer.mem.shape[1], h_in.shape[1]
    cat = torch.cat([layer.mem, h_in.detach()], dim=1)  # (B, m + n, C)
    cat_mask = join_masks([layer.mem_mask, keep], [m, n])
    rate = getattr(attention.config, "compression_rate", None)
    overflow = max(0, cat.shape[1] - mem_len)
    leave = overflow if rate is None else overflow - overflow % rate  # slots that leave the FIFO
    mem, mem_mask = cat[:, leave:], None if cat_mask is None else cat_mask[:, leave:]
    if rate is None or leave == 0:
        return LayerMemory(mem, layer.cmem, mem_mask, layer.cmem_mask), None
    old, old_mask = cat[:, :leave], None if cat_mask is None else cat_mask[:, :leave]
    return compress_leaving(attention, layer, mem, mem_mask, old, old_mask, cmem_len,
                            lambda old, compressed: attention.reconstruction_loss(
                                frozen_view(h_in), frozen_view(old), frozen_view(compressed)))


def compress_leaving(attention, layer: LayerMemory, mem, mem_mask, old, old_mask, cmem_len: int, reconstruction):
    """The memory update's compressive half, shared by one process and context parallelism: the
    slots leaving the FIFO, old [B, leave, C] (padding entering as zeros), compressed and appended to
    the compressed memory, which keeps its last `cmem_len` slots. reconstruction(old, compressed) ->
    the auxiliary loss. -> (the next LayerMemory, that loss)."""
    rate = attention.config.compression_rate
    if old_mask is not None:
        old = old.masked_fill(~old_mask[..., None], 0.0)  # padding enters compression as zeros
    compressed = attention.compress(old)  # (B, leave / c, C), grad to the compression network only
    aux = reconstruction(old, compressed)
    slots_mask = None if old_mask is None else old_mask.view(old.shape[0], -1, rate).any(dim=-1)
    cmem = torch.cat([layer.cmem, compressed.detach()], dim=1)
    cmem_mask = join_masks([layer.cmem_mask, slots_mask], [layer.cmem.shape[1], compressed.shape[1]])
    start = cmem.shape[1] - min(cmem_len, cmem.shape[1])
    cmem, cmem_mask = cmem[:, start:], None if cmem_mask is None else cmem_mask[:, start:]
    return LayerMemory(mem, cmem, mem_mask, cmem_mask), aux


# -- streaming ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class StreamResult:
    """What `stream_perplexity` measured: `tokens` predicted, their summed NLL (nats)."""

    tokens: int
    nll: float
    seconds: float
    segments: int
    max_memory_tokens: int  # largest memory (slots per layer) held at any time: bounded by the settings

    @property
    def bits_per_token(self) -> float:
        """Bits per token; with a byte-level vocabulary, bits per byte."""
        return self.nll / max(self.tokens, 1) / math.log(2)

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / max(self.tokens, 1))

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "bits_per_token": self.bits_per_token, "perplexity": self.perplexity,
                "tokens_per_second": self.tokens_per_second}


def as_chunks(source) -> Iterator[torch.Tensor]:
    """A 1-D token tensor, bytes, a list of ints, or an iterable of such chunks -> 1-D long tensors."""
    if isinstance(source, torch.Tensor):
        yield source.reshape(-1).long()
        return
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source):
            yield torch.frombuffer(bytearray(source), dtype=torch.uint8).long()
        return
    ints: list[int] = []
    for item in source:
        if isinstance(item, int):
            ints.append(item)
            if len(ints) >= 65536:
                yield torch.tensor(ints, dtype=torch.long)
                ints = []
            continue
        if ints:
            yield torch.tensor(ints, dtype=torch.long)
            ints = []
        if isinstance(item, (torch.Tensor, bytes, bytearray, memoryview)):
            yield from as_chunks(item)
        else:
            yield torch.as_tensor(list(item), dtype=torch.long)
    if ints:
        yield torch.tensor(ints, dtype=torch.long)


def iter_windows(source, segment_len: int) -> Iterator[torch.Tensor]:
    """Windows of segment_len + 1 tokens (the last one shorter) overlapping by one token: inputs
    window[:-1], targets window[1:]. Reads `source` chunk by chunk: memory stays O(chunk + segment)."""
    check_positive_int("segment_len", segment_len)
    carry = torch.zeros(0, dtype=torch.long)
    for chunk in as_chunks(source):
        buf = torch.cat([carry, chunk])
        start = 0
        while buf.numel() - start >= segment_len + 1:
            yield buf[start : start + segment_len + 1]
            start += segment_len
        carry = buf[start:].clone()
    if carry.numel() >= 2:
        yield carry


@torch.no_grad()
def stream_perplexity(model, tokens, segment_len: int, *, mem_len: int | None = None, progress=None,
                      device=None) -> StreamResult:
    """Perplexity of `model` (a CausalLM) over a long token stream, one segment at a time.

    tokens: a 1-D tensor, bytes, or an iterable of chunks (read lazily: a file of any size streams in
    bounded memory). Every token but the first is predicted once. With xl / compressive attention the
    memory carries the context between segments (mem_len: override the trained memory length);
    other models see each segment alone. progress(tokens_done) is called after each segment.
    Dropout follows the model's mode: call model.eval() first for a deterministic measure."""
    check_positive_int("segment_len", segment_len)
    if segment_len > model.config.max_length:
        raise ValueError(f"segment_len={segment_len} exceeds the model's max_length={model.config.max_length} "
                         "(its longest segment)")
    device = device or next(model.parameters()).device
    recurrent = model.uses_memory
    state = model.new_memory(1, mem_len=mem_len) if recurrent else None
    nll, count, segments, peak = 0.0, 0, 0, 0
    start = time.perf_counter()
    for window in iter_windows(tokens, segment_len):
        window = window.to(device)
        ids, targets = window[None, :-1], window[1:]
        out = model(ids, memory=state) if recurrent else model(ids)
        nll += float(F.cross_entropy(at_least_float32(out.logits[0]), targets, reduction="sum"))
        count += targets.numel()
        segments += 1
        if recurrent:
            state = out.memory
            peak = max(peak, state.memory_tokens())
        if progress is not None:
            progress(count)
    return StreamResult(tokens=count, nll=nll, seconds=time.perf_counter() - start, segments=segments,
                        max_memory_tokens=peak)


# -- training -------------------------------------------------------------------------------------------
#: files of a `train_segments` checkpoint folder, beside the model's config.json + model.safetensors
TRAINER_STATE = "trainer.pt"


def check_segments(tokens: int, segment_len: int, batch_size: int) -> None:
    """ConfigError naming batch_size when `tokens` cut into batch_size parts leaves a part shorter than
    segment_len + 1 (a segment and its next-token targets)."""
    part = tokens // batch_size
    if part < segment_len + 1:
        raise ConfigError(f"{tokens} tokens give batch_size={batch_size} parts of {part} tokens; each needs at "
                          f"least segment_len + 1 = {segment_len + 1} (a smaller batch_size or segment)", "batch_size")


def train_segments(model, tokens: torch.Tensor, *, segment_len: int, batch_size: int, steps: int, lr: float = 1e-3,
                   clip: float = 1.0, aux_weight: float = 1.0, on_step=None, checkpoint: str | Path | None = None,
                   checkpoint_every: int = 100, resume: bool = False) -> list[float]:
    """Segment-recurrent training (XL's recipe): the stream is cut into `batch_size` contiguous parts
    (the last len % batch_size tokens are not used); each step takes the next segment of every part,
    carries the memory from the step before (detached: backpropagation stops at segment boundaries)
    and restarts at the beginning with an empty memory when a part is used up. Loss: next-token
    cross-entropy + aux_weight · aux_loss (compressive). AdamW, gradients clipped to `clip`.
    on_step(step, loss) after each step. Returns the per-step task losses (nats per token), those
    before a resume included.

    checkpoint: a folder for the latest state, replaced atomically every `checkpoint_every` steps and
    at the end: the model (config.json + model.safetensors, loadable with CausalLM.from_pretrained)
    and trainer.pt (optimizer, step, stream position, memory, losses, RNG; read back with
    weights_only=True). resume=True continues from it up to `steps` (the same run, bit for bit on CPU).
    With a checkpoint, Ctrl-C stops after the current step, saves, and raises TrainingInterrupted.
    A non-finite loss raises NonFiniteLoss naming the step (the last checkpoint, finite, is kept)."""
    for name, value in (("segment_len", segment_len), ("batch_size", batch_size), ("steps", steps),
                        ("checkpoint_every", checkpoint_every)):
        check_positive_int(name, value)
    tokens = tokens.reshape(-1).long()
    check_segments(tokens.numel(), segment_len, batch_size)
    part = tokens.numel() // batch_size
    device = next(model.parameters()).device
    streams = tokens[: part * batch_size].view(batch_size, part).to(device)  # (B, T)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    settings = {"segment_len": segment_len, "batch_size": batch_size, "tokens": tokens.numel()}
    run = {"step": 0, "pos": 0, "memory": None, "losses": []}
    if resume:
        if checkpoint is None:
            raise ValueError("resume=True needs the checkpoint folder to continue from")
        run = load_segment_checkpoint(model, optimizer, checkpoint, settings)
        if run["step"] > steps:
            raise ConfigError(f"the checkpoint in {checkpoint} is at step {run['step']}, beyond steps={steps}", "steps")
    model.train()
    state, pos, losses = run["memory"], run["pos"], run["losses"]

    def save(step: int) -> None:
        save_segment_checkpoint(model, optimizer, checkpoint, {**settings, "step": step, "pos": pos, "memory": state,
                                                               "losses": losses})

    guard = StopOnInterrupt() if checkpoint is not None else contextlib.nullcontext()
    with guard as interrupt:
        for step in range(run["step"], steps):
            if pos + segment_len + 1 > part:
                state, pos = None, 0  # a new pass over the data, from an empty memory
            ids, targets = streams[:, pos : pos + segment_len], streams[:, pos + 1 : pos + segment_len + 1]
            out = model(ids, memory=state) if model.uses_memory else model(ids)
            loss = F.cross_entropy(at_least_float32(out.logits.flatten(0, 1)), targets.flatten())
            total = loss if out.aux_loss is None else loss + aux_weight * out.aux_loss
            backward(total)
            apply_update(optimizer, lr, parameters=model.parameters(), clip=clip)
            state, pos = out.memory, pos + segment_len
            losses.append(loss.item())
            check_loss(losses[-1], step + 1, kept_checkpoint(checkpoint))
            if on_step is not None:
                on_step(step, losses[-1])
            done = step + 1
            if checkpoint is not None and (done % checkpoint_every == 0 or done == steps):
                save(done)
            if interrupt is not None and interrupt.requested and done < steps:
                if done % checkpoint_every:
                    save(done)
                raise TrainingInterrupted(done, steps, str(checkpoint),
                                          f"train_segments(..., checkpoint={str(checkpoint)!r}, resume=True)")
    return losses


def save_segment_checkpoint(model, optimizer, folder: str | Path, trainer: dict) -> None:
    """The model (config.json + model.safetensors) and trainer.pt into `folder`, replaced as a whole
    (written beside it, flushed, renamed); never with NaN / inf weights (NonFiniteLoss instead)."""
    folder = Path(folder)
    bad = nonfinite_parameters(model)
    if bad:
        raise NonFiniteLoss(trainer["step"], float("nan"), kept_checkpoint(folder),
                            what=f"the weights after step {trainer['step']} hold NaN or inf ({', '.join(bad[:3])})")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_checkpoint(model, tmp)
        record = {**trainer, "memory": memory_to_dict(trainer["memory"]), "optimizer": optimizer.state_dict(),
                  "rng": torch.get_rng_state(), "format": "longrange-train-segments"}
        torch.save(record, tmp / TRAINER_STATE)
        sync_tree(tmp)
        replace_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_segment_checkpoint(model, optimizer, folder: str | Path, settings: dict) -> dict:
    """Restore model, optimizer and RNG from a `train_segments` checkpoint; its run state (step, pos,
    memory, losses). Missing, truncated or corrupt files and other settings are errors naming them."""
    folder = Path(folder)
    path = folder / TRAINER_STATE
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path} is missing")
    try:
        trainer = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # EOFError, RuntimeError, UnpicklingError from a damaged file
        raise ValueError(f"{path} is unreadable ({type(err).__name__}: {' '.join(str(err).split())[:200]}): "
                         "truncated or corrupt") from None
    if not isinstance(trainer, dict) or trainer.get("format") != "longrange-train-segments":
        raise ValueError(f"{path} is not a train_segments checkpoint")
    for key, value in settings.items():
        if trainer.get(key) != value:
            raise ValueError(f"{path} was written with {key}={trainer.get(key)}, this run has {key}={value}; "
                             "resume with the same settings and text")
    device = next(model.parameters()).device
    tensors = read_safetensors(folder / WEIGHTS_NAME, device)
    check_finite(tensors, folder / WEIGHTS_NAME)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or [k for k in missing if k not in _tied(model)]:
        raise ValueError(f"{folder / WEIGHTS_NAME} does not fit this model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    optimizer.load_state_dict(trainer["optimizer"])
    torch.set_rng_state(trainer["rng"])
    return {"step": trainer["step"], "pos": trainer["pos"], "losses": list(trainer["losses"]),
            "memory": memory_from_dict(trainer["memory"], device)}


def _tied(model) -> set[str]:
    return set(model.state_dict()) - set(unique_state_dict(model))


def kept_checkpoint(folder: str | Path | None) -> str:
    """For messages: the step of the checkpoint kept in `folder`, or that there is none."""
    if folder is None:
        return "no checkpoint is kept (pass checkpoint= to keep one)"
    try:
        step = torch.load(Path(folder) / TRAINER_STATE, weights_only=True, map_location="cpu")["step"]
    except Exception:  # none yet, or unreadable
        return f"no checkpoint was written in {folder} before it"
    return f"the last checkpoint (step {step}, all finite) is kept in {folder}"


def memory_to_dict(state: MemoryState | None) -> dict | None:
    """A MemoryState as plain tensors, ints and None (what torch.load(weights_only=True) reads back)."""
    if state is None:
        return None
    layers = [{"mem": m.mem, "cmem": m.cmem, "mem_mask": m.mem_mask, "cmem_mask": m.cmem_mask} for m in state.layers]
    return {"layers": layers, "mem_len": state.mem_len, "cmem_len": state.cmem_len, "tokens": state.tokens}


def memory_from_dict(data: dict | None, device=None) -> MemoryState | None:
    if data is None:
        return None

    def to(t):
        return None if t is None else t.to(device)

    layers = [LayerMemory(to(m["mem"]), to(m["cmem"]), to(m["mem_mask"]), to(m["cmem_mask"])) for m in data["layers"]]
    return MemoryState(layers, mem_len=data["mem_len"], cmem_len=data["cmem_len"], tokens=data["tokens"])


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """fp16 / bf16 -> float32 (for the loss); float32 and float64 stay as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


# -- byte-level language models over files -------------------------------------------------------------
BYTE_VOCAB = 257  # 256 byte values + padding
PAD = 256
READ_CHUNK = 1 << 20  # bytes read from the file at a time while streaming


def byte_lm_config(attention: str = "xl", *, dim: int = 64, heads: int = 4, layers: int = 2, ffn_dim: int = 256,
                   segment: int = 128, mem_len: int = 128, options: dict | None = None):
    """A small byte-level CausalLM config: no position embeddings, max_length = the segment length
    (mem_len is set where the attention has one: xl, compressive)."""

    memory = {"mem_len": mem_len} if "memory" in capabilities(attention).inputs else {}
    return ModelConfig(vocab_size=BYTE_VOCAB, dim=dim, heads=heads, layers=layers, ffn_dim=ffn_dim,
                       max_length=segment, attention=attention,
                       attention_options={**memory, **(options or {})}, position_style="none",
                       pad_token_id=PAD, dropout=0.0, norm="pre", type_vocab_size=0)


def read_chunks(path: Path, limit: int | None = None) -> Iterator[bytes]:
    """The file's bytes, READ_CHUNK at a time (the first `limit` bytes when set)."""
    left = limit
    with path.open("rb") as f:
        while left is None or left > 0:
            chunk = f.read(READ_CHUNK if left is None else min(READ_CHUNK, left))
            if not chunk:
                return
            left = None if left is None else left - len(chunk)
            yield chunk
