"""`routing`: the Routing Transformer's attention (Roy et al., TACL 2021): online k-means routing
mixed with local attention heads.

Heads are split: the first `heads - routed_heads` are local (a sliding window of `window` tokens on
the sparse engine, as `local`), the last `routed_heads` are routed. Per routed head h:

1. Route: q̂, k̂ = q / ‖q‖, k / ‖k‖ (unit vectors, used only for routing); similarity to the head's
   c = `num_clusters` centroids μ [c, D] (a buffer): s = q̂ μᵀ, k̂ μᵀ [N, c]. Queries and keys share
   the clustering (the same centroids).
2. Balanced top-k membership: cluster j takes exactly the w = `cluster_size` queries and the w keys
   most similar to μ_j (w = N / c by default, the paper's balanced clusters; then c must divide N).
   Clusters therefore run as c dense [w, w] blocks: one fused SDPA over [B, H_r·c, w, D].
3. A query's output is the mean of its outputs over the clusters that took it (a query no cluster
   took gets zeros from the routed heads, as in the official code's scatter).
4. Training only (`module.training`): the centroids move by an exponential moving average, not by
   gradients: each normalised query and key (real tokens only) goes to its nearest centroid and
   μ_j ← normalise(λ·μ_j + (1 − λ)·mean of its members), λ = `ema_decay`. The update follows the
   routing, so a call routes with the centroids as they were when it started. The centroids are a
   buffer: saved in checkpoints, moved by `.to()`, never in the optimizer. Eval never changes them.
   (The paper's commitment loss needs an auxiliary-loss channel our interface does not have; not used.)

Cost per routed head: c·w² pairs (N·w for c·w = N: linear in N at fixed w) + 2·N·c·D for the
similarities; the local heads as `local`. Memory O(N·D + c·w²).

`causal=True`: top-k membership is not causal (a later token can push an earlier one out of a
cluster's top-w, so earlier outputs would change; the official code has this leak). The causal
variant keeps the routing and the dense blocks but makes membership causal: each token joins its
query's nearest centroid; each cluster's members, in position order, are cut into chunks of w
(a token's chunk depends only on earlier tokens); a query attends to the members of its own chunk
and of the cluster's previous chunk that are not later than itself (Reformer's look-back, within a
cluster). Earlier outputs are then bit-identical when later tokens change (tested). The chunks run
as dense [w, 2w] blocks over the members laid out cluster by cluster, each cluster padded to whole
chunks: up to N + (c + 1)·w slots, so up to twice the non-causal pairs at c·w = N.

Lengths: `cluster_size` fixed runs any N (clusters then overlap or leave tokens out when c·w ≠ N).
`num_clusters=None` derives c = ceil(seq_len / cluster_size) from `seq_len` (a length option: the
bench and LRA set it to the input length), i.e. fixed-size clusters, linear time.
Defaults are the official enwik8-8K setting (`enwik8_local_cluster8k`): 16 clusters, half the heads
routed, local heads with 256 tokens each side; w = N / c (512 at 8K).

Exact limit (tested): one cluster with cluster_size None takes every token, so the routed heads are
full softmax attention.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.nn import functional as F

from longrange.core.config import check_nonnegative_int, check_positive_int
from longrange.core.flops import MacCount, pairwise
from longrange.core.interface import Attention, Capabilities
from longrange.core.masking import sdpa_zero_empty_rows
from longrange.core.reference import reference_attention
from longrange.mechanisms.base import auto_tile
from longrange.mechanisms.local import WindowConfig
from longrange.patterns import Window
from longrange.sparse.backends import call_records_grad, decide, run_layout
from longrange.sparse.layout import BlockLayout, compile_layout


@dataclasses.dataclass
class RoutingConfig(WindowConfig):
    """`window` / `tile`: the local heads' two-sided window (256 keys each side, the official local
    query block 256 with a 256-token flange) and the engine's tile."""

    name = "routing"
    num_clusters: int | None = 16  # official enwik8-8K: 16 clusters; None: ceil(seq_len / cluster_size)
    cluster_size: int | None = None  # tokens each cluster takes; None: N / num_clusters (must divide N)
    seq_len: int | None = None  # length option, read only when num_clusters is None
    routed_heads: int | None = None  # None: heads // 2 (official: 4 routed + 4 local of 8 heads)
    ema_decay: float = 0.999  # λ of the centroid moving average (lucidrains' kmeans_ema_decay)
    seed: int = 0  # draws the initial centroids (random unit vectors)
    causal: bool = False

    def validate(self):
        super().validate()
        if self.num_clusters is not None:
            check_positive_int("num_clusters", self.num_clusters)
        if self.cluster_size is not None:
            check_positive_int("cluster_size", self.cluster_size)
        if self.num_clusters is None and self.cluster_size is None:
            raise ValueError("num_clusters=None derives the cluster count from seq_len / cluster_size: give "
                             "cluster_size (or num_clusters)")
        if self.seq_len is not None:
            check_positive_int("seq_len", self.seq_len)
        if self.routed_heads is not None:
            check_nonnegative_int("routed_heads", self.routed_heads)
            if self.routed_heads > self.heads:
                raise ValueError(f"routed_heads={self.routed_heads} must be at most heads={self.heads}")
        d = self.ema_decay
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0:
            raise ValueError(f"ema_decay must be a number in [0, 1], got {d!r}")
        check_nonnegative_int("seed", self.seed)

    @property
    def num_routed(self) -> int:
        return self.heads // 2 if self.routed_heads is None else self.routed_heads

    def clusters(self) -> int:
        """The number of centroids: num_clusters, or ceil(seq_len / cluster_size)."""
        if self.num_clusters is not None:
            return self.num_clusters
        if self.seq_len is None:
            raise ValueError("num_clusters=None needs seq_len (the length the clusters are sized for: "
                             "num_clusters = ceil(seq_len / cluster_size)); give seq_len or num_clusters")
        return -(-self.seq_len // self.cluster_size)


# -- routing (shared by the fast path and the oracle) --------------------------------------------------------
def unit(x: torch.Tensor) -> torch.Tensor:
    """x / ‖x‖ in float32 (float64 stays), detached: routing carries no gradient."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    return F.normalize(x.detach().to(compute), dim=-1)


def similarities(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """unit(x) [B, Hr, N, D] against centroids [Hr, c, D] -> [B, Hr, N, c]."""
    return torch.matmul(unit(x), centroids.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
                        .transpose(-1, -2))


def top_members(sim: torch.Tensor, keep: torch.Tensor | None, w: int) -> torch.Tensor:
    """Balanced membership: for each cluster the w most similar tokens (padding last), in position
    order. sim [B, Hr, N, c] -> [B, Hr, c, w] long."""
    if keep is not None:
        sim = sim.masked_fill(~keep[:, None, :, None], float("-inf"))
    idx = sim.topk(w, dim=2).indices  # (B, Hr, w, c)
    return idx.transpose(2, 3).sort(dim=-1).values


def nearest(sim: torch.Tensor) -> torch.Tensor:
    """Each token's nearest centroid: [B, Hr, N, c] -> [B, Hr, N] long."""
    return sim.argmax(-1)


def chunk_ranks(cluster: torch.Tensor, w: int) -> torch.Tensor:
    """For the causal variant: each token's chunk within its cluster, rank // w, where rank counts
    the earlier tokens of the same cluster. cluster [B, Hr, N] -> [B, Hr, N] long. O(N·c) (oracle)."""
    onehot = F.one_hot(cluster)  # (B, Hr, N, c')
    rank = (onehot.cumsum(2) - onehot).gather(-1, cluster[..., None])[..., 0]
    return rank // w


# -- the module ---------------------------------------------------------------------------------------------
class RoutingAttention(Attention):
    """Routing attention (see the module docstring). forward(x [B, N, C], attention_mask [B, N] bool
    or None) -> [B, N, C]. `centroids` [routed_heads, num_clusters, head_dim] is a buffer.

    Not a `PatternAttention`: only its local heads have a fixed graph (their window layout is
    compiled once per length, on tiles as `local`'s); the routed heads' graph follows the data."""

    config_class = RoutingConfig
    capabilities = Capabilities(causal=True, length_options=("seq_len",))

    def __init__(self, config: RoutingConfig):
        super().__init__(config)
        gen = torch.Generator().manual_seed(config.seed)
        init = torch.randn(config.num_routed, config.clusters(), config.head_dim, generator=gen)
        self.register_buffer("centroids", F.normalize(init, dim=-1))
        self._routed_with: torch.Tensor | None = None  # the centroids the last training call routed with
        self._layouts: dict[tuple[int, str], BlockLayout] = {}

    @property
    def tile(self) -> int:
        """The local heads' engine tile: `tile`, or as `local`'s (see `auto_tile`)."""
        return self.config.tile or auto_tile(self.config.window // 2)

    def window(self) -> Window:
        return Window(self.config.window // 2, causal=self.config.causal)

    def layout(self, n: int, device: torch.device | str = "cpu") -> BlockLayout:
        """The local heads' window layout at length n (compiled once per length and device)."""
        key = (n, str(device))
        if key not in self._layouts:
            self._layouts[key] = compile_layout(self.window(), n, self.tile).to(device)
        return self._layouts[key]

    def cluster_size(self, n: int) -> int:
        """w at length n: cluster_size (at most n), or n / num_clusters (num_clusters must divide n)."""
        c = self.centroids.shape[1]
        if self.config.cluster_size is not None:
            return min(self.config.cluster_size, n)
        if n % c:
            raise ValueError(f"num_clusters={c} must divide the input length n={n} when cluster_size is None "
                             f"(each cluster takes n / num_clusters tokens); set cluster_size to route any length")
        return n // c

    def explain(self, x: torch.Tensor, **inputs) -> str:
        """The local heads' backend (the routed heads run their own kernel) and why."""
        needs_grad = call_records_grad(self, x)
        try:
            verdict = str(decide(x, self.layout(x.shape[1], x.device), self.config.backend, needs_grad=needs_grad))
        except ValueError as err:
            verdict = f"error: {err}"
        return (f"routing (backend={self.config.backend!r}) at n={x.shape[1]} on {x.device.type}: local heads "
                f"{verdict}; routed heads: their own kernel")

    # -- the call ---------------------------------------------------------------------------------------------
    def attend(self, q, k, v, keep, **extra):
        local = self.config.heads - self.config.num_routed
        parts = []
        if local:
            layout = self.layout(q.shape[2], q.device)
            parts.append(run_layout(q[:, :local], k[:, :local], v[:, :local], layout, keep, backend=self.config.backend,
                                    who="routing (local heads)"))
        if self.config.num_routed:
            qr, kr, vr = q[:, local:], k[:, local:], v[:, local:]
            w = self.cluster_size(q.shape[2])
            centroids = self.centroids.clone() if self.training else self.centroids
            self._routed_with = centroids if self.training else None
            sim_q = similarities(qr, centroids)  # (B, Hr, N, c)
            if self.config.causal:
                parts.append(self._causal_routed(qr, kr, vr, keep, nearest(sim_q), w))
            else:
                sim_k = similarities(kr, centroids)
                parts.append(self._routed(qr, kr, vr, keep, sim_q, sim_k, w))
            if self.training:
                self.update_centroids(qr, kr, keep)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _routed(self, q, k, v, keep, sim_q, sim_k, w):
        """Balanced top-w clusters as dense blocks; outputs averaged over a query's clusters."""
        B, Hr, N, D = q.shape
        q_idx, k_idx = top_members(sim_q, keep, w), top_members(sim_k, keep, w)  # (B, Hr, c, w)
        c = q_idx.shape[2]

        def take(t, idx):  # (B, Hr, N, D) -> (B, Hr·c, w, D)
            return t.gather(2, idx.reshape(B, Hr, c * w, 1).expand(B, Hr, c * w, D)).view(B, Hr * c, w, D)

        qc, kc, vc = take(q, q_idx), take(k, k_idx), take(v, k_idx)
        if keep is None:
            out = F.scaled_dot_product_attention(qc, kc, vc)
        else:
            key_keep = keep[:, None, :].expand(B, Hr, N).gather(2, k_idx.reshape(B, Hr, c * w))
            out = sdpa_zero_empty_rows(qc, kc, vc, key_keep.view(B, Hr * c, 1, w), None)
        flat = q_idx.reshape(B, Hr, c * w, 1)
        total = torch.zeros_like(q).scatter_add(2, flat.expand(B, Hr, c * w, D), out.reshape(B, Hr, c * w, D))
        count = torch.zeros(B, Hr, N, 1, dtype=q.dtype, device=q.device).scatter_add(
            2, flat, torch.ones_like(flat, dtype=q.dtype))
        return total / count.clamp(min=1)

    def _causal_routed(self, q, k, v, keep, cluster, w):
        """Causal variant: per-cluster chunks of w members in position order, each attending to
        itself and the cluster's previous chunk, causally. Slots: members laid out cluster by
        cluster, each cluster padded to whole chunks (padding tokens go to an extra cluster)."""
        B, Hr, N, D = q.shape
        c = self.centroids.shape[1]
        groups = c + (keep is not None)
        if keep is not None:
            cluster = cluster.masked_fill(~keep[:, None, :], c)  # padding: a cluster of its own
        pos = torch.arange(N, device=q.device)
        order = torch.argsort(cluster * N + pos, dim=-1)  # (B, Hr, N): by cluster, then position
        sizes = torch.zeros(B, Hr, groups, dtype=torch.long, device=q.device).scatter_add(
            2, cluster, torch.ones_like(cluster))
        first = sizes.cumsum(-1) - sizes  # first sorted index of each cluster
        chunks = -(-sizes // w)
        first_slot = (chunks.cumsum(-1) - chunks) * w  # first slot of each cluster
        in_order = cluster.gather(2, order)
        slot_sorted = first_slot.gather(2, in_order) + pos - first.gather(2, in_order)
        blocks = -(-N // w) + groups  # >= Σ ceil(size / w): a static number of [w, 2w] blocks
        S = blocks * w
        token_of_slot = torch.full((B, Hr, S), N, dtype=torch.long, device=q.device)  # N: an empty slot
        token_of_slot.scatter_(2, slot_sorted, order)

        def take(t):  # (B, Hr, N, D) -> (B, Hr, S, D), zeros in empty slots
            t = F.pad(t, (0, 0, 0, 1))
            return t.gather(2, token_of_slot[..., None].expand(B, Hr, S, D))

        qs, ks, vs = take(q), take(k), take(v)
        slot_pos = token_of_slot  # position, N if empty
        slot_cluster = F.pad(cluster, (0, 1), value=-1).gather(2, token_of_slot)
        real = torch.ones(B, N, dtype=torch.bool, device=q.device) if keep is None else keep
        slot_real = F.pad(real, (0, 1), value=False)[:, None, :].expand(B, Hr, N + 1).gather(2, token_of_slot)

        def look_back(t):  # (B, Hr, S, ...) -> (B, Hr, blocks, 2w, ...): previous chunk, then own
            t = t.view(B, Hr, blocks, w, *t.shape[3:])
            prev = torch.cat([torch.zeros_like(t[:, :, :1]), t[:, :, :-1]], dim=2)
            return torch.cat([prev, t], dim=3)

        kb, vb = look_back(ks), look_back(vs)
        kpos = look_back(slot_pos.masked_fill(~slot_real, N + 1)[..., None])[..., 0]  # (B, Hr, blocks, 2w)
        kcl = look_back(slot_cluster[..., None] + 2)[..., 0] - 2  # the zero block becomes cluster -2: no match
        qpos, qcl = slot_pos.view(B, Hr, blocks, w), slot_cluster.view(B, Hr, blocks, w)
        mask = (kcl[..., None, :] == qcl[..., :, None]) & (kpos[..., None, :] <= qpos[..., :, None])
        out = sdpa_zero_empty_rows(qs.view(B, Hr * blocks, w, D), kb.view(B, Hr * blocks, 2 * w, D),
                                   vb.view(B, Hr * blocks, 2 * w, D), mask.view(B, Hr * blocks, w, 2 * w), None)
        slot_of_token = slot_sorted.new_empty(B, Hr, N).scatter_(2, order, slot_sorted)
        return out.view(B, Hr, S, D).gather(2, slot_of_token[..., None].expand(B, Hr, N, D))

    # -- the centroids ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def update_centroids(self, q, k, keep) -> None:
        """One EMA step of online k-means from the routed heads' queries and keys (real tokens):
        μ_j ← normalise(λ·μ_j + (1 − λ)·mean of the unit vectors nearest to μ_j); clusters that got
        no member keep their centroid."""
        lam = self.config.ema_decay
        if lam == 1.0:  # frozen
            return
        mu = self.centroids
        hr, c, d = mu.shape
        sums = torch.zeros(hr * c, d, dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                           device=q.device)
        counts = torch.zeros(hr * c, dtype=sums.dtype, device=q.device)
        heads = (torch.arange(hr, device=q.device) * c)[None, :, None]
        weight = None if keep is None else keep[:, None, :, None].to(sums.dtype)
        for x in (q, k):
            xu = unit(x)  # (B, Hr, N, D)
            idx = (nearest(torch.matmul(xu, mu.to(xu.dtype).transpose(-1, -2))) + heads).reshape(-1)
            xw = xu if weight is None else xu * weight
            ones = torch.ones_like(xu[..., 0]) if weight is None else weight[..., 0].expand_as(xu[..., 0])
            sums.index_add_(0, idx, xw.reshape(-1, d))
            counts.index_add_(0, idx, ones.reshape(-1))
        has = (counts > 0)[:, None]
        means = sums / counts.clamp(min=1)[:, None]
        moved = F.normalize(lam * mu.reshape(hr * c, d).to(sums.dtype) + (1 - lam) * means, dim=-1)
        mu.copy_(torch.where(has, moved, mu.reshape(hr * c, d).to(sums.dtype)).view(hr, c, d).to(mu.dtype))

    # -- cost ---------------------------------------------------------------------------------------------------
    def macs(self, n: int, global_tokens: int = 0) -> MacCount:
        """Local heads: the engine's layout. Routed heads: c·w² pairs (causal: (ceil(n/w) + c)·w slots ×
        2w keys), and the similarities to the centroids (queries and keys; causal: queries only)."""
        cfg = self.config
        d, hr = cfg.head_dim, cfg.num_routed
        local = cfg.heads - hr
        pairs = self.layout(n).computed_pairs(heads=local) if local else 0
        other = 0
        if hr:
            c, w = self.centroids.shape[1], self.cluster_size(n)
            if cfg.causal:
                pairs += hr * (-(-n // w) + c) * w * 2 * w
                other = hr * n * c * d
            else:
                pairs += hr * c * w * w
                other = hr * 2 * n * c * d
        return pairwise(pairs, d, self.projection_macs(n), other=other)

    # -- the oracle ---------------------------------------------------------------------------------------------
    def dense_mask(self, n: int) -> torch.Tensor:
        raise NotImplementedError("routing's graph depends on the input (its clusters); see reference_attend")

    def reference_attend(self, q, k, v, keep):
        """Local heads: softmax over the window, dense. Routed heads, with the same routing decisions
        (the centroids the last call routed with): non-causal, one dense masked attention per cluster
        over its members, averaged over the clusters that took each query; causal, one dense mask
        (same cluster, same or previous chunk by rank, not later, real)."""
        B, H, N, D = q.shape
        cfg = self.config
        local = cfg.heads - cfg.num_routed
        parts = []
        if local:
            window = self.window().to_dense(N).to(q.device)
            mask = window[None, None] if keep is None else window[None, None] & keep[:, None, None, :]
            parts.append(reference_attention(q[:, :local], k[:, :local], v[:, :local], mask))
        if cfg.num_routed:
            qr, kr, vr = q[:, local:], k[:, local:], v[:, local:]
            centroids = self._routed_with if self._routed_with is not None else self.centroids
            w = self.cluster_size(N)
            real = torch.ones(B, N, dtype=torch.bool, device=q.device) if keep is None else keep
            sim_q = similarities(qr, centroids)
            if cfg.causal:
                cluster = nearest(sim_q).masked_fill(~real[:, None, :], centroids.shape[1])
                chunk = chunk_ranks(cluster, w)
                same = cluster[..., :, None] == cluster[..., None, :]
                gap = chunk[..., :, None] - chunk[..., None, :]
                near = (gap == 0) | (gap == 1)
                earlier = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
                mask = same & near & earlier & real[:, None, None, :]
                parts.append(reference_attention(qr, kr, vr, mask))
            else:
                q_idx = top_members(sim_q, keep, w)
                k_idx = top_members(similarities(kr, centroids), keep, w)
                c = q_idx.shape[2]
                q_in = F.one_hot(q_idx, N).any(3)  # (B, Hr, c, N): query i is in cluster j
                k_in = F.one_hot(k_idx, N).any(3)
                out = torch.zeros_like(qr)
                for j in range(c):
                    mask = k_in[:, :, j, None, :] & real[:, None, None, :]
                    out = out + q_in[:, :, j, :, None] * reference_attention(qr, kr, vr, mask)
                parts.append(out / q_in.sum(2)[..., None].clamp(min=1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    @classmethod
    def test_configs(cls):
        return [
            {"num_clusters": 2, "cluster_size": 3, "window": 4},
            {"num_clusters": 1, "routed_heads": 2},  # one cluster of every token: full attention
            {"num_clusters": 3, "cluster_size": 2, "window": 4, "causal": True},
            {"num_clusters": 2, "cluster_size": 4, "window": 2, "routed_heads": 1, "causal": True},
        ]
