"""ETC's global input and structure masks from sentence (and paragraph) boundaries.

One global token per sentence, linked to that sentence's long tokens (long→global and
global→long), and optionally one per paragraph, linked to the global tokens of its sentences (and,
if asked, to its long tokens). Boundaries come from separator token ids in `input_ids` or from
explicit segment ids. Every mask is O(g·n) (g global tokens, n long tokens), never n×n.

    st = etc_structure(input_ids, attention_mask=keep, sentence_end_ids=[sep_id])
    out = ETCEncoder(cfg)(input_ids, attention_mask=keep, **st.model_inputs())

Global layout per example: [cls (optional) ; S sentence globals ; P paragraph globals], S and P the
most sentences / paragraphs of any example in the batch; the globals an example lacks are padding
(`global_attention_mask` False, id `pad_token_id`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from longrange.models.common import as_keep_mask, check_ids

#: global_type_ids of the kinds of global tokens (a ModelConfig's type_vocab_size must exceed them)
SENTENCE_TYPE, PARAGRAPH_TYPE = 0, 1


@dataclasses.dataclass
class ETCStructure:
    """What `etc_structure` returns; `model_inputs()` gives the ETCEncoder keywords."""

    global_ids: torch.Tensor  # [B, g] long: cls / sentence / paragraph token ids, pad_token_id for padding
    global_type_ids: torch.Tensor  # [B, g] long: SENTENCE_TYPE (cls too) or PARAGRAPH_TYPE
    global_attention_mask: torch.Tensor  # [B, g] bool: True = a real global token
    long_to_global: torch.Tensor  # [B, n, g] bool: long token i may attend to global token j
    global_to_long: torch.Tensor  # [B, g, n] bool
    global_to_global: torch.Tensor | None  # [B, g, g] bool, or None (every global sees every global)
    sentence_ids: torch.Tensor  # [B, n] long: each long token's sentence (-1: padding)
    paragraph_ids: torch.Tensor | None  # [B, n] long: each long token's paragraph (-1: padding), or None

    @property
    def num_global(self) -> int:
        return self.global_ids.shape[1]

    def model_inputs(self) -> dict:
        """Keywords for `ETCEncoder.forward` (beside input_ids and attention_mask)."""
        return {"global_ids": self.global_ids, "global_type_ids": self.global_type_ids,
                "global_attention_mask": self.global_attention_mask, "long_to_global": self.long_to_global,
                "global_to_long": self.global_to_long, "global_to_global": self.global_to_global}


def etc_structure(
    input_ids: torch.Tensor | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    sentence_end_ids: Sequence[int] = (),
    paragraph_end_ids: Sequence[int] = (),
    sentence_ids: torch.Tensor | None = None,
    paragraph_ids: torch.Tensor | None = None,
    paragraphs: bool = False,
    tokens_see_paragraph: bool = False,
    cls_token_id: int | None = None,
    sentence_token_id: int = 1,
    paragraph_token_id: int = 2,
    pad_token_id: int = 0,
) -> ETCStructure:
    """Global tokens and masks from document structure, in one of two ways:

    - separators: `input_ids` [B, n] with `sentence_end_ids` (a token with one of these ids ends
      its sentence and belongs to it) and `paragraph_end_ids` (ends its sentence and its
      paragraph; paragraphs=True is implied). Real tokens after the last separator form a last
      sentence (and paragraph).
    - segment ids: `sentence_ids` [B, n] ints, token i lies in sentence sentence_ids[i] (0, 1, ...;
      -1 = no sentence); `paragraph_ids` [B, n] likewise (a sentence lies in one paragraph).

    attention_mask [B, n] (bool or 0/1): padding tokens join no sentence. Links: a long token and
    its sentence's global see each other; a paragraph global and its sentences' globals see each
    other (sentence globals see each other and paragraph globals see each other freely); with
    `tokens_see_paragraph` a paragraph global and its long tokens too. `cls_token_id`: prepend
    one global that sees, and is seen by, every real token. Ids default to BERT's [unused0]=1,
    [unused1]=2 for sentence and paragraph globals.
    """
    sent, para, keep = _segments(input_ids, attention_mask, sentence_end_ids, paragraph_end_ids, sentence_ids,
                                 paragraph_ids)
    if para is None and paragraphs:
        para = torch.where(sent >= 0, 0, -1)  # one paragraph: the whole example
    b, n = sent.shape
    device = sent.device
    links, valid, kinds = [], [], []  # per group of globals: long links [B, n, G], real [B, G], type
    if cls_token_id is not None:
        links.append(keep[:, :, None])
        valid.append(keep.any(dim=1, keepdim=True))
        kinds.append((cls_token_id, SENTENCE_TYPE, 1))
    s_links, s_valid = _membership(sent)
    links.append(s_links)
    valid.append(s_valid)
    kinds.append((sentence_token_id, SENTENCE_TYPE, s_valid.shape[1]))
    if para is not None:
        p_links, p_valid = _membership(para)
        links.append(p_links if tokens_see_paragraph else torch.zeros_like(p_links))
        valid.append(p_valid)
        kinds.append((paragraph_token_id, PARAGRAPH_TYPE, p_valid.shape[1]))
    long_to_global = torch.cat(links, dim=2)  # (B, n, g)
    global_mask = torch.cat(valid, dim=1)  # (B, g)
    ids = torch.cat([torch.full((b, size), tid, dtype=torch.long, device=device) for tid, _, size in kinds], 1)
    types = torch.cat([torch.full((b, size), kind, dtype=torch.long, device=device) for _, kind, size in kinds], 1)
    g2g = None
    if para is not None:
        g2g = _hierarchy(sent, para, cls_token_id is not None, s_valid.shape[1], p_valid.shape[1])
        g2g = g2g & global_mask[:, :, None] & global_mask[:, None, :]
    return ETCStructure(
        global_ids=ids.masked_fill(~global_mask, pad_token_id), global_type_ids=types.masked_fill(~global_mask, 0),
        global_attention_mask=global_mask, long_to_global=long_to_global,
        global_to_long=long_to_global.transpose(1, 2).contiguous(), global_to_global=g2g, sentence_ids=sent,
        paragraph_ids=para)


def _segments(input_ids, attention_mask, sentence_end_ids, paragraph_end_ids, sentence_ids, paragraph_ids):
    """-> (sentence [B, n], paragraph [B, n] or None, keep [B, n]); -1 marks padding / no segment."""
    if (input_ids is None) == (sentence_ids is None):
        raise ValueError("etc_structure needs exactly one of input_ids [B, n] (with sentence_end_ids / "
                         "paragraph_end_ids) or sentence_ids [B, n]")
    if input_ids is not None:
        input_ids = check_ids(input_ids)
        if paragraph_ids is not None:
            raise ValueError("paragraph_ids goes with sentence_ids; with input_ids give paragraph_end_ids")
        if not list(sentence_end_ids) and not list(paragraph_end_ids):
            raise ValueError("with input_ids, give the separator ids: sentence_end_ids and/or paragraph_end_ids")
        keep = _keep(attention_mask, input_ids.shape, input_ids.device)
        p_end = _isin(input_ids, paragraph_end_ids) & keep
        s_end = (_isin(input_ids, sentence_end_ids) & keep) | p_end
        sent = _exclusive_cumsum(s_end).masked_fill(~keep, -1)
        para = _exclusive_cumsum(p_end).masked_fill(~keep, -1) if list(paragraph_end_ids) else None
        return sent, para, keep
    sent = _segment_ids(sentence_ids, "sentence_ids")
    keep = _keep(attention_mask, sent.shape, sent.device) & (sent >= 0)
    sent = sent.masked_fill(~keep, -1)
    para = None
    if paragraph_ids is not None:
        para = _segment_ids(paragraph_ids, "paragraph_ids")
        if para.shape != sent.shape:
            raise ValueError(f"paragraph_ids must have the shape of sentence_ids [B, n] = {list(sent.shape)}, "
                             f"got {list(para.shape)}")
        if bool(((para < 0) & keep).any()):
            raise ValueError("paragraph_ids must be >= 0 wherever sentence_ids is (every sentence lies in a paragraph)")
        para = para.masked_fill(~keep, -1)
    return sent, para, keep


def _keep(attention_mask, shape, device) -> torch.Tensor:
    keep = as_keep_mask(attention_mask, shape)
    return torch.ones(shape, dtype=torch.bool, device=device) if keep is None else keep.to(device)


def _segment_ids(ids, name: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point() or ids.dtype == torch.bool:
        got = f"{ids.dtype} {list(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be an integer tensor [B, n] (segment index per token, -1 = none), got {got}")
    if bool((ids < -1).any()):
        raise ValueError(f"{name} must be >= -1 (-1 = no segment), got {int(ids.min())}")
    return ids.long()


def _isin(ids: torch.Tensor, values: Sequence[int]) -> torch.Tensor:
    values = torch.as_tensor(list(values), dtype=torch.long, device=ids.device)
    return torch.isin(ids, values) if values.numel() else torch.zeros_like(ids, dtype=torch.bool)


def _exclusive_cumsum(ends: torch.Tensor) -> torch.Tensor:
    """Segment index of each token: separators before it (a separator belongs to the segment it ends)."""
    ends = ends.long()
    return torch.cumsum(ends, dim=1) - ends


def _membership(seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """seg [B, n] (-1 = none) -> (links [B, n, S] bool: token in segment s, valid [B, S]: s has a token)."""
    count = int(seg.max()) + 1 if seg.numel() else 0
    links = seg[:, :, None] == torch.arange(max(count, 0), device=seg.device)  # (B, n, S)
    return links, links.any(dim=1)


def _hierarchy(sent, para, cls: bool, s_count: int, p_count: int) -> torch.Tensor:
    """[B, g, g] global→global: free among sentences and among paragraphs (and cls), a sentence and
    a paragraph only when the sentence lies in the paragraph. O(S·P + g²), never n."""
    b = sent.shape[0]
    # paragraph of each sentence: scatter token paragraphs onto their sentence index
    sent_para = torch.full((b, s_count + 1), -1, dtype=torch.long, device=sent.device)
    sent_para.scatter_reduce_(1, (sent + 1).clamp(min=0), para, reduce="amax")  # slot 0 collects padding
    member = sent_para[:, 1:, None] == torch.arange(p_count, device=sent.device)  # (B, S, P)
    c = int(cls)
    g = c + s_count + p_count
    out = torch.ones(b, g, g, dtype=torch.bool, device=sent.device)
    out[:, c : c + s_count, c + s_count :] = member
    out[:, c + s_count :, c : c + s_count] = member.transpose(1, 2)
    return out
