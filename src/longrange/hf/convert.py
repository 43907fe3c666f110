"""Pretrained conversion: HF BERT / RoBERTa -> a long longrange `Encoder`; HF Longformer / BigBird
weights -> our `Encoder` with the same outputs.

    long = lr.hf.convert_to_long("bert-folder", attention="longformer", max_length=4096, window=512,
                                 output_dir="bert-long")          # or an in-memory BertModel
    enc = lr.models.Encoder.from_pretrained("bert-long")
    ours = lr.hf.encoder_from_hf(hf_longformer_model)              # LongformerModel / BigBirdModel

What `convert_to_long` does (allenai's RoBERTa -> Longformer recipe, for any registered attention):
- the position table grows to `max_length` by tile-copying the learned positions: BERT's rows
  0..P-1 are all learned; RoBERTa reserves rows 0..pad_token_id (kept as they are) and numbers
  real tokens from pad_token_id + 1, so only rows pad_token_id+1.. are tiled;
- position ids are computed by our embeddings (no stale `position_ids` buffer travels along);
- Q/K/V are copied into the attention's `qkv` and, for `longformer`, into the global `qkv_global`;
  the output dense, LayerNorms, FFN and (for *ForMaskedLM) the MLM head are copied as they are;
- with `output_dir`, the model and the source's tokenizer files are written together, the
  tokenizer's `model_max_length` set to `max_length`; a new folder appears only when complete, and
  in an existing one each file is replaced atomically and other files are kept.
Attention parameters beyond qkv / qkv_global / out (none for longformer, bigbird, local, full)
start from fresh weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from longrange.core.files import staged_folder
from longrange.hf.attention import _copy_fused, _import_hf, attention_from_hf
from longrange.models import Encoder, ModelConfig
from longrange.models.checkpoint import write_checkpoint

SHORT_MODEL_TYPES = ("bert", "roberta")
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model")
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")


class ConversionError(ValueError):
    """A checkpoint or request the converter cannot handle; the message names what is wrong."""


# -- BERT / RoBERTa -> long ---------------------------------------------------------------------------------------
def convert_to_long(model, attention: str = "longformer", max_length: int = 4096, *, output_dir=None,
                    tokenizer=None, overwrite: bool = False, **attention_options) -> Encoder:
    """A HF BERT or RoBERTa model (in memory, or a local folder) as a longrange `Encoder` with a long
    attention and a position table of `max_length` tokens.

    attention: any registered name ("longformer" default, "bigbird", ...); attention_options: its
    settings over its config's defaults (longformer: window=512; bigbird: block_size=64, num_random_blocks=3).
    output_dir: also save the model (+ tokenizer files, model_max_length = max_length) there,
    atomically; an existing non-empty folder is an error unless overwrite=True.
    tokenizer: an in-memory HF tokenizer to save with it (else a source folder's tokenizer files).
    *ForMaskedLM models keep their MLM head (head="masked_lm"); other task heads are dropped."""
    hf, source = _load_short(model)
    base, mlm = _split_short(hf)
    hcfg = base.config
    offset = hcfg.pad_token_id + 1 if hcfg.model_type == "roberta" else 0
    original = hcfg.max_position_embeddings - offset
    if not isinstance(max_length, int) or max_length < original:
        raise ConversionError(f"max_length={max_length!r} is below the model's original max length {original}; "
                              f"ask for {original} or more")
    config = _long_config(hcfg, attention, max_length, dict(attention_options),
                          mlm is not None)
    ours = Encoder(config)
    _copy_embeddings(ours, base.embeddings, offset, max_length)
    for block, layer in zip(ours.stack.blocks, base.encoder.layer, strict=True):
        _copy_short_layer(block, layer)
    if mlm is not None:
        _copy_mlm_head(ours.head, mlm, hcfg.model_type)
    ours = ours.to(dtype=base.embeddings.word_embeddings.weight.dtype).eval()
    if output_dir is not None:
        save_with_tokenizer(ours, output_dir, source, tokenizer, max_length, overwrite)
    return ours


def _load_short(model):
    """(HF model, source folder or None). A folder must hold config.json and weights."""
    if isinstance(model, nn.Module):
        return model, None
    if not isinstance(model, (str, Path)):
        raise TypeError(f"model must be a HF BERT/RoBERTa model or a local folder, got {type(model).__name__}")
    folder = Path(model)
    if not folder.is_dir():
        raise FileNotFoundError(f"source folder {folder} does not exist (only local folders are read; "
                                "nothing is downloaded)")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: not a HF model folder")
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{config_path} is not valid JSON: {err}") from None
    model_type = meta.get("model_type")
    if model_type not in SHORT_MODEL_TYPES:
        raise ConversionError(f"unsupported architecture: model_type={model_type!r} in {config_path}; "
                              f"convert_to_long supports {list(SHORT_MODEL_TYPES)} (BERT, RoBERTa)")
    if not any((folder / name).is_file() for name in HF_WEIGHT_FILES):
        raise FileNotFoundError(f"no weights in {folder}: expected one of {list(HF_WEIGHT_FILES)}")
    import transformers

    mlm = any(a.endswith("ForMaskedLM") for a in meta.get("architectures") or [])
    auto = transformers.AutoModelForMaskedLM if mlm else transformers.AutoModel
    try:
        return auto.from_pretrained(folder, local_files_only=True), folder
    except Exception as err:  # a truncated file raises safetensors' SafetensorError, a bare Exception subclass
        weights = next(str(folder / name) for name in HF_WEIGHT_FILES if (folder / name).is_file())
        detail = " ".join(str(err).split())[:300]
        raise ConversionError(f"could not load the HF model in {folder} (weights {weights}): {type(err).__name__}: "
                              f"{detail}") from None


def _split_short(hf) -> tuple[nn.Module, nn.Module | None]:
    """(BertModel / RobertaModel, MLM head or None) of any HF BERT / RoBERTa model."""
    t = _import_short()
    bases = (t.BertModel, t.RobertaModel)
    if isinstance(hf, bases):
        return hf, None
    base = getattr(hf, "bert", None) or getattr(hf, "roberta", None)
    if not isinstance(base, bases):
        name = f"{type(hf).__module__}.{type(hf).__qualname__}"
        raise ConversionError(f"unsupported architecture {name}; convert_to_long supports HF BERT and RoBERTa models "
                              "(BertModel, RobertaModel and their task models)")
    if isinstance(hf, t.BertForMaskedLM):
        return base, hf.cls.predictions
    if isinstance(hf, t.RobertaForMaskedLM):
        return base, hf.lm_head
    return base, None


def _import_short():
    import transformers

    return transformers


def _check_short_config(hcfg) -> str:
    """Our activation name for the HF config; errors for what we cannot reproduce exactly."""
    if getattr(hcfg, "position_embedding_type", "absolute") != "absolute":
        raise ConversionError(f"position_embedding_type={hcfg.position_embedding_type!r} is not supported "
                              "(only learned absolute positions)")
    if getattr(hcfg, "is_decoder", False) or getattr(hcfg, "add_cross_attention", False):
        raise ConversionError("decoder BERT/RoBERTa models (is_decoder / add_cross_attention) are not supported")
    act = hcfg.hidden_act if isinstance(hcfg.hidden_act, str) else None
    if act not in HF_ACTIVATIONS:
        raise ConversionError(f"hidden_act={hcfg.hidden_act!r} is not supported; supported: {sorted(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[act]


def _long_config(hcfg, attention, max_length, options, mlm: bool) -> ModelConfig:
    try:
        return ModelConfig(
            vocab_size=hcfg.vocab_size, dim=hcfg.hidden_size, heads=hcfg.num_attention_heads,
            layers=hcfg.num_hidden_layers, ffn_dim=hcfg.intermediate_size, max_length=max_length,
            attention=attention, attention_options=options,
            position_style="padding_offset" if hcfg.model_type == "roberta" else "absolute",
            type_vocab_size=hcfg.type_vocab_size, pad_token_id=hcfg.pad_token_id,
            bos_token_id=getattr(hcfg, "bos_token_id", None), eos_token_id=getattr(hcfg, "eos_token_id", None),
            layer_norm_eps=hcfg.layer_norm_eps, dropout=hcfg.hidden_dropout_prob,
            activation=_check_short_config(hcfg), head="masked_lm" if mlm else None,
            tie_word_embeddings=bool(getattr(hcfg, "tie_word_embeddings", True)),
            initializer_range=hcfg.initializer_range,
        )
    except (TypeError, ValueError) as err:
        if isinstance(err, ConversionError):
            raise
        raise ConversionError(f"attention={attention!r} with options {options}: {err}") from None


def extend_positions(table: torch.Tensor, reserved: int, max_length: int) -> torch.Tensor:
    """[P, C] learned table -> [reserved + max_length, C]: the reserved rows kept, the learned
    rows table[reserved:] tile-copied until max_length rows are filled."""
    learned = table[reserved:]  # (P - reserved, C)
    reps = -(-max_length // learned.shape[0])
    return torch.cat([table[:reserved], learned.repeat(reps, 1)[:max_length]], dim=0)


@torch.no_grad()
def _copy_embeddings(ours: Encoder, emb, reserved: int, max_length: int) -> None:
    e = ours.embeddings
    _copy_param(e.word.weight, emb.word_embeddings.weight, "word_embeddings")
    _copy_param(e.position.weight, extend_positions(emb.position_embeddings.weight, reserved, max_length),
                "position_embeddings (extended)")
    _copy_param(e.token_type.weight, emb.token_type_embeddings.weight, "token_type_embeddings")
    _copy_norm(e.norm, emb.LayerNorm)


@torch.no_grad()
def _copy_short_layer(block, layer) -> None:
    """HF BertLayer / RobertaLayer / LongformerLayer / BigBirdLayer (same names) -> our block, but
    the self-attention projections, which depend on the target mechanism."""
    sa = layer.attention.self
    _copy_fused(block.attention.qkv, (sa.query, sa.key, sa.value))
    if hasattr(block.attention, "qkv_global"):  # longformer: global projections start as the local ones
        _copy_fused(block.attention.qkv_global, (sa.query, sa.key, sa.value))
    _copy_linear(block.attention.out, layer.attention.output.dense)
    _copy_feedforward(block, layer)


@torch.no_grad()
def _copy_feedforward(block, layer) -> None:
    _copy_norm(block.attention_norm, layer.attention.output.LayerNorm)
    _copy_linear(block.ffn.fc1, layer.intermediate.dense)
    _copy_linear(block.ffn.fc2, layer.output.dense)
    _copy_norm(block.ffn_norm, layer.output.LayerNorm)


@torch.no_grad()
def _copy_mlm_head(head, hf_head, model_type: str) -> None:
    if model_type == "roberta":
        dense, norm, decoder, bias = hf_head.dense, hf_head.layer_norm, hf_head.decoder, hf_head.bias
    else:
        t = hf_head.transform
        dense, norm, decoder, bias = t.dense, t.LayerNorm, hf_head.decoder, hf_head.bias
    _copy_linear(head.dense, dense)
    _copy_norm(head.norm, norm)
    if head.decoder.weight.data_ptr() != decoder.weight.data_ptr():
        _copy_param(head.decoder.weight, decoder.weight, "MLM decoder")
    _copy_param(head.decoder.bias, bias, "MLM decoder bias")


def _copy_param(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ConversionError(f"shape mismatch for {what}: HF {list(src.shape)} vs ours {list(dst.shape)}")
    dst.copy_(src)


def _copy_linear(dst: nn.Linear, src: nn.Linear) -> None:
    _copy_param(dst.weight, src.weight, "Linear weight")
    if dst.bias is not None:
        dst.bias.copy_(src.bias if src.bias is not None else torch.zeros_like(dst.bias))


def _copy_norm(dst: nn.LayerNorm, src: nn.LayerNorm) -> None:
    _copy_param(dst.weight, src.weight, "LayerNorm weight")
    _copy_param(dst.bias, src.bias, "LayerNorm bias")


def save_with_tokenizer(model: Encoder, output_dir, source: Path | None, tokenizer, max_length: int,
                        overwrite: bool = False) -> Path:
    """Model + tokenizer (files from `source`, or `tokenizer.save_pretrained`) into output_dir,
    each file atomically (other files there are kept; a new folder appears only when complete);
    the tokenizer's model_max_length becomes max_length."""
    with staged_folder(output_dir, overwrite) as tmp:
        write_checkpoint(model, tmp)
        if tokenizer is not None:
            tokenizer.model_max_length = max_length
            tokenizer.save_pretrained(str(tmp))
        elif source is not None:
            for name in TOKENIZER_FILES:
                if (source / name).is_file():
                    shutil.copy2(source / name, tmp / name)
        tok_config = tmp / "tokenizer_config.json"
        if tok_config.is_file():
            data = json.loads(tok_config.read_text())
            data["model_max_length"] = max_length
            tok_config.write_text(json.dumps(data, indent=2) + "\n")
    return Path(output_dir)


# -- Longformer / BigBird -> ours ---------------------------------------------------------------------------------
def encoder_from_hf(hf_model, *, random_in_eval: str = "none") -> Encoder:
    """Our `Encoder` with the weights and settings of a HF `LongformerModel` or `BigBirdModel` (or
    a task model around one; its head is dropped). Same outputs on the same inputs, with these
    notes: BigBird inputs are padded to a multiple of block_size as HF pads them
    (`pad_to_multiple_of`); HF BigBird switches to full attention when n <= (5 + 2r)·block_size
    and, in eval mode, repeats block 0 in place of random blocks (see `longrange.hf.attention`);
    ours keeps block-sparse attention at every length. random_in_eval: our eval policy for BigBird's
    random blocks ("none" as HF's, "same" keeps the seeded draw)."""
    hf_lf, hf_bb = _import_hf()
    base = hf_model
    for attr in ("longformer", "bert"):
        if isinstance(getattr(hf_model, attr, None), (hf_lf.LongformerModel, hf_bb.BigBirdModel)):
            base = getattr(hf_model, attr)
    if not isinstance(base, (hf_lf.LongformerModel, hf_bb.BigBirdModel)):
        name = f"{type(hf_model).__module__}.{type(hf_model).__qualname__}"
        raise ConversionError(f"unsupported architecture {name}; encoder_from_hf supports HF LongformerModel and "
                              "BigBirdModel (and their task models)")
    hcfg = base.config
    longformer = isinstance(base, hf_lf.LongformerModel)
    if not longformer and getattr(hcfg, "rescale_embeddings", False):
        raise ConversionError("BigBird with rescale_embeddings=True (Pegasus-style) is not supported")
    if getattr(hcfg, "is_decoder", False):
        raise ConversionError("decoder models (is_decoder=True) are not supported")
    attentions = [attention_from_hf(layer.attention.self, output=layer.attention.output.dense,
                                    **({} if longformer else {"random_in_eval": random_in_eval}))
                  for layer in base.encoder.layer]
    name, options, per_layer = _layer_specs(attentions)
    sparse = not longformer and hcfg.attention_type == "block_sparse"
    reserved = hcfg.pad_token_id + 1 if longformer else 0
    config = ModelConfig(
        vocab_size=hcfg.vocab_size, dim=hcfg.hidden_size, heads=hcfg.num_attention_heads,
        layers=hcfg.num_hidden_layers, ffn_dim=hcfg.intermediate_size,
        max_length=hcfg.max_position_embeddings - reserved, attention=name, attention_options=options,
        layer_options=per_layer, position_style="padding_offset" if longformer else "absolute",
        type_vocab_size=hcfg.type_vocab_size, pad_token_id=hcfg.pad_token_id,
        bos_token_id=getattr(hcfg, "bos_token_id", None), eos_token_id=getattr(hcfg, "eos_token_id", None),
        layer_norm_eps=hcfg.layer_norm_eps, dropout=hcfg.hidden_dropout_prob, activation=_check_short_config(hcfg),
        initializer_range=hcfg.initializer_range, pad_to_multiple_of=hcfg.block_size if sparse else None,
    )
    ours = Encoder(config)
    e = base.embeddings
    _copy_embeddings(ours, e, reserved, config.max_length)
    for block, layer, att in zip(ours.stack.blocks, base.encoder.layer, attentions, strict=True):
        block.attention.load_state_dict(att.state_dict())
        _copy_feedforward(block, layer)
    return ours.to(dtype=e.word_embeddings.weight.dtype).eval()


def _layer_specs(attentions) -> tuple[str, dict, list | None]:
    """(name, options of layer 0, per-layer differences or None) from built attention modules."""
    specs = []
    for att in attentions:
        d = att.config.to_dict()
        for key in ("dim", "heads", "bias", "dropout"):
            d.pop(key)
        specs.append(d)
    first = dict(specs[0])
    name = first.pop("attention")
    diffs = [{k: v for k, v in s.items() if first.get(k, None) != v or (k == "attention" and v != name)}
             for s in specs]
    diffs = [{k: v for k, v in d.items() if not (k == "attention" and v == name)} for d in diffs]
    return name, first, diffs if any(diffs) else None
