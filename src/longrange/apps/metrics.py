"""Evaluation metrics of the fine-tuning tasks, on plain Python sequences (no framework needed).

- `accuracy`, `macro_f1` (classification and token tagging: F1 per class present in the gold
  labels or the predictions, averaged);
- `span_exact_match`, `span_f1` (extractive QA over token positions, SQuAD's definitions applied to
  the predicted and gold spans);
- `rouge_l` (summaries): the F-measure of ROUGE-L (Lin 2004) on two token sequences,
  LCS = longest common subsequence, P = LCS / len(prediction), R = LCS / len(reference),
  F = 2PR / (P + R); `rouge_l_text` tokenizes text as the `rouge-score` package does by default
  (lower-case, runs of [a-z0-9]) and gives its `rougeL` F-measure (tests check both against it when
  it is installed: `pip install 'longrange[apps]'`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence


def accuracy(predictions: Sequence, labels: Sequence) -> float:
    _same_length(predictions, labels)
    return sum(p == y for p, y in zip(predictions, labels, strict=True)) / max(len(labels), 1)


def macro_f1(predictions: Sequence, labels: Sequence) -> float:
    """F1 per class (classes seen in labels or predictions), averaged with equal weights."""
    _same_length(predictions, labels)
    classes = sorted(set(labels) | set(predictions))
    scores = []
    for c in classes:
        tp = sum(p == c and y == c for p, y in zip(predictions, labels, strict=True))
        fp = sum(p == c and y != c for p, y in zip(predictions, labels, strict=True))
        fn = sum(p != c and y == c for p, y in zip(predictions, labels, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / max(len(scores), 1)


def span_exact_match(pred: tuple[int, int], gold: tuple[int, int]) -> float:
    """1.0 when the predicted (start, end) token span (inclusive) equals the gold one."""
    return float(tuple(pred) == tuple(gold))


def span_f1(pred: tuple[int, int], gold: tuple[int, int]) -> float:
    """SQuAD's token F1 between two inclusive position spans (overlap / lengths)."""
    (ps, pe), (gs, ge) = pred, gold
    overlap = max(0, min(pe, ge) - max(ps, gs) + 1)
    if overlap == 0:
        return 0.0
    p, r = overlap / (pe - ps + 1), overlap / (ge - gs + 1)
    return 2 * p * r / (p + r)


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a)·len(b)) time, O(len(b)) memory)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: Sequence, reference: Sequence) -> float:
    """ROUGE-L F-measure of two token sequences: 2PR / (P + R) with P = LCS/|prediction|, R = LCS/|reference|."""
    lcs = lcs_length(prediction, reference)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(prediction), lcs / len(reference)
    return 2 * p * r / (p + r)


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokenizer: lower-case, non-alphanumerics as spaces, split (no stemming)."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge_l_text(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of two texts, tokenized as `rouge_tokens` (rouge-score's `rougeL`)."""
    return rouge_l(rouge_tokens(prediction), rouge_tokens(reference))


def _same_length(a: Sequence, b: Sequence) -> None:
    if len(a) != len(b):
        raise ValueError(f"predictions and labels differ in length: {len(a)} vs {len(b)}")
