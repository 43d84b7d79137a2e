"""Ports: what flows between stages, at build time (a port class with a dim) and at run time.

Build time: each stage's ``ports()`` method is annotated with the port classes it consumes and
returns the port it produces, so ``itmkit build`` can check every connection before a tensor
exists. Run time: stages exchange plain tensors or the small frozen containers below.
"""

from __future__ import annotations

from typing import Any

import attrs
import torch

# --------------------------------------------------------------------------- build-time ports


@attrs.frozen
class Port:
    """A typed connection between two stages; ``dim`` is the size of its last axis."""

    dim: int

    def describe(self) -> str:
        """Compact form for tables and messages: ``Local[1024]``."""
        return f"{type(self).__name__.removesuffix('Port')}[{self.dim}]"


@attrs.frozen
class RegionsPort(Port):
    """Raw image input: precomputed region features (B, R, F); dim = F."""


@attrs.frozen
class TokensPort(Port):
    """Raw text input: token ids (B, L); dim = vocabulary size."""

    mask_id: int | None = None  # id of the vocabulary's mask token (GPO's <mask>), None if it has none


@attrs.frozen
class LocalPort(Port):
    """A set of fragment vectors per item (regions or words): ``Local`` (B, N, D)."""


@attrs.frozen
class GlobalPort(Port):
    """One vector per item: a (B, D) tensor."""


@attrs.frozen
class AlignedPort(Port):
    """Query fragments of one side with their attended context from the other, per pair."""


@attrs.frozen
class PairLocalPort(Port):
    """One side's fragments rebuilt for every image x caption pair: ``PairLocal`` (Ni, Nt, N, D).

    ``side`` says whose fragments they are ("image": DP-RNN's reordered objects; "text": DIME t-i's
    refined words). A cross stage that reads it uses them in place of that side's tower fragments.
    """

    side: str = "image"

    def describe(self) -> str:
        return f"PairLocal[{self.dim}, {self.side}]"


@attrs.frozen
class PairSimsPort(Port):
    """Per-fragment similarity vectors for every image x caption pair: ``PairSims`` (Ni, Nt, N, S)."""


@attrs.frozen
class ScorePort(Port):
    """One score per image x caption pair: an (Ni, Nt) tensor."""

    dim: int = 1


@attrs.frozen
class LossPort(Port):
    """A scalar training loss."""

    dim: int = 1


@attrs.frozen
class ParametersPort(Port):
    """The model's trainable parameters, for an objective that reads them (a weight-norm penalty, say).

    Run time: a dict of name -> ``nn.Parameter`` over the towers and branches, named as in the
    model's state dict (``image.encoder.fc.weight``, ``branches.0.stages.0.…``); ``dim`` is unused.
    """

    dim: int = 0


PORT_KINDS: tuple[type[Port], ...] = (
    RegionsPort,
    TokensPort,
    LocalPort,
    GlobalPort,
    AlignedPort,
    PairSimsPort,
    ScorePort,
    LossPort,
    ParametersPort,
)

# --------------------------------------------------------------------------- run-time values


@attrs.frozen
class Regions:
    """Raw image input of an encoder: features (B, R, F) and the valid region count per image."""

    feats: torch.Tensor
    lengths: torch.Tensor
    boxes: torch.Tensor | None = None
    image_sizes: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        return lengths_to_mask(self.lengths, self.feats.shape[1])


@attrs.frozen
class Tokens:
    """Raw text input of an encoder: zero-padded token ids (B, L) and lengths (B,)."""

    ids: torch.Tensor
    lengths: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        return lengths_to_mask(self.lengths, self.ids.shape[1])


@attrs.frozen
class Local:
    """Fragment vectors (B, N, D) with a (B, N) bool mask of valid fragments."""

    feats: torch.Tensor
    mask: torch.Tensor
    extras: dict[str, Any] = attrs.field(factory=dict)

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)

    def select(self, rows: slice | torch.Tensor) -> Local:
        """The items ``rows``, cut to the longest of them (padding beyond it is dropped)."""
        extras = {k: v[rows] if torch.is_tensor(v) else v for k, v in self.extras.items()}
        return _cut_to_longest(self.feats[rows], self.mask[rows], extras)

    def split(self, size: int) -> list[Local]:
        """Consecutive groups of ``size`` items, each cut to the longest of its items (as ``select``).

        One ``torch.split`` per tensor: under autograd the groups' gradients then meet in one node
        that writes each once, where ``select`` per group would back-propagate a zero-filled tensor of
        the whole side for every group.
        """
        groups = zip(self.feats.split(size), self.mask.split(size))
        extras = {k: v.split(size) for k, v in self.extras.items() if torch.is_tensor(v)}
        return [_cut_to_longest(feats, mask, {k: extras[k][i] if k in extras else v for k, v in self.extras.items()})
                for i, (feats, mask) in enumerate(groups)]


def _cut_to_longest(feats: torch.Tensor, mask: torch.Tensor, extras: dict) -> Local:
    """Items' fragments with the padding beyond the longest of them dropped (at least one column kept)."""
    width = max(int(mask.sum(dim=1).max()), 1) if mask.numel() else 1
    return Local(feats[:, :width], mask[:, :width], extras)


@attrs.frozen
class Aligned:
    """Each query fragment of one side attending over the other side's fragments, per pair.

    ``query`` is (Ni, Nt, Lq, D) or broadcastable to it (a side's fragments do not depend on
    the pair); ``weights`` (Ni, Nt, Lq, Lc) are the attention weights over ``context``
    (broadcastable to (Ni, Nt, Lc, D)). Keeping the weights (and the raw dot products the
    attention already computed) instead of the attended vectors lets a similarity head avoid
    materialising (Ni, Nt, Lq, D): see ``core.cosine``.
    """

    query: torch.Tensor
    weights: torch.Tensor
    context: torch.Tensor
    query_mask: torch.Tensor  # (Ni, Nt, Lq) or broadcastable
    query_side: str  # "text" or "image"
    dots: torch.Tensor | None = None  # <query, context> (Ni, Nt, Lq, Lc) if the attention computed it
    context_mask: torch.Tensor | None = None  # (Ni, Nt, Lc) or broadcastable

    def attended(self) -> torch.Tensor:
        """The attended context vectors (Ni, Nt, Lq, D)."""
        return self.weights @ self.context


@attrs.frozen
class PairLocal:
    """Fragments (Ni, Nt, N, D) of ``side`` ("image" or "text") for every pair, with a mask broadcastable to (Ni, Nt, N)."""

    feats: torch.Tensor
    mask: torch.Tensor
    side: str
    # (Ni, Nt, N) long, when a pair stage reorders the side's fragments (DP-RNN's objects): row k of pair
    # (i, t) was built from the side's fragment order[i, t, k]. None: the side's own order. Read only by
    # itmkit.explain, to draw attention over those rows on the right regions.
    order: torch.Tensor | None = None


@attrs.frozen
class PairSims:
    """Per-fragment similarities (Ni, Nt, N, S) for every pair, with a (Ni, Nt, N) mask."""

    sims: torch.Tensor
    mask: torch.Tensor


def lengths_to_mask(lengths: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """(B,) lengths -> (B, width) bool mask, True on valid positions."""
    width = int(lengths.max()) if width is None else width
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]


@attrs.define
class BlockContext:
    """What a training step tells the branch stages about its block, and the terms they add to its loss.

    A branch stage whose module's ``forward`` takes the keyword ``context`` receives one during a
    training step and ``None`` when scoring, so a stage can use the block's positives (DP-RNN's pair
    early-selection keeps them) and add training-only terms computed from its own intermediate values
    (DIME's path regularisation) without a second forward pass.

    ``positives`` (Ni, Nt) bool: caption t belongs to image i. ``epoch``: 0-based. ``terms``: name ->
    scalar tensor, already weighted by the stage; the model adds each to the loss and logs it.
    """

    positives: torch.Tensor
    epoch: int = 0
    terms: dict[str, torch.Tensor] = attrs.field(factory=dict)

    def add_term(self, name: str, value: torch.Tensor) -> None:
        """Add a scalar training term ``name`` (a stage adding the same name twice in one step is a bug)."""
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"training term {name!r} must be a scalar tensor, got {got}")
        if name in self.terms:
            raise ValueError(f"training term {name!r} was added twice in one step")
        self.terms[name] = value
