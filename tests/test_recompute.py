"""The engine's training path (sparse/recompute.py): gradients of the recomputing autograd function
against autograd through the saved gathers (`_recompute=False`) and against the dense oracle, in
float64, for everything the engine supports: partial slots, key padding, tile padding, per-head
layouts, dense rows, extra keys with [B, g] and per-query [B, N, g] keep masks, score biases with
differentiable inputs, rows with no key; plus gradcheck, chunking, low precision and what is saved."""

from __future__ import annotations

import pytest
import torch

import longrange as lr
from conftest import TOL, assert_close, assert_error_within_factor, lengths_mask
from longrange.patterns import BlockWindow, Dilated, Global, RandomBlocks, Window, global_blocks, strided
from longrange.sparse import ScoreBias, block_sparse_attention

PATTERNS = {
    "window": lambda h, b: Window(2),
    "causal_window": lambda h, b: Window(3, causal=True),
    "window_global": lambda h, b: Window(1) | Global([0, 9], clip=True),  # dense rows
    "per_head": lambda h, b: Dilated(1, dilation=tuple(range(1, h + 1))),
    "bigbird_like": lambda h, b: BlockWindow(1, b) | global_blocks(b) | RandomBlocks(1, b, num_heads=h, seed=3),
    "strided": lambda h, b: strided(3),
}


class TableBias(ScoreBias):
    """A test bias like ETC's: w[b, i, h, clip(j - i, -m, m) + m] for block keys, w[b, i, h, 2m + 1]
    for every extra key; w [B, N, H, 2m + 2] is its differentiable input."""

    def __init__(self, w: torch.Tensor, m: int, g: int):
        self.inputs, self.m, self.g = (w,), m, g

    def __call__(self, q_tok, kv_tok, w):  # w: (B, R, r, H, L)
        B, R, r, H, L = w.shape
        labels = (kv_tok[0][:, None, :] - q_tok[:, :, None]).clamp(-self.m, self.m) + self.m  # (R, r, c)
        labels = torch.cat([labels, labels.new_full((R, r, self.g), L - 1)], dim=-1)
        return torch.gather(w.transpose(2, 3), 4, labels[None, :, None].expand(B, R, H, r, labels.shape[-1]))

    def dense(self, n: int) -> torch.Tensor:
        """[B, H, n, n + g]: the bias of every pair, for the oracle."""
        w = self.inputs[0]
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        labels = torch.cat([(j - i).clamp(-self.m, self.m) + self.m, torch.full((n, self.g), w.shape[-1] - 1)], 1)
        return torch.gather(w.permute(0, 2, 1, 3), 3, labels[None, None].expand(w.shape[0], w.shape[2], n, -1))


def make_case(name, batch=2, heads=2, n=13, tile=4, d=4, padding=True, extra=None, bias=False, seed=0,
              dtype=torch.float64):
    """Inputs (all leaves requiring grad) and engine keyword arguments for one case."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()  # noqa: E731
    pattern = PATTERNS[name](heads, tile)
    q, k, v = rnd(batch, heads, n, d), rnd(batch, heads, n, d), rnd(batch, heads, n, d)
    leaves = {"q": q, "k": k, "v": v}
    kw = {}
    keep = None
    if padding:
        keep = lengths_mask([[n, max(n - tile - 1, 1), 0][i % 3] for i in range(batch)], n)  # 0: fully padded
        keep[-1, 0] = False
    g = 0
    if extra is not None:
        g = 3
        leaves["k_e"], leaves["v_e"] = rnd(batch, heads, g, d), rnd(batch, heads, g, d)
        keep_e = torch.rand(batch, g, generator=gen) > 0.3 if extra == "per_example" else \
            torch.rand(batch, n, g, generator=gen) > 0.4
        kw["extra_kv"] = (leaves["k_e"], leaves["v_e"], keep_e)
    if bias:
        leaves["w"] = rnd(batch, n, heads, 2 * 2 + 2)
        kw["score_bias"] = TableBias(leaves["w"], 2, g)
    return pattern, leaves, keep, kw


def oracle(pattern, leaves, keep, kw, n):
    """Dense softmax over [keys ; extra keys] with the dense bias; rows with no key give zeros."""
    q, k, v = leaves["q"], leaves["k"], leaves["v"]
    b = q.shape[0]
    mask = pattern.to_dense(n)
    mask = (mask if mask.dim() == 3 else mask[None])[None].expand(b, -1, n, n)
    if keep is not None:
        mask = mask & keep[:, None, None, :]
    if "extra_kv" in kw:
        k_e, v_e, keep_e = kw["extra_kv"]
        k, v = torch.cat([k, k_e], 2), torch.cat([v, v_e], 2)
        m_e = keep_e[:, None, None, :] if keep_e.dim() == 2 else keep_e[:, None]
        mask = torch.cat([mask, m_e.expand(b, mask.shape[1], n, -1)], -1)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if "score_bias" in kw:
        scores = scores + kw["score_bias"].dense(n)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    return torch.where(mask.any(-1, keepdim=True), probs, 0.0) @ v


def run(pattern, leaves, keep, kw, tile, recompute=True, chunk_bytes=None):
    layout = lr.compile_layout(pattern, leaves["q"].shape[2], tile)
    return block_sparse_attention(leaves["q"], leaves["k"], leaves["v"], layout, keep, chunk_bytes=chunk_bytes,
                                  _recompute=recompute, **kw)


@pytest.fixture(params=["fused", "two_matmul"])
def kernel(request, monkeypatch):
    """Both tile kernels of the training path: aten's fused CPU flash kernel and the two-matmul one
    (which dropout, biases needing dS and other devices use)."""
    from longrange.sparse import recompute

    if request.param == "two_matmul":
        monkeypatch.setattr(recompute, "_FLASH", None)
    elif recompute._FLASH is None:
        pytest.skip("this torch has no fused CPU flash kernel")
    return request.param


def gradients(out, leaves, seed=7):
    up = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), up), strict=True))


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("extra", [None, "per_example", "per_query"])
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_recomputed_gradients_equal_autograd_through_the_gathers(name, extra, bias, kernel):
    n, tile = 13, 4
    pattern, leaves, keep, kw = make_case(name, n=n, tile=tile, extra=extra, bias=bias)
    new = run(pattern, leaves, keep, kw, tile)
    old = run(pattern, leaves, keep, kw, tile, recompute=False)
    assert_close(new, old, msg="forward")
    assert_close(new, oracle(pattern, leaves, keep, kw, n), msg="forward vs oracle")
    g_new, g_old = gradients(new, leaves), gradients(old, leaves)
    g_ref = gradients(oracle(pattern, leaves, keep, kw, n), leaves)
    for key in leaves:
        assert_close(g_new[key], g_old[key], msg=f"grad {key} vs the autograd path")
        assert_close(g_new[key], g_ref[key], msg=f"grad {key} vs the oracle")


@pytest.mark.parametrize(("batch", "heads", "n", "tile"), [(1, 1, 1, 4), (3, 3, 13, 4), (2, 1, 17, 3),
                                                           (1, 2, 24, 2), (2, 2, 16, 8)])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("name", ["window_global", "bigbird_like", "per_head"])
def test_shapes_odd_lengths_and_tile_padding(name, batch, heads, n, tile, bias, kernel):
    pattern, leaves, keep, kw = make_case(name, batch=batch, heads=heads, n=n, tile=tile, padding=batch > 1,
                                          extra="per_query", bias=bias, seed=n)
    new = run(pattern, leaves, keep, kw, tile)
    old = run(pattern, leaves, keep, kw, tile, recompute=False)
    assert_close(new, old)
    g_new, g_old = gradients(new, leaves), gradients(old, leaves)
    for key in leaves:
        assert_close(g_new[key], g_old[key], msg=f"grad {key}")


@pytest.mark.parametrize("extra", [None, "per_example", "per_query"])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("pattern", [Window(1) | Global([0, 21]), Window(1, causal=True) | Global([5, -1])],
                         ids=["full_dense_rows", "masked_dense_rows"])
def test_dense_rows(pattern, padding, extra, kernel):
    """Global rows computed against every key (the side path): with and without token masks,
    padding and extra keys, on both kernels."""
    n, tile = 83, 4
    layout = lr.compile_layout(pattern, n, tile)
    assert len(layout.dense_rows) == 2
    _, leaves, keep, kw = make_case("window", batch=2, heads=3, n=n, tile=tile, padding=padding, extra=extra,
                                    seed=5)
    new = block_sparse_attention(leaves["q"], leaves["k"], leaves["v"], layout, keep, **kw)
    ref = oracle(pattern, leaves, keep, kw, n)
    assert_close(new, ref)
    g_new, g_ref = gradients(new, leaves), gradients(ref, leaves)
    for key in leaves:
        assert_close(g_new[key], g_ref[key], msg=f"grad {key}")


@pytest.mark.parametrize("chunk_bytes", [1, 3000, None])
def test_chunking_does_not_change_gradients(chunk_bytes, kernel):
    """chunk_bytes=1: one query block per chunk and one dense-row token per dense chunk."""
    n, tile = 29, 4
    pattern, leaves, keep, kw = make_case("window_global", batch=2, heads=3, n=n, tile=tile, extra="per_query",
                                          bias=True, seed=3)
    new = run(pattern, leaves, keep, kw, tile, chunk_bytes=chunk_bytes)
    ref = oracle(pattern, leaves, keep, kw, n)
    assert_close(new, ref)
    g_new, g_ref = gradients(new, leaves), gradients(ref, leaves)
    for key in leaves:
        assert_close(g_new[key], g_ref[key], msg=f"grad {key}")


def test_rows_with_no_key_give_zeros_and_zero_finite_gradients(kernel):
    n, tile = 10, 2
    pattern, leaves, keep, kw = make_case("window_global", batch=2, n=n, tile=tile, extra="per_query", bias=True)
    keep = torch.zeros(2, n, dtype=torch.bool)
    keep[0, 5] = True  # example 0: only token 5 is a key; example 1: none at all
    kw["extra_kv"] = (*kw["extra_kv"][:2], torch.zeros(2, n, 3, dtype=torch.bool))
    out = run(pattern, leaves, keep, kw, tile)
    sees = torch.tensor([0, 4, 5, 6, 9])  # the global rows 0, 9 and the window of radius 1 around 5
    blind = torch.ones(n, dtype=torch.bool)
    blind[sees] = False
    assert (out[1] == 0).all() and (out[0, :, blind] == 0).all() and (out[0, :, sees] != 0).all()
    g = gradients(out, leaves)
    for key, t in g.items():
        assert torch.isfinite(t).all(), key
    assert (g["q"][1] == 0).all() and (g["k"][1] == 0).all() and (g["v"][1] == 0).all()
    ref = gradients(oracle(pattern, leaves, keep, kw, n), leaves)
    for key in leaves:
        assert_close(g[key], ref[key], msg=f"grad {key}")


@pytest.mark.parametrize("name", ["window_global", "per_head"])
def test_gradcheck(name, kernel):
    pattern, leaves, keep, kw = make_case(name, batch=1, heads=2, n=7, tile=2, d=3, extra="per_query", bias=True,
                                          seed=2)
    keep = lengths_mask([6], 7)
    k_e, v_e, keep_e = kw.pop("extra_kv")
    w = leaves["w"]
    layout = lr.compile_layout(pattern, 7, 2)
    m = kw["score_bias"].m

    def fn(q, k, v, k_e, v_e, w):
        return block_sparse_attention(q, k, v, layout, keep, extra_kv=(k_e, v_e, keep_e),
                                      score_bias=TableBias(w, m, 3))

    args = (leaves["q"], leaves["k"], leaves["v"], k_e, v_e, w)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_gradients_are_finite_and_close_to_the_golden_ones(dtype):
    n, tile = 21, 4
    pattern, leaves, keep, kw = make_case("bigbird_like", n=n, tile=tile, d=8, extra="per_example", seed=4)
    golden = gradients(run(pattern, leaves, keep, kw, tile), leaves)
    low = {key: t.detach().to(dtype).requires_grad_() for key, t in leaves.items()}
    kw_low = {"extra_kv": (low["k_e"], low["v_e"], kw["extra_kv"][2])}
    out = run(pattern, low, keep, kw_low, tile)
    assert out.dtype == dtype
    got = gradients(out, low)
    ref_out = oracle(pattern, low, keep, kw_low, n)
    ref = gradients(ref_out, low)
    for key in leaves:
        assert got[key].dtype == dtype and torch.isfinite(got[key].float()).all()
        assert_error_within_factor(got[key], ref[key], golden[key], factor=4.0, floor=TOL[dtype]["atol"] * 10)


def test_only_linear_size_tensors_are_saved_for_backward():
    """What the training path keeps for backward is O(N·D): q, k, v, the output, the lse (no
    gathered blocks); autograd through the gathers keeps about k times the keys and values."""
    n, tile, d = 256, 8, 16
    pattern = BlockWindow(1, tile) | global_blocks(tile) | RandomBlocks(3, tile, seed=1)
    layout = lr.compile_layout(pattern, n, tile)
    q, k, v = (torch.randn(1, 2, n, d, requires_grad=True) for _ in range(3))

    def saved_bytes(recompute):
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block_sparse_attention(q, k, v, layout, _recompute=recompute)
        return sum(seen.values())

    linear = 4 * q.numel() * q.element_size() + 2 * n * 4 * 2  # q, k, v, out, lse (+ slack)
    assert saved_bytes(True) <= linear
    assert saved_bytes(False) > 3 * linear


def test_bias_reading_an_undeclared_tensor_that_needs_grad_is_an_error():
    q, k, v = (torch.randn(1, 1, 8, 4, requires_grad=True) for _ in range(3))
    w = torch.randn(8, requires_grad=True)
    layout = lr.compile_layout(Window(2), 8, 4)
    bias = lambda qt, kt: w[(kt[0][:, None] - qt[..., None]).abs().clamp(max=7)][:, None]  # noqa: E731 (R, 1, r, c)
    with pytest.raises(ValueError, match="without listing it in `inputs`"):
        block_sparse_attention(q, k, v, layout, score_bias=bias)
    with torch.no_grad():  # nothing to lose without autograd
        assert torch.isfinite(block_sparse_attention(q, k, v, layout, score_bias=bias)).all()


def test_inputs_that_need_no_gradient_get_none_and_others_still_flow():
    pattern, leaves, keep, kw = make_case("window", extra="per_example", bias=True)
    leaves["k_e"].requires_grad_(False)
    leaves["w"].requires_grad_(False)
    out = run(pattern, leaves, keep, kw, 4)
    got = torch.autograd.grad(out.sum(), [leaves["q"], leaves["v_e"]])
    assert all(torch.isfinite(g).all() for g in got)


# -- the log-sum-exp output and merging softmaxes over disjoint key sets -----------------------------------
def dense_lse(pattern, leaves, keep, n):
    q, k = leaves["q"], leaves["k"]
    mask = pattern.to_dense(n)
    mask = (mask if mask.dim() == 3 else mask[None])[None]
    if keep is not None:
        mask = mask & keep[:, None, None, :]
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1)


@pytest.mark.parametrize("name", ["window_global", "per_head", "causal_window"])
def test_returned_lse_is_the_rows_logsumexp_and_differentiable(name, kernel):
    n, tile = 21, 4
    pattern, leaves, keep, kw = make_case(name, n=n, tile=tile)
    keep[1, :] = False  # a fully padded example: lse -inf
    layout = lr.compile_layout(pattern, n, tile)
    out, lse = block_sparse_attention(leaves["q"], leaves["k"], leaves["v"], layout, keep, return_lse=True)
    want = dense_lse(pattern, leaves, keep, n)
    assert torch.isneginf(lse[1]).all()
    assert_close(lse[0], want[0])
    assert_close(out, oracle(pattern, leaves, keep, kw, n))
    w = torch.randn(lse[0].shape, dtype=lse.dtype)
    got = torch.autograd.grad((out.sum() + (lse[0] * w).sum()), list(leaves.values()))
    ref = torch.autograd.grad((oracle(pattern, leaves, keep, kw, n).sum() + (want[0] * w).sum()),
                              list(leaves.values()))
    for key, a, b in zip(leaves, got, ref, strict=True):
        assert_close(a, b, msg=f"grad {key}")
    with torch.no_grad():
        out2, lse2 = block_sparse_attention(leaves["q"], leaves["k"], leaves["v"], layout, keep, return_lse=True)
    assert_close(lse2, lse.detach())


def test_merging_disjoint_key_sets_equals_attention_over_their_union():
    """A(1) = a causal window, A(2) = every third key before it (Sparse Transformer's strided
    factors, disjoint): merge_softmax of the two equals one softmax over A(1) ∪ A(2)."""
    from longrange.patterns import Band, StridedColumns
    from longrange.sparse.engine import merge_softmax

    n, tile = 26, 4
    a1 = Window(2, causal=True)
    a2 = StridedColumns(3) & Band(3, float("inf"))  # strictly beyond the window
    _, leaves, keep, kw = make_case("window", n=n, tile=tile, seed=9)
    q, k, v = leaves["q"], leaves["k"], leaves["v"]
    parts = [block_sparse_attention(q, k, v, lr.compile_layout(p, n, tile), keep, return_lse=True) for p in (a1, a2)]
    got = merge_softmax(*parts)
    want = oracle(a1 | a2, leaves, keep, kw, n)
    assert_close(got, want)
    g_got, g_want = gradients(got, leaves), gradients(want, leaves)
    for key in leaves:
        assert_close(g_got[key], g_want[key], msg=f"grad {key}")


# -- extra keys that are tokens of the sequence (`TokenKeys`) -----------------------------------------------
@pytest.mark.parametrize("mode", ["inference", "recompute", "autograd", "dropout"])
@pytest.mark.parametrize("per_query", [False, True], ids=["keep_bg", "keep_bng"])
@pytest.mark.parametrize("name", ["window", "causal_window", "window_global", "per_head", "strided"])
def test_token_keys_equal_the_same_keys_given_as_tensors(name, per_query, mode, kernel):
    """Extra keys read in place from k, v (their gradients added back to those rows) against the
    same keys copied out as tensors (gradients through the indexing): outputs and gradients, with
    key padding, tile padding (13 tokens on tiles of 4) and a fully padded example; layouts with
    dense rows (window_global) take the tensors' path inside the engine."""
    from longrange.sparse import TokenKeys

    n, tile, batch = 13, 4, 3
    pattern, leaves, keep, _ = make_case(name, batch=batch, n=n, tile=tile, seed=11)
    gen = torch.Generator().manual_seed(5)
    idx = torch.stack([torch.randperm(n, generator=gen)[:3] for _ in range(batch)])  # (B, g)
    keep_e = torch.rand(batch, n, 3, generator=gen) > 0.4 if per_query else torch.rand(batch, 3, generator=gen) > 0.3
    tokens = TokenKeys(idx, keep_e)
    layout = lr.compile_layout(pattern, n, tile)
    kw = {"_recompute": mode != "autograd"}
    if mode == "dropout":
        kw.update(dropout_p=0.3, dropout_seed=9)

    def call(extra):
        return block_sparse_attention(leaves["q"], leaves["k"], leaves["v"], layout, keep, extra_kv=extra, **kw)

    if mode == "inference":
        with torch.no_grad():
            assert_close(call(tokens), call(tokens.as_extra_kv(leaves["k"], leaves["v"])))
        return
    got, want = call(tokens), call(tokens.as_extra_kv(leaves["k"], leaves["v"]))
    assert_close(got, want, msg="forward")
    g_got, g_want = gradients(got, leaves), gradients(want, leaves)
    for key in leaves:
        assert_close(g_got[key], g_want[key], msg=f"grad {key}")


def test_token_keys_make_no_copy_of_the_keys():
    """With the extra keys given as tokens, the training path saves the caller's k and v
    themselves (tile-aligned length): no [keys ; extra keys] copy."""
    from longrange.sparse import TokenKeys

    n, tile, d = 64, 8, 16
    layout = lr.compile_layout(Window(3), n, tile)
    q, k, v = (torch.randn(1, 2, n, d, requires_grad=True) for _ in range(3))
    idx, keep_e = torch.tensor([[0, 40]]), torch.ones(1, 2, dtype=torch.bool)
    seen: set[int] = set()

    def pack(t):
        seen.add(t.untyped_storage().data_ptr())
        return t

    for extra, copied in ((TokenKeys(idx, keep_e), False), (TokenKeys(idx, keep_e).as_extra_kv(k, v), True)):
        seen.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block_sparse_attention(q, k, v, layout, extra_kv=extra)
        assert (k.untyped_storage().data_ptr() in seen) is not copied
        assert (v.untyped_storage().data_ptr() in seen) is not copied


def test_token_keys_are_checked():
    from longrange.sparse import TokenKeys

    layout = lr.compile_layout(Window(1), 8, 4)
    q = torch.randn(2, 1, 8, 4)
    ok = torch.ones(2, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"key positions in \[0, 8\)"):
        block_sparse_attention(q, q, q, layout, extra_kv=TokenKeys(torch.tensor([[1], [8]]), ok))
    with pytest.raises(ValueError, match="idx must be long"):
        block_sparse_attention(q, q, q, layout, extra_kv=TokenKeys(torch.tensor([[1.0], [2.0]]), ok))
    with pytest.raises(ValueError, match="keep mask must be bool"):
        block_sparse_attention(q, q, q, layout, extra_kv=TokenKeys(torch.tensor([[1], [2]]), ok[:1]))


# -- one tile holding the whole (sub)sequence: read in place ----------------------------------------------
@pytest.mark.parametrize("mode", ["inference", "recompute", "autograd", "lse"])
@pytest.mark.parametrize("name", ["window", "causal_window", "per_head", "strided"])
def test_single_tile_layouts_read_strided_inputs_in_place(name, mode, kernel):
    """A layout of one tile (n = tile) runs on q, k, v as given, here permuted views of one buffer
    (no padding copy, no gather): outputs, log-sum-exps and gradients against the dense oracle,
    with key padding and a fully padded example."""
    n, heads, batch = 12, 3, 3
    pattern = PATTERNS[name](heads, n)
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(batch, n, 3, heads, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    q, k, v = (base[:, :, i].transpose(1, 2) for i in range(3))  # [B, H, n, D], not contiguous
    assert not q.is_contiguous()
    keep = lengths_mask([n, 5, 0], n)
    layout = lr.compile_layout(pattern, n, n)
    from longrange.sparse.gather import single_tile

    assert single_tile(layout)
    leaves = {"q": q, "k": k, "v": v}
    want = oracle(pattern, leaves, keep, {}, n)
    kw = {"_recompute": mode != "autograd", "return_lse": mode == "lse"}
    if mode == "inference":
        with torch.no_grad():
            assert_close(block_sparse_attention(q, k, v, layout, keep), want)
        return
    got = block_sparse_attention(q, k, v, layout, keep, **kw)
    up = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    loss, want_loss = (got if mode != "lse" else got[0]) * up, want * up
    if mode == "lse":  # the log-sum-exp's gradient too (rows with no key: -inf, left out)
        got, lse = got
        lse_want = dense_lse(pattern, leaves, keep, n)
        assert_close(lse, lse_want)
        up_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64)
        loss = loss.sum() + (lse.masked_fill(lse.isinf(), 0) * up_lse).sum()
        want_loss = want_loss.sum() + (lse_want.masked_fill(lse_want.isinf(), 0) * up_lse).sum()
    assert_close(got, want)
    (g_got,) = torch.autograd.grad(loss.sum(), base)
    (g_want,) = torch.autograd.grad(want_loss.sum(), base)
    assert_close(g_got, g_want)


@pytest.mark.parametrize("extra", [None, "tensors", "tokens"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_batch_slices_equal_one_call(extra, dropout, monkeypatch):
    """When one query block of the whole batch passes the chunk budget, the training path runs its
    chunks on slices of the batch (`_batch_slices`, inside its one autograd function): outputs,
    log-sum-exps and gradients equal one pass's, attention dropout included (each slice's rows
    keep their example ids)."""
    from longrange.sparse import TokenKeys, recompute
    from longrange.sparse.engine import _batch_slices

    n, tile, batch = 13, 4, 5
    pattern, leaves, keep, kw = make_case("window", batch=batch, n=n, tile=tile, extra="per_query" if extra else None)
    layout = lr.compile_layout(pattern, n, tile)
    if extra == "tokens":
        leaves.pop("k_e"), leaves.pop("v_e")
        idx = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(i))[:3] for i in range(batch)])
        kw["extra_kv"] = TokenKeys(idx, kw["extra_kv"][2])
    assert _batch_slices(leaves["q"], 10**6, 1) == batch and _batch_slices(leaves["q"], 10**6, 2**40) == 1
    sliced = []
    real = recompute.Plan.for_batch
    monkeypatch.setattr(recompute.Plan, "for_batch", lambda self, s, b: sliced.append(s) or real(self, s, b))

    def call(chunk_bytes):
        return block_sparse_attention(leaves["q"], leaves["k"], leaves["v"], layout, keep, chunk_bytes=chunk_bytes,
                                      dropout_p=dropout, dropout_seed=4, return_lse=True, **kw)

    (got, lse), (want, lse_want) = call(1), call(2**40)
    assert len(sliced) == batch  # forward: one slice per example (backward runs later, below)
    assert_close(got, want)
    assert_close(lse, lse_want)
    g_got, g_want = gradients(got, leaves), gradients(want, leaves)
    for key in leaves:
        assert_close(g_got[key], g_want[key], msg=f"grad {key}")
