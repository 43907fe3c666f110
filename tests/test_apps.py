"""longrange.apps, the pieces: tokenizers (DNA round trips), corpus packing, masking statistics, the
CPC loss against its formula, ROUGE-L against hand-computed values (and rouge-score when installed),
and each built-in task's generator checked by an independent solver written here."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from longrange.apps.corpus import pack_corpus, read_documents
from longrange.apps.cpc import CPCHead, choose_sentences, cpc_loss, sentence_batch
from longrange.apps.masking import MaskingConfig, mask_tokens, maskable_positions, regular_ids
from longrange.apps.metrics import lcs_length, macro_f1, rouge_l, rouge_l_text, span_f1
from longrange.apps.tasks import MOTIFS, builtin_task
from longrange.apps.tokenizers import (
    SPECIALS,
    ByteTokenizer,
    DNATokenizer,
    WordTokenizer,
    load_tokenizer,
    make_tokenizer,
)
from longrange.core.config import ConfigError


# -- tokenizers ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["dna", "dna:k=3", "dna:k=6", "dna:k=3,overlap", "dna:k=6,overlap"])
@pytest.mark.parametrize("seq", ["A", "ACG", "ACGTNACGTTGCA", "acgtacgtacgtacgtacgtTTTTTN" * 7])
def test_dna_tokenizer_round_trips(spec, seq, tmp_path):
    tok = make_tokenizer(spec)
    enc = tok.encode(seq)
    assert tok.decode(enc.ids) == seq.upper()
    assert all(len(SPECIALS) <= i < tok.vocab_size for i in enc.ids)
    assert [seq.upper()[a:b] for a, b in enc.offsets] == [tok.mers[i - len(SPECIALS)] for i in enc.ids]
    if tok.overlap:
        assert len(enc) == max(1, len(seq) - tok.k + 1)
    else:
        assert len(enc) == math.ceil(len(seq) / tok.k)
    again = load_tokenizer(tok.save(tmp_path / "tok"))
    assert again.to_dict() == tok.to_dict() and again.encode(seq).ids == enc.ids


def test_dna_tokenizer_rejects_or_maps_other_letters():
    with pytest.raises(ValueError, match="other than ACGTN"):
        DNATokenizer().encode("ACGRT")
    assert DNATokenizer(strict=False).decode(DNATokenizer(strict=False).encode("ACGRT").ids) == "ACGNT"
    with pytest.raises(ConfigError, match="k-mer size"):
        DNATokenizer(k=9)


def test_byte_tokenizer_round_trips_and_marks_words():
    tok = ByteTokenizer()
    text = "Long documents. Très longs!\nOK?"
    enc = tok.encode(text)
    assert tok.decode(enc.ids) == text
    assert len(enc) == len(text.encode("utf-8"))
    chars: dict[int, dict[int, str]] = {}  # word -> {character index: character} (è is two bytes, one character)
    for w, (a, _) in zip(enc.words, enc.offsets, strict=True):
        chars.setdefault(w, {})[a] = text[a]
    words = {w: list(c.values()) for w, c in chars.items()}
    assert "".join(words[0]) == "Long" and "".join(words[1]) == " " and "".join(words[2]) == "documents."
    assert "".join(words[4]) == "Très"  # both bytes of è in one word
    ends = [i for i, t in enumerate(enc.ids) if t in tok.sentence_end_ids]
    assert [text.encode()[i:i + 1] for i in ends] == [b".", b"!", b"?"]


def test_word_tokenizer_and_spec_errors(tmp_path):
    tok = WordTokenizer(["a", "b", "."])
    enc = tok.encode("a b  c .")
    assert enc.ids[2] == tok.unk_id and tok.decode(enc.ids) == "a b ."
    assert load_tokenizer(tok.save(tmp_path)).encode("a .").ids == tok.encode("a .").ids
    with pytest.raises(ConfigError, match="tokenizer"):
        make_tokenizer("nonsense")


def test_hf_tokenizer_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]", "long", "doc", "##s", ".", "short"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path / "bert")
    tok = make_tokenizer(tmp_path / "bert")
    enc = tok.encode("long docs . short")
    assert [vocab[i] for i in enc.ids] == ["long", "doc", "##s", ".", "short"]
    assert enc.words == [0, 1, 1, 2, 3]  # "doc ##s" is one word
    assert tok.sentence_id == vocab.index("[unused0]") and tok.mask_id == vocab.index("[MASK]")
    assert tok.sentence_end_ids == {vocab.index(".")}
    assert load_tokenizer(tok.save(tmp_path / "again")).encode("long docs").ids == enc.ids[:3]


# -- corpus -------------------------------------------------------------------------------------------------------
def test_read_text_jsonl_and_fasta(tmp_path):
    (tmp_path / "a.txt").write_text("One. Two.")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "three"}) + "\n\n" + json.dumps({"text": "four"}) + "\n")
    (tmp_path / "c.fa").write_text(">r1 first\nACGT\nAC\n>r2\nTTTT\n")
    assert list(read_documents([tmp_path])) == ["One. Two.", "three", "four", "ACGTAC", "TTTT"]
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected an object with a string field 'text'"):
        list(read_documents([tmp_path / "bad.jsonl"]))


def test_packing_wraps_examples_and_keeps_words_and_sentences():
    tok = ByteTokenizer()
    corpus = pack_corpus(["Ab cd. Ef.", "Gh."], tok, max_length=8)
    body = [tok.offset + b for b in b"Ab cd. Ef."] + [tok.sep_id] + [tok.offset + b for b in b"Gh."]
    ids = corpus.input_ids
    assert ids.shape == (3, 8) and (ids[:, 0] == tok.cls_id).all()
    flat = [int(t) for e in range(3) for t, k in zip(ids[e, 1:], corpus.attention_mask[e, 1:], strict=True)
            if k][:-1]
    assert [t for t in flat if t != tok.sep_id or True][:6] == body[:6]
    real = corpus.attention_mask
    assert int(real.sum()) == corpus.tokens + 2 * len(corpus)
    assert (corpus.word_ids[~real] == -1).all() and (corpus.sentence_ids[~real] == -1).all()
    # "Ab" is one word: its two bytes share a word id
    assert corpus.word_ids[0, 1] == corpus.word_ids[0, 2] != corpus.word_ids[0, 3]
    dna = pack_corpus(["ACGT" * 40], make_tokenizer("dna"), max_length=64, block=16)
    assert int(dna.sentence_ids[0, 1:63].max()) == 3  # 62 bases in blocks of 16


# -- masking ------------------------------------------------------------------------------------------------------
def _random_batch(b=16, n=512, words_every=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIALS), 300, (b, n), generator=gen)
    ids[:, 0], ids[:, -1] = 1, 2  # CLS, SEP
    ids[:, 100:110] = 5  # special tokens inside
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[: b // 2, n - 50:] = False  # padding
    ids[~keep] = 0
    words = torch.arange(n).expand(b, n) // words_every
    return ids, keep, words


@pytest.mark.parametrize("unit", ["token", "word", "span"])
def test_masking_rates_and_specials_never_masked(unit):
    ids, keep, words = _random_batch()
    special = set(range(len(SPECIALS)))
    maskable = maskable_positions(ids, special, keep)
    cfg = MaskingConfig(unit=unit)
    chosen = masked_id = random_id = same = 0
    for seed in range(8):
        out, labels = mask_tokens(ids, maskable=maskable, mask_id=3, replacement_ids=regular_ids(300, special),
                                  config=cfg, word_ids=words, generator=torch.Generator().manual_seed(seed))
        pick = labels != -100
        assert not (pick & ~maskable).any(), "a special or padding token was chosen"
        assert torch.equal(out[~pick], ids[~pick]), "a token that was not chosen changed"
        assert torch.equal(labels[pick], ids[pick])
        chosen += int(pick.sum())
        masked_id += int((out[pick] == 3).sum())
        same += int((out[pick] == ids[pick]).sum())
        random_id += int(((out != 3) & (out != ids) & pick).sum())
        assert not torch.isin(out[pick & (out != 3)], torch.tensor(sorted(special))).any()
    total = 8 * int(maskable.sum())
    assert abs(chosen / total - 0.15) < 0.02
    # the 80/10/10 split (a random draw may equal the original token: 1 in 294 chances)
    assert abs(masked_id / chosen - 0.8) < 0.04 and abs(random_id / chosen - 0.1) < 0.03
    assert abs(same / chosen - 0.1) < 0.03


@pytest.mark.parametrize("unit", ["word", "span"])
def test_whole_words_and_spans_are_masked_together(unit):
    ids, keep, words = _random_batch(words_every=4)
    maskable = maskable_positions(ids, set(range(len(SPECIALS))), keep)
    out, labels = mask_tokens(ids, maskable=maskable, mask_id=3, replacement_ids=regular_ids(300, range(8)),
                              config=MaskingConfig(unit=unit), word_ids=words,
                              generator=torch.Generator().manual_seed(1))
    pick = labels != -100
    for b in range(ids.shape[0]):
        for w in torch.unique(words[b]):
            inside = (words[b] == w) & maskable[b]
            got = pick[b][inside]
            assert got.all() or not got.any(), f"word {int(w)} of example {b} was masked in part"
    if unit == "span":  # runs of chosen words longer than one word exist (mean span ~3.8 words)
        runs = [len(m.group()) for b in range(ids.shape[0])
                for m in re.finditer("1+", "".join("1" if pick[b][words[b] == w].any() else "0"
                                                   for w in torch.unique(words[b])))]
        assert max(runs) >= 4 and sum(runs) / len(runs) > 2.0


def test_masking_is_a_function_of_the_generator():
    ids, keep, words = _random_batch()
    maskable = maskable_positions(ids, set(range(8)), keep)
    a = mask_tokens(ids, maskable=maskable, mask_id=3, replacement_ids=regular_ids(300, range(8)),
                    word_ids=words, config=MaskingConfig(unit="span"), generator=torch.Generator().manual_seed(3))
    b = mask_tokens(ids, maskable=maskable, mask_id=3, replacement_ids=regular_ids(300, range(8)),
                    word_ids=words, config=MaskingConfig(unit="span"), generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(ConfigError, match="masking unit"):
        MaskingConfig(unit="sentence")


# -- CPC ----------------------------------------------------------------------------------------------------------
def test_cpc_loss_matches_the_formula_on_a_tiny_case():
    torch.manual_seed(0)
    c, z, w = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), torch.randn(4, 4)
    direct = 0.0
    for i in range(3):  # -(1/M) Σ_i log( exp(c_iᵀ W z_i) / Σ_j exp(c_iᵀ W z_j) )
        s = [math.exp(float(c[i] @ w.double() @ z[j])) for j in range(3)]
        direct -= math.log(s[i] / sum(s)) / 3
    assert cpc_loss(c, z, w).item() == pytest.approx(direct, rel=1e-5)
    # with W = I: the dot product; a perfect match with large norms costs ~0, a swap costs a lot
    e = torch.eye(3) * 20
    assert cpc_loss(e, e).item() < 1e-6 and cpc_loss(e, e[[1, 0, 2]]).item() > 10
    head = CPCHead(3)
    loss = head(e, e[[1, 0, 2]])
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_cpc_sentence_choice_and_batch():
    sent = torch.tensor([[0, 0, 1, 1, 1, 2, 2, -1], [0, 0, 0, 0, 1, 1, 1, 1]])
    chosen = choose_sentences(sent, 0.5, torch.Generator().manual_seed(0))
    assert chosen.shape == (2, 3) and not chosen[1, 2]  # example 1 has no sentence 2
    assert all(1 <= int(chosen[i].sum()) < n for i, n in ((0, 3), (1, 2)))  # at least one, never all
    ids = torch.arange(16).reshape(2, 8)
    rows, keep, which = sentence_batch(ids, sent, chosen, pad_id=0)
    for r, (b, s) in enumerate(which):
        assert rows[r][keep[r]].tolist() == ids[b][sent[b] == s].tolist()


# -- metrics ------------------------------------------------------------------------------------------------------
def test_rouge_l_against_hand_computed_values():
    # LCS("the cat sat on the mat", "the cat on the mat") = 5: P = 5/6, R = 5/5, F = 2·(5/6)·1 / (5/6 + 1) = 10/11
    assert rouge_l("the cat sat on the mat".split(), "the cat on the mat".split()) == pytest.approx(10 / 11)
    # LCS("a b c d", "b d e") = 2 ("b d"): P = 2/4, R = 2/3, F = 2·(1/2)(2/3)/(1/2 + 2/3) = 4/7
    assert rouge_l(list("abcd"), list("bde")) == pytest.approx(4 / 7)
    assert rouge_l([], [1]) == 0.0 and rouge_l([1, 2], [1, 2]) == 1.0 and lcs_length([1, 2, 3], [3, 2, 1]) == 1
    assert rouge_l_text("The Cat, sat!", "the cat") == pytest.approx(0.8)  # P = 2/3, R = 1


def test_rouge_l_equals_rouge_score_when_installed():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    gen = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "Gamma", "delta,", "eps", "zeta.", "42", "x-y"]
    for _ in range(50):
        a = " ".join(words[i] for i in torch.randint(len(words), (int(torch.randint(1, 12, (1,), generator=gen)),),
                                                     generator=gen))
        b = " ".join(words[i] for i in torch.randint(len(words), (int(torch.randint(1, 12, (1,), generator=gen)),),
                                                     generator=gen))
        assert rouge_l_text(a, b) == pytest.approx(scorer.score(b, a)["rougeL"].fmeasure)


def test_f1_metrics_by_hand():
    assert macro_f1([0, 0, 1, 1], [0, 1, 1, 1]) == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert span_f1((3, 6), (5, 8)) == pytest.approx(0.5) and span_f1((1, 2), (3, 4)) == 0.0


# -- built-in tasks, each checked by a solver that knows only the task's rules -------------------------------------
def solve_long_qa(words: list[str]) -> tuple[int, int]:
    """Token words of an example ([CLS] what is kX ? [SEP] document [SEP]) -> the (start, end) token
    positions of the value span of the fact "kX [is] v ... ." about the asked key."""
    q = words.index("[SEP]")
    assert words[:q] == ["[CLS]", "what", "is", words[3], "?"]
    asked = words[3]
    hits = [i for i in range(q + 1, len(words)) if words[i] == asked]
    assert len(hits) == 1, "the asked key occurs exactly once in the document"
    i = hits[0] + 1 + (words[hits[0] + 1] == "is")
    j = words.index(".", i) - 1
    assert i <= j and all(w.startswith("v") for w in words[i:j + 1])
    return i, j


def solve_dna(seq: str) -> tuple[int, int, int]:
    """(label, promoter position, enhancer position): scan for the four motifs."""
    hits = [(i, m) for m, motif in enumerate(MOTIFS) for i in range(len(seq)) if seq.startswith(motif, i)]
    assert len(hits) == 2, f"exactly two motifs, got {hits}"
    (pa, a), (pb, b) = sorted(hits)
    assert a in (0, 1) and b in (2, 3) and pa < 128
    return int(a == b - 2), pa, pb


def solve_summary(words: list[str], facts: int) -> list[str]:
    """The facts "nT kX is v ... ." in number order, as "kX v ..."."""
    found = {}
    for i, w in enumerate(words):
        if re.fullmatch(r"n\d+", w):
            j = words.index(".", i)
            found[int(w[1:])] = [words[i + 1]] + words[i + 3:j]
    assert sorted(found) == list(range(1, facts + 1))
    return [w for t in sorted(found) for w in found[t]]


@pytest.mark.parametrize("length", [64, 300, 2048])
@pytest.mark.parametrize("options", [{}, {"facts": 1, "max_values": 3}, {"facts": 3, "keys": 4, "link": False}])
def test_long_qa_answer_is_where_the_generator_says(length, options):
    data = builtin_task("long-qa", length=length, size="tiny", seed=3, **options)
    table = list(SPECIALS) + data.tokenizer.words
    far = 0
    for ex in data.splits["train"] + data.splits["test"]:
        ids = ex["input_ids"]
        assert len(ids) == length and ids[-1] == data.tokenizer.sep_id
        assert solve_long_qa([table[i] for i in ids]) == (ex["start"], ex["end"])
        far += ex["start"] > 512
    if length == 2048:
        assert far > 0.5 * 48, "most answers lie beyond 512 tokens at 2K"


@pytest.mark.parametrize("length", [96, 1000])
def test_dna_motif_label_is_what_the_motifs_say(length):
    data = builtin_task("dna-motif", length=length, size="tiny", seed=1)
    labels = []
    enhancer = builtin_task("dna-motif", length=length, size="tiny", seed=1, rule="enhancer", k=6, overlap=True)
    for ex, ex6 in zip(data.splits["train"], enhancer.splits["train"], strict=True):
        seq = data.tokenizer.decode(ex["input_ids"])
        assert len(seq) == length - 2
        label, _, pb = solve_dna(seq)
        assert label == ex["label"]
        labels.append(label)
        seq6 = enhancer.tokenizer.decode(ex6["input_ids"])  # overlapping 6-mers: one token per position
        assert len(ex6["input_ids"]) == length and len(seq6) == length - 2 + 5
        _, _, pb6 = solve_dna(seq6)
        assert ex6["label"] == MOTIFS.index(seq6[pb6:pb6 + 8]) - 2  # the enhancer's variant
    assert 0.2 < sum(labels) / len(labels) < 0.8
    tags = builtin_task("dna-tags", length=length, size="tiny", seed=1)
    for ex, tagged in zip(data.splits["train"], tags.splits["train"], strict=True):
        seq = data.tokenizer.decode(ex["input_ids"])
        _, pa, pb = solve_dna(seq)
        inside = [i - 1 for i, t in enumerate(tagged["labels"]) if t > 0]
        assert inside == list(range(pa, pa + 8)) + list(range(pb, pb + 8))


@pytest.mark.parametrize("length", [128, 1500])
def test_spread_summary_target_is_the_facts_in_order(length):
    data = builtin_task("spread-summary", length=length, size="tiny", seed=2)
    tok = data.tokenizer
    parts_used = set()
    for ex in data.splits["train"]:
        words = tok.decode(ex["input_ids"]).split()
        assert solve_summary(words, 4) == tok.decode(ex["target_ids"]).split()
        assert ex["target_ids"][-1] == tok.sep_id
        positions = [i for i, w in enumerate(words) if re.fullmatch(r"n\d+", w)]
        parts_used |= {p * 4 // len(words) for p in positions}
        if length >= 1000:  # spread: one fact per quarter, up to the sentences straddling a boundary
            assert len({p * 4 // len(words) for p in positions}) >= 3
    assert parts_used == {0, 1, 2, 3}


def test_builtin_tasks_are_seeded_and_errors_name_the_option():
    a = builtin_task("long-qa", length=256, size="tiny", seed=5).splits["val"][3]
    b = builtin_task("long-qa", length=256, size="tiny", seed=5).splits["val"][3]
    c = builtin_task("long-qa", length=256, size="tiny", seed=6).splits["val"][3]
    assert a == b and a != c
    with pytest.raises(ConfigError, match="unknown built-in task"):
        builtin_task("squad")
    with pytest.raises(ConfigError, match="size"):
        builtin_task("long-qa", size="huge")
