"""PFAN (Wang et al., IJCAI 2019): position-focused attention for image-text matching.

Each region learns where it is: the image is cut into a 16 x 16 grid of blocks, a region is
described by the (at most) 15 blocks it overlaps most and their overlap weights, and an
attention of the region's feature over those blocks' embeddings gives a 200-d position feature
that is concatenated to the region feature before the projection into the joint space. The
matching itself is SCAN's (``scan.t2i`` / ``scan.i2t`` with mean aggregation); the official
text-to-image score adds half of each word's largest attention weight, ``pfan.cosine_max``.

Checked against the official code (HaoYang0123/Position-Focused-Attention-Network,
``model_attention.py``): names, shapes, the two softmaxes, the initialisation.
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from itmkit.core_stages import CosineHead
from itmkit.errors import DataError
from itmkit.ops import EPS, float32, l2norm, xavier_linear_
from itmkit.stage import BoxLayout, DataNeeds, PortError, Stage, param
from itmkit.types import Aligned, AlignedPort, Local, LocalPort, PairSims, PairSimsPort, Regions, RegionsPort

from itmkit_pfan.blocks import boxes_to_blocks

# ============================================================================ image encoder


class PositionEncoder(nn.Module):
    """v_i = l2norm(W [f_i ; p_i] + b) with p_i = sum_k w_ik P[b_ik], the attention-pooled block embeddings.

    beta_ik = softmax_k(tanh(<W_att f_i, P[b_ik]>));  w_ik = softmax_k(omega_ik * beta_ik), where
    b_ik, omega_ik are region i's block indices and overlap weights (the PFAN boxes layout).
    """

    def __init__(
        self,
        *,
        in_dim: int,
        embed_dim: int,
        grid: int = 16,
        top_blocks: int = 15,
        position_dim: int = 200,
        normalize: bool = True,
    ):
        super().__init__()
        self.grid = grid
        self.top_blocks = top_blocks
        self.normalize = normalize
        self.fc = nn.Linear(in_dim + position_dim, embed_dim)
        self.fc_att = nn.Linear(in_dim, position_dim)
        self.position_embedding = nn.Embedding(grid * grid + 1, position_dim)  # last row: padding block
        # The official init only touches fc (SCAN's Xavier uniform, zero bias); fc_att and the
        # block embeddings keep PyTorch's defaults (kaiming-uniform Linear, N(0, 1) Embedding).
        xavier_linear_(self.fc)

    @property
    def padding_block(self) -> int:
        return self.grid * self.grid

    def blocks(self, x: Regions) -> tuple[torch.Tensor, torch.Tensor]:
        """Block indices (B, R, K) long and weights (B, R, K); padded regions get the padding block, weight 0."""
        k = self.top_blocks
        if x.boxes is None:
            raise DataError(
                "pfan.position needs region boxes: Regions.boxes (B, R, 4) x1, y1, x2, y2 in pixels with"
                f" Regions.image_sizes (B, 2), or (B, R, {2 * k}) in PFAN's block layout; the data folder"
                " needs {split}_boxes.npy (and {split}_sizes.npy for raw boxes)"
            )
        boxes = x.boxes
        if tuple(boxes.shape[:2]) != tuple(x.feats.shape[:2]) or boxes.dim() != 3:
            raise DataError(f"Regions.boxes has shape {tuple(boxes.shape)}, expected ({x.feats.shape[0]},"
                             f" {x.feats.shape[1]}, 4 or {2 * k}) to match the features {tuple(x.feats.shape)}")
        if boxes.shape[-1] == 4:
            if x.image_sizes is None:
                raise DataError("pfan.position got raw (B, R, 4) boxes but no Regions.image_sizes (B, 2) width,"
                                 " height to place them on the grid; add {split}_sizes.npy to the data")
            layout = boxes_to_blocks(boxes, x.image_sizes, grid=self.grid, top=k)
        elif boxes.shape[-1] == 2 * k:
            layout = boxes
        else:
            raise DataError(f"Regions.boxes has {boxes.shape[-1]} columns: expected 4 (x1, y1, x2, y2 pixels) or"
                             f" {2 * k} (PFAN layout: {k} block indices then {k} weights, top_blocks={k})")
        valid = x.mask[..., None]  # (B, R, 1)
        index = torch.where(valid, layout[..., :k].round().long(), self.padding_block)  # (B, R, K)
        weight = layout[..., k:].to(x.feats.dtype).masked_fill(~valid, 0.0)  # (B, R, K)
        if bool(((index < 0) | (index > self.padding_block)).any()):
            raise DataError(f"block indices outside [0, {self.padding_block}] for a {self.grid} x {self.grid}"
                             f" grid: got {int(index.min())} .. {int(index.max())}")
        return index, weight

    def forward(self, x: Regions) -> Local:
        index, weight = self.blocks(x)  # (B, R, K)
        table = self.position_embedding.weight  # (G*G+1, P)
        query = self.fc_att(x.feats)  # (B, R, P)
        # <W_att f_i, P[b_ik]>: score every block once, then pick each region's K; this never
        # materialises the (B, R, K, P) gathered embeddings (faster on CPU, forward and backward).
        logits = (query @ table.T).gather(-1, index)  # (B, R, K)
        beta = torch.softmax(torch.tanh(float32(logits)), dim=-1)  # (B, R, K); both softmaxes in float32
        w = torch.softmax(weight * beta, dim=-1)  # re-softmaxed, not l1-normalised (as the official code)
        # p_i = sum_k w_ik P[b_ik]: scatter the K weights onto the table's rows (repeated padding
        # slots add up), then one matmul
        dense = torch.zeros(*index.shape[:-1], table.shape[0], dtype=w.dtype, device=w.device)
        position = dense.scatter_add(-1, index, w) @ table  # (B, R, P)
        feats = self.fc(torch.cat([x.feats, position], dim=-1))  # (B, R, D)
        if self.normalize:
            feats = l2norm(feats)
        extras = {"boxes": x.boxes} if x.boxes is not None else {}
        return Local(feats, x.mask, extras)


@attrs.frozen(kw_only=True)
class Position(Stage):
    """PFAN position-focused image encoder: v_i = l2norm(W [f_i ; sum_k w_ik P[b_ik]] + b), w from attention over the region's grid blocks."""

    name = "pfan.position"
    kind = "encoder"
    paper = ("Wang et al. 2019 (PFAN, IJCAI), position focused attention; as the official EncoderImagePrecomp"
             " (paper equation numbers not checked)")

    embed_dim: int | None = param(None, "joint embedding size (default: [recipe].embed_dim)", ge=1)
    grid: int = param(16, "the image is cut into grid x grid blocks; the block embedding has grid*grid+1 rows,"
                          " the last for padding (PFAN: 16)", ge=1)
    top_blocks: int = param(15, "blocks per region, largest overlap first; a PFAN-layout boxes file has"
                                " 2*top_blocks columns (PFAN: 15)", ge=1)
    position_dim: int = param(200, "size of the block embeddings and of the position feature (PFAN: 200)", ge=1)
    normalize: bool = param(True, "l2-normalise each region vector (the official default; no_imgnorm=False)")

    def ports(self, x: RegionsPort) -> LocalPort:
        if self.top_blocks > self.grid * self.grid:
            raise PortError(f"top_blocks={self.top_blocks} exceeds the {self.grid * self.grid} blocks of the grid")
        return LocalPort(self.embed_dim or 1024)

    def data_needs(self) -> DataNeeds:
        # What PositionEncoder.blocks() reads, declared so every split is checked before the work.
        k = self.top_blocks
        return DataNeeds(boxes=(
            BoxLayout(4, "x1, y1, x2, y2 in pixels", needs_sizes=True),
            BoxLayout(2 * k, f"PFAN's block layout: {k} block indices of the {self.grid} x {self.grid} grid, then"
                             f" {k} weights", index_columns=k, index_max=self.grid * self.grid),
        ))

    def build(self, x: RegionsPort) -> nn.Module:
        return PositionEncoder(
            in_dim=x.dim,
            embed_dim=self.embed_dim or 1024,
            grid=self.grid,
            top_blocks=self.top_blocks,
            position_dim=self.position_dim,
            normalize=self.normalize,
        )


# ========================================================================= similarity head


class CosineMaxHead(nn.Module):
    """r_q = cos(q, a_q) + max_weight * max_c alpha_qc for every query fragment q of every pair."""

    def __init__(self, *, max_weight: float = 0.5, eps: float = EPS):
        super().__init__()
        self.cosine = CosineHead(eps=eps)
        self.max_weight = max_weight

    def forward(self, x: Aligned) -> PairSims:
        relevance = self.cosine.aligned_cosine(x)  # (Ni, Nt, Lq)
        peak = x.weights.max(dim=-1).values  # (Ni, Nt, Lq): padded context has weight 0, never the max
        sims = relevance + self.max_weight * peak
        return PairSims(sims.unsqueeze(-1), x.query_mask.expand(x.weights.shape[:-1]))


@attrs.frozen(kw_only=True)
class CosineMax(Stage):
    """PFAN's text-to-image relevance: cos(e_t, a_t) + 0.5 * max_r alpha_tr per word; with core.mean the official score."""

    name = "pfan.cosine_max"
    kind = "similarity"
    paper = ("Wang et al. 2019 (PFAN), official xattn_score_t2i: mean_t cos(e_t, a_t) + 0.5 * mean_t max_r alpha_tr"
             " (in the code; not checked against the paper's text)")

    max_weight: float = param(0.5, "weight of each query's largest attention weight (official t2i: 0.5; 0 gives"
                                   " core.cosine)", ge=0.0)
    eps: float = param(EPS, "floor of the norm product of the cosine (SCAN: 1e-8)", gt=0.0)

    def ports(self, x: AlignedPort) -> PairSimsPort:
        return PairSimsPort(1)

    def build(self, x: AlignedPort) -> nn.Module:
        return CosineMaxHead(max_weight=self.max_weight, eps=self.eps)

    def pair_bytes(self, *, text_len: int, image_len: int) -> int:
        # scan.t2i / scan.i2t already count the cosine's (Lq, Lc) temporaries; the max term adds a
        # few float32 numbers per query fragment
        return 3 * 4 * max(text_len, image_len) + 64
