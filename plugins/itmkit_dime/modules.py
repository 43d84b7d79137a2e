"""DIME's networks as plain modules: the text head, the four cells, the routing layers, the score head.

Everything runs on a whole block at once in *context-major* layout: the side DIME refines (regions
for i-t, words for t-i) is the query side q, the other side is the context side c, and a pair
tensor is (Nc, Nq, N, D), so that CMRC's attention and modulation are batched matrix products over
the context items with no copy of the pair tensors. A layer-0 input does not depend on the pair and
is (1, Nq, N, D), so the cells that only read it (RIC, IMRC and every router) run once per item and
broadcast. The stages turn the (Nc, Nq) result into (Ni, Nt) (a transpose for i-t).

Official code: github.com/LgQu/DIME, models/{TextNet,VisNet,Cells,Router,SelfAttention,Refinement,
DynamicInteraction,InteractionModule}.py; the comments name the quirks kept from it.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from itmkit.ops import float32, masked_mean

NUM_CELLS = 4  # RIC, GLGC, IMRC, CMRC
THRESHOLD = 1e-4  # a path whose summed probability is below this skips to the RIC output
PATH_EPS = 1e-8
TOTAL_PATHS = NUM_CELLS * NUM_CELLS * 2 + NUM_CELLS  # layer 0 and 1: 4 x 4 each, layer 2: 4 x 1 -> 36


# Inside the interaction a fragment mask is None when every fragment is valid (the official case: 36
# regions, 32 WordPiece positions): the masked forms cost extra passes over (Nc, Nq, N, D) tensors.


def zero_padding(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x with its masked fragments set to 0 (``mask`` broadcasts to x without its last axis; None: all valid)."""
    return x if mask is None else x.masked_fill(~mask.unsqueeze(-1), 0.0)


def fragment_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the valid fragments (axis -2)."""
    return x.mean(dim=-2) if mask is None else masked_mean(x, mask, dim=-2)


def fragment_max(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Max over the valid fragments (axis -2)."""
    return (x if mask is None else x.masked_fill(~mask.unsqueeze(-1), float("-inf"))).amax(dim=-2)


def unless_all(mask: torch.Tensor) -> torch.Tensor | None:
    """The mask, or None when every fragment is valid (one check per forward)."""
    return None if bool(mask.all()) else mask


def accumulate(total: torch.Tensor | None, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """total + weight * x in one pass (addcmul into the running sum, which only this function holds)."""
    if total is None:
        return weight * x
    if total.shape != torch.broadcast_shapes(total.shape, weight.shape, x.shape):
        return torch.addcmul(total, weight, x)
    return total.addcmul_(weight, x)  # autograd-safe: addcmul's backward never reads the sum it updates


# ================================================================================ text head


class TextHead(nn.Module):
    """DIME's text net on BERT's last hidden states H (B, W, Hd) -> words (B, W, D) and sentences (B, D).

    TextNet.EncoderText: x_emb = fc(H); c_K = ReLU(Conv2d(1, D, (K, Hd))) over H zero-padded
    asymmetrically (K = 2: one row after; K = 3: one before, one after), so each c_K keeps W
    positions; word = l2norm(mapping([c1; c2; c3]) + x_emb); sentence = l2norm(mapping(max_W
    [c1; c2; c3]) + mean_W x_emb). The official caption is always padded to 32 WordPieces and
    every position, [PAD] included, is read; here the positions are the valid ones of ``mask``
    (all of them for dime.bert's output), and a masked position reads as the zero padding row.
    """

    def __init__(self, *, hidden: int, dim: int, widths: tuple[int, ...] = (1, 2, 3)):
        super().__init__()
        self.widths = widths
        self.fc = nn.Linear(hidden, dim)
        self.convs = nn.ModuleList(nn.Conv2d(1, dim, (k, hidden)) for k in widths)
        self.mapping = nn.Linear(len(widths) * dim, dim)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask_or_none = unless_all(mask)
        states = zero_padding(states, mask_or_none)
        x_emb = self.fc(states)  # (B, W, D)
        grid = states.unsqueeze(1)  # (B, 1, W, Hd)
        maps = []
        for k, conv in zip(self.widths, self.convs):
            before = (k - 1) // 2  # official: K = 2 pads (0, 1), K = 3 pads (1, 1)
            maps.append(F.relu(conv(F.pad(grid, (0, 0, before, k - 1 - before)))).squeeze(3))  # (B, D, W)
        grams = torch.cat(maps, dim=1).transpose(1, 2)  # (B, W, 3D)
        words = F.normalize(float32(self.mapping(grams) + x_emb), dim=-1)  # the l2 norms in float32
        pooled = fragment_max(grams, mask_or_none)  # max over the valid positions
        sentence = F.normalize(float32(self.mapping(pooled) + fragment_mean(x_emb, mask_or_none)), dim=-1)
        return words, sentence


# ==================================================================================== cells


class Router(nn.Module):
    """p = ReLU(tanh(MLP(mean_n x_n))) in [0, 1) per output path (Router.py; the last bias starts at 1.5)."""

    def __init__(self, dim: int, hidden: int, paths: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(True), nn.Linear(hidden, paths))
        with torch.no_grad():
            self.mlp[2].bias.fill_(1.5)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return F.relu(torch.tanh(self.mlp(fragment_mean(x, mask))))  # (..., paths)


class RectifiedIdentity(nn.Module):
    """RIC: ReLU(x) (Cells.RectifiedIdentityCell)."""

    def __init__(self, dim: int, hid_router: int, paths: int):
        super().__init__()
        self.router = Router(dim, hid_router, paths)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, block: Block) -> torch.Tensor:
        return F.relu(x)


class GlobalLocalGuidance(nn.Module):
    """GLGC: x (1 + n) with n = (fc_1(x) * g) l2-normalised along the FRAGMENT axis (official quirk, dim=-2).

    g is the other side's global vector (the sentence for i-t, the image for t-i). ``fc_2`` is
    defined but never used by the official cell; it is kept (frozen) so checkpoints load.
    """

    def __init__(self, dim: int, hid_router: int, paths: int):
        super().__init__()
        self.router = Router(dim, hid_router, paths)
        self.fc_1 = nn.Linear(dim, dim)
        self.fc_2 = nn.Linear(dim, dim).requires_grad_(False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, block: Block) -> torch.Tensor:
        guided = zero_padding(self.fc_1(x) * block.other_global[:, None, None, :], mask)  # (Nc, Nq, N, D)
        return torch.addcmul(x, F.normalize(float32(guided), dim=-2), x)  # (1 + n) x


class IntraModalReasoning(nn.Module):
    """IMRC: multi-head self-attention WITHOUT an output projection, residual, ReLU FFN, residual.

    SelfAttention.py with drop = 0: a = x + concat_h softmax(Q_h K_h^T / sqrt(d_k)) V_h;
    out = a + fc2(ReLU(fc1(a))). Masked fragments are left out as keys (the official has none).
    """

    def __init__(self, dim: int, hid_router: int, paths: int, *, heads: int, hidden: int):
        super().__init__()
        self.router = Router(dim, hid_router, paths)
        self.heads = heads
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, block: Block) -> torch.Tensor:
        *lead, n, d = x.shape
        h = self.heads
        flat = x.reshape(-1, n, d)
        q, k, v = (f(flat).view(-1, n, h, d // h).transpose(1, 2) for f in (self.query, self.key, self.value))
        keys = None if mask is None else mask.expand(*lead, n).reshape(-1, 1, 1, n)
        # softmax(q k^T / sqrt(d_k)) v by the fused kernel: it reads the per-head views without copying them
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=keys)  # (P, h, n, d_k)
        a = attended.transpose(1, 2).reshape(-1, n, d) + flat  # (the reshape may be a view of the kernel output)
        return self.fc2(F.relu(self.fc1(a))).add_(a).view(*lead, n, d)


RAW_NORMS = ("clipped_l2norm", "l2norm", "softmax", "clipped", "no_norm")


class CrossModalRefinement(nn.Module):
    """CMRC: each query fragment modulated by its attended context (Refinement.py).

    SCAN-style attention (func_attention): s = <context_l, query_n>, normalised over the QUERY
    fragments by ``raw_feature_norm`` (clipped_l2norm: LeakyReLU(0.1) then l2norm), then
    softmax(lambda s) over the context fragments; c_n = sum_l a_nl context_l. Then
    out = x + fc_2(ReLU(fc_1(x * tanh(fc_scale(c)) + fc_shift(c)))).
    The context is always the ORIGINAL other side (words for i-t, regions for t-i) in every layer,
    and a's rows sum to 1, so fc(c) = a @ fc(context): fc_scale / fc_shift are applied once per
    context item instead of once per pair (the same numbers up to rounding).
    """

    def __init__(self, dim: int, hid_router: int, paths: int, *, raw_feature_norm: str, lambda_softmax: float):
        super().__init__()
        self.router = Router(dim, hid_router, paths)
        self.raw_feature_norm = raw_feature_norm
        self.lambda_softmax = lambda_softmax
        self.fc_scale = nn.Linear(dim, dim)
        self.fc_shift = nn.Linear(dim, dim)
        self.fc_1 = nn.Linear(dim, dim)
        self.fc_2 = nn.Linear(dim, dim)

    def attention(self, x: torch.Tensor, mask: torch.Tensor | None, block: Block) -> torch.Tensor:
        """Attention weights (Nc, Nq, N, L) of each query fragment over its pair's context fragments."""
        ctx = block.context  # (Nc, L, D)
        p, nq, n, d = x.shape
        nc = ctx.shape[0]
        if p == 1:  # pair-independent queries (layer 0): one matrix product for the whole block
            dots = (x.reshape(nq * n, d) @ ctx.reshape(-1, d).T).view(nq, n, nc, -1).permute(2, 0, 1, 3)
        else:
            dots = (x.reshape(nc, nq * n, d) @ ctx.transpose(1, 2)).view(nc, nq, n, -1)
        dots = float32(dots)  # the normalisation and the softmax in float32 under mixed precision
        norm = self.raw_feature_norm  # each normalisation runs over the queries (axis -2)
        if norm in ("clipped_l2norm", "clipped"):
            dots = F.leaky_relu(dots, 0.1)
        if norm == "clipped_l2norm":
            dots = F.normalize(zero_padding(dots, mask), dim=-2)  # masked queries add nothing to the norm
        elif norm == "l2norm":  # the official l2norm: x / (||x|| + 1e-8)
            dots = zero_padding(dots, mask)
            dots = dots / (dots.pow(2).sum(dim=-2, keepdim=True).sqrt() + 1e-8)
        elif norm == "softmax":
            dots = (dots if mask is None else dots.masked_fill(~mask.unsqueeze(-1), float("-inf"))).softmax(dim=-2)
        logits = self.lambda_softmax * dots
        if block.context_mask is not None:
            logits = logits.masked_fill(~block.context_mask[:, None, None, :], float("-inf"))
        return logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, block: Block) -> torch.Tensor:
        weights = self.attention(x, mask, block)
        if block.attention is not None:  # itmkit explain is recording: the stage reports them
            block.attention.append(weights)
        if block.modulation is None:  # fc_scale / fc_shift of each context item, once per block
            block.modulation = torch.cat([self.fc_scale(block.context), self.fc_shift(block.context)], dim=-1)
        nc, nq, n, length = weights.shape
        mod = (weights.reshape(nc, nq * n, length) @ block.modulation).view(nc, nq, n, -1)  # (Nc, Nq, N, 2D)
        scale, shift = mod.chunk(2, dim=-1)
        return self.fc_2(F.relu(self.fc_1(torch.addcmul(shift, x, torch.tanh(scale))))).add_(x)


class Block:
    """The other side of a block, as every cell reads it: context fragments, their mask, the global vectors.

    ``modulation`` caches one layer's CMRC projections of the context (each layer's CMRC has its own).
    ``attention``: a list when the CMRC weights (Nc, Nq, N, L) are wanted (``itmkit explain``), each
    layer's CMRC appending its own in layer order; None (no reference kept) otherwise.
    """

    def __init__(self, context: torch.Tensor, context_mask: torch.Tensor | None, other_global: torch.Tensor,
                 attention: list[torch.Tensor] | None = None):
        self.context, self.context_mask, self.other_global = context, context_mask, other_global
        self.modulation: torch.Tensor | None = None
        self.attention = attention


# ============================================================================== the layers


class RoutingLayer(nn.Module):
    """One layer of DynamicInteraction.py: four cells, each with a router over ``paths`` output paths."""

    def __init__(self, dim: int, paths: int, *, hid_router: int, heads: int, hid_imrc: int, raw_feature_norm: str,
                 lambda_softmax: float):
        super().__init__()
        self.paths = paths
        self.ric = RectifiedIdentity(dim, hid_router, paths)
        self.glgc = GlobalLocalGuidance(dim, hid_router, paths)
        self.imrc = IntraModalReasoning(dim, hid_router, paths, heads=heads, hidden=hid_imrc)
        self.cmrc = CrossModalRefinement(dim, hid_router, paths, raw_feature_norm=raw_feature_norm,
                                         lambda_softmax=lambda_softmax)

    def cells(self) -> tuple[nn.Module, ...]:
        return (self.ric, self.glgc, self.imrc, self.cmrc)


def normalise_paths(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(…, out, cells) router outputs -> (probabilities normalised over the cells, skip gate (…, out)).

    The gate is 1 where an output path's raw probabilities sum below THRESHOLD: that path then
    also receives the RIC output (DynamicInteraction_Layer0 / _Layer with num_out_path = 4).
    """
    probs = float32(probs)  # an l1 normalisation: in float32 under mixed precision
    gate = (probs.sum(dim=-1) < THRESHOLD).to(probs.dtype)
    return probs / (probs.sum(dim=-1, keepdim=True) + PATH_EPS), gate


def mix(weights: torch.Tensor, gate: torch.Tensor, outs: list[torch.Tensor], k: int) -> torch.Tensor:
    """Input of output path k: sum_j w[k, j] out_j + gate[k] out_0, each out_j (1 or Nc, Nq, N, D).

    The pair-independent outputs (layer 0's RIC and IMRC) are summed first at their own size, so
    each pair-sized output costs one fused multiply-add.
    """
    w = weights[..., k, :].clone()
    w[..., 0] += gate[..., k]  # the skip carries RIC's output: fold it into RIC's weight
    order = sorted(range(len(outs)), key=lambda j: outs[j].shape[0])  # pair-independent ones first
    total = None
    for j in order:
        total = accumulate(total, w[..., j, None, None], outs[j])
    return total


class DynamicInteraction(nn.Module):
    """DIME's routing space: 3 layers x 4 cells, densely connected by routers (InteractionModule.py).

    forward(query (Nq, N, D), query_mask, block) -> refined fragments (Nc, Nq, N, D) and the paths
    (Nc, Nq, 36) that the path regularisation reads (layer 0's normalised 4 x 4, layer 1's
    normalised 4 x 4, layer 2's raw 4), flattened as the official ``view(…, -1)``.

    Layer 0 and 1: out_k = sum_j p_kj cell_j(in_j) + gate_k RIC(in_0), p normalised over the cells
    (eps 1e-8), gate_k = [sum_j raw p_kj < 1e-4]; in layer 0 every in_j is the query fragments.
    Layer 2 (one output): out = sum_j (p_j cell_j(in_j) + g_j in_j) / (sum_j g_j + sum_j p_j),
    g_j = [p_j < 1e-4 / 4] (its own renormalised formula; the skip carries the cell's INPUT).
    The inputs of the next layer are mixed on demand, one at a time, so at most the four cell
    outputs of a layer are held per pair, never the four mixed copies as well.
    """

    def __init__(self, *, dim: int, hid_router: int = 512, heads: int = 16, hid_imrc: int = 512,
                 raw_feature_norm: str = "clipped_l2norm", lambda_softmax: float = 4.0):
        super().__init__()
        kwargs = dict(hid_router=hid_router, heads=heads, hid_imrc=hid_imrc, raw_feature_norm=raw_feature_norm,
                      lambda_softmax=lambda_softmax)
        self.layers = nn.ModuleList([RoutingLayer(dim, NUM_CELLS, **kwargs), RoutingLayer(dim, NUM_CELLS, **kwargs),
                                     RoutingLayer(dim, 1, **kwargs)])

    def forward(self, query: torch.Tensor, query_mask: torch.Tensor | None, block: Block,
                want_paths: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        nq, n, d = query.shape
        nc = block.context.shape[0]
        x0 = query[None]  # (1, Nq, N, D)
        m = None if query_mask is None else query_mask[None]  # (1, Nq, N)
        # layer 0: every cell reads the pair-independent query fragments
        layer = self.layers[0]
        block.modulation = None
        outs = [cell(x0, m, block) for cell in layer.cells()]  # RIC, IMRC: (1, Nq, ..); GLGC, CMRC: (Nc, Nq, ..)
        probs0 = torch.stack([cell.router(x0, m) for cell in layer.cells()], dim=-1)  # (1, Nq, out, cells)
        w0, gate0 = normalise_paths(probs0)
        # layer 1: cell j reads layer 0's output path j
        layer = self.layers[1]
        block.modulation = None
        outs1, probs1 = [], []
        for j, cell in enumerate(layer.cells()):
            inp = mix(w0, gate0, outs, j).expand(nc, nq, n, d)
            outs1.append(cell(inp, m, block))
            probs1.append(cell.router(inp, m))
            del inp
        del outs
        w1, gate1 = normalise_paths(torch.stack(probs1, dim=-1))  # (Nc, Nq, out, cells)
        # layer 2: one output path, renormalised over the cells' probabilities and skip gates
        layer = self.layers[2]
        block.modulation = None
        total, denominator, probs2 = None, 0, []
        for j, cell in enumerate(layer.cells()):
            inp = mix(w1, gate1, outs1, j)
            p = float32(cell.router(inp, m))  # (Nc, Nq, 1); the renormalisation's terms in float32
            skip = (p < THRESHOLD / NUM_CELLS).to(p.dtype)
            total = accumulate(accumulate(total, p[..., None], cell(inp, m, block)), skip[..., None], inp)
            denominator = denominator + skip + p
            probs2.append(p)
            del inp
        del outs1
        refined = total.div_(denominator[..., None])
        block.modulation = None
        if not want_paths:
            return refined, None
        paths = torch.cat([w0.reshape(1, nq, -1).expand(nc, nq, -1), w1.reshape(nc, nq, -1),
                           torch.stack(probs2, dim=-1).reshape(nc, nq, -1)], dim=-1)  # (Nc, Nq, 36)
        return refined, paths


class ScoreHead(nn.Module):
    """s = <l2norm(mean_n y_n + max_n y_n), g> with y = BatchNorm1d(refined fragments) (calSim_i2t / _t2i).

    The BatchNorm runs over every refined fragment of every pair of the block: in training, the
    batch statistics of the training block (the official view(-1, d)); scoring uses its running ones.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)

    def normalised(self, refined: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if not self.training or mask is None:  # scoring: running statistics, an affine map per channel
            return self.bn(refined.reshape(-1, refined.shape[-1])).view_as(refined)
        full = mask.expand(refined.shape[:-1])
        out = torch.zeros_like(refined)  # batch statistics over the valid fragments only
        out[full] = self.bn(refined[full])
        return out

    def forward(self, refined: torch.Tensor, mask: torch.Tensor | None, other_global: torch.Tensor) -> torch.Tensor:
        """refined (Nc, Nq, N, D), mask broadcastable to (Nc, Nq, N) or None, other_global (Nc, D) -> (Nc, Nq)."""
        y = self.normalised(refined, mask)
        pooled = fragment_mean(y, mask) + fragment_max(y, mask)
        return (F.normalize(float32(pooled), dim=-1) * other_global[:, None]).sum(dim=-1)


def path_loss(paths: torch.Tensor, mapping: nn.Linear, label: torch.Tensor, pairs: int) -> torch.Tensor:
    """||P P^T - B B^T||^2 / pairs with P = l2norm(mapping(mean over the context side of the paths)).

    paths (Nc, Nq, 36); label B (Nq, H): l2norm of each query item's mean BERT state (model.train_emb:
    the caption of each image row for i-t, each caption for t-i); ``pairs`` the block's batch size.
    """
    p = F.normalize(float32(mapping(paths.mean(dim=0))), dim=-1)
    return ((float32(p @ p.T) - float32(label @ label.T)) ** 2).sum() / pairs  # the loss in float32
