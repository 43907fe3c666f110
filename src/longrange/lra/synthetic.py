"""Small synthetic stand-ins for the LRA tasks that need real data (text, retrieval, image).

They exercise the same shapes and code paths as the real tasks and are learnable by a small model,
but they are NOT the benchmark: datasets built from them carry `synthetic=True`, and reports must
say so. Every function is deterministic given its numpy Generator.

- text: words separated by spaces; a few "positive" and "negative" marker words are planted;
  label 1 when there are more positive than negative markers (a sentiment-like count over the
  whole document).
- retrieval: two documents, each with one planted citation key `cite:xxxx` among `num_keys`;
  label 1 when both carry the same key.
- image: 32x32 grey images of ten simple shapes (disk, ring, square, square outline, triangle,
  plus, X, horizontal bar, vertical bar, two dots) at random places, sizes and contrasts, with noise.
"""

from __future__ import annotations

import string

import numpy as np

SHAPES = ("disk", "ring", "square", "square_outline", "triangle", "plus", "x", "hbar", "vbar", "two_dots")


def lexicon(seed: int, num_neutral: int = 300, num_markers: int = 8, num_keys: int = 32) -> dict[str, list[str]]:
    """Random lowercase words: neutral ones, positive and negative markers, citation keys (all distinct)."""
    rng = np.random.default_rng([seed, 7])
    letters = np.array(list(string.ascii_lowercase))
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < num_neutral + 2 * num_markers:
        word = "".join(rng.choice(letters, size=int(rng.integers(2, 8))))
        if word not in seen:
            seen.add(word)
            words.append(word)
    keys = [f"cite:{k:04x}" for k in rng.choice(2**16, size=num_keys, replace=False)]
    return {"neutral": words[:num_neutral], "positive": words[num_neutral:num_neutral + num_markers],
            "negative": words[num_neutral + num_markers:], "keys": keys}


def _document(rng: np.random.Generator, neutral: list[str], planted: list[str], length: int) -> bytes:
    """Neutral words up to about `length` bytes with `planted` words put at random positions."""
    budget = length - sum(len(w) + 1 for w in planted)
    words: list[str] = []
    while True:
        word = neutral[int(rng.integers(len(neutral)))]
        if budget - (len(word) + 1) < 0:
            break
        words.append(word)
        budget -= len(word) + 1
    for word in planted:
        words.insert(int(rng.integers(len(words) + 1)), word)
    return " ".join(words).encode("ascii")


def synthetic_text(num: int, rng: np.random.Generator, words: dict[str, list[str]], *, min_bytes: int = 128,
                   max_bytes: int = 512) -> tuple[list[np.ndarray], np.ndarray]:
    """Documents of min_bytes..max_bytes bytes; label 1 iff positive markers outnumber negative ones."""
    labels = _balanced(num, rng)
    docs = []
    for label in labels:
        majority = int(rng.integers(1, 5))
        minority = int(rng.integers(0, majority))
        n_pos, n_neg = (majority, minority) if label else (minority, majority)
        planted = [words["positive"][int(rng.integers(len(words["positive"])))] for _ in range(n_pos)]
        planted += [words["negative"][int(rng.integers(len(words["negative"])))] for _ in range(n_neg)]
        length = int(rng.integers(min_bytes, max_bytes + 1))
        docs.append(np.frombuffer(_document(rng, words["neutral"], planted, length), dtype=np.uint8))
    return docs, labels


def synthetic_retrieval(num: int, rng: np.random.Generator, words: dict[str, list[str]], *, min_bytes: int = 96,
                        max_bytes: int = 256) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Document pairs; label 1 iff both carry the same planted citation key."""
    labels = _balanced(num, rng)
    keys = words["keys"]
    firsts, seconds = [], []
    for label in labels:
        key1 = int(rng.integers(len(keys)))
        key2 = key1 if label else (key1 + int(rng.integers(1, len(keys)))) % len(keys)
        for key, out in ((key1, firsts), (key2, seconds)):
            length = int(rng.integers(min_bytes, max_bytes + 1))
            out.append(np.frombuffer(_document(rng, words["neutral"], [keys[key]], length), dtype=np.uint8))
    return firsts, seconds, labels


def synthetic_images(num: int, rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """[num, size, size] uint8 images of the ten SHAPES and their labels (class k = SHAPES[k], balanced)."""
    from PIL import Image, ImageDraw

    labels = np.arange(num) % len(SHAPES)
    rng.shuffle(labels)
    images = np.empty((num, size, size), dtype=np.uint8)
    for i, label in enumerate(labels):
        background = int(rng.integers(0, 80))
        image = Image.new("L", (size, size), background)
        draw = ImageDraw.Draw(image)
        radius = int(rng.integers(size // 6, size // 3))
        cx, cy = (int(v) for v in rng.integers(radius, size - radius, size=2))
        ink = int(rng.integers(150, 256))
        _draw_shape(draw, SHAPES[label], cx, cy, radius, ink)
        noise = rng.integers(-20, 21, size=(size, size))
        images[i] = np.clip(np.asarray(image, dtype=np.int64) + noise, 0, 255)
    return images, labels.astype(np.int64)


def _draw_shape(draw, shape: str, cx: int, cy: int, r: int, ink: int) -> None:
    """One shape of half-size r centred on (cx, cy)."""
    box = (cx - r, cy - r, cx + r, cy + r)
    width = max(1, r // 3)
    if shape == "disk":
        draw.ellipse(box, fill=ink)
    elif shape == "ring":
        draw.ellipse(box, outline=ink, width=width)
    elif shape == "square":
        draw.rectangle(box, fill=ink)
    elif shape == "square_outline":
        draw.rectangle(box, outline=ink, width=width)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=ink)
    elif shape == "plus":
        draw.line([(cx - r, cy), (cx + r, cy)], fill=ink, width=width)
        draw.line([(cx, cy - r), (cx, cy + r)], fill=ink, width=width)
    elif shape == "x":
        draw.line([(cx - r, cy - r), (cx + r, cy + r)], fill=ink, width=width)
        draw.line([(cx - r, cy + r), (cx + r, cy - r)], fill=ink, width=width)
    elif shape == "hbar":
        draw.rectangle((cx - r, cy - width, cx + r, cy + width), fill=ink)
    elif shape == "vbar":
        draw.rectangle((cx - width, cy - r, cx + width, cy + r), fill=ink)
    else:  # two_dots
        d = max(1, r // 3)
        draw.ellipse((cx - r, cy - d, cx - r + 2 * d, cy + d), fill=ink)
        draw.ellipse((cx + r - 2 * d, cy - d, cx + r, cy + d), fill=ink)


def _balanced(num: int, rng: np.random.Generator) -> np.ndarray:
    """`num` binary labels, half of each (one more 0 when odd), in a random order."""
    labels = np.arange(num) % 2
    rng.shuffle(labels)
    return labels.astype(np.int64)
