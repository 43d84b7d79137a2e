"""Two-stage retrieval: a first stage's pooled vectors shortlist K items, a model re-scores the shortlist.

The first stage is any model whose two towers end in a pool (VSE++, GPO, VSRN, ...): its score of a
pair is taken as the cosine of the pooled vectors, so each item is one unit vector and the shortlist
is a faiss inner-product search (exact by default; an approximate index for large galleries). The
second stage is any model: its ``score`` runs on a block of one query against its K candidates,
the candidates' encodings read from a fragment store (``itmkit.fragments``) by position. A query's
final list is its shortlist ordered by the second stage's scores, then the rest of the gallery by
the first stage's.

Used by ``itmkit index build`` / ``itmkit search`` (a stored index) and ``itmkit eval --shortlist``
(a temporary one per protocol gallery).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import numpy as np
import torch

from itmkit.build import Encoded, ITMModel
from itmkit.data.loader import caption_batches, image_batches
from itmkit.data.split import Split
from itmkit.data.vocab import Vocabulary
from itmkit.errors import ItmkitError
from itmkit.evaluation import _descending_order, average_folds, protocol_galleries, ranks_metrics
from itmkit.fragments import FragmentStore, FragmentWriter
from itmkit.ops import l2norm
from itmkit.progress import task
from itmkit.types import Regions, Tokens

DEFAULT_INDEX = "Flat"  # faiss index factory string: exact inner product
_QUERIES_PER_CHUNK = 256  # first-stage rows held at once when ranking (a (chunk x gallery) float64 block)
SIDES = ("image", "text")


# ----------------------------------------------------------------------------------- first stage


def first_stage_problem(model: ITMModel, name: str = "the model") -> str | None:
    """Why ``model`` cannot be a first stage (no pooled vector on a side, unequal widths), or None."""
    missing = [side for side, has in (("image", model.wiring.image_global), ("text", model.wiring.text_global))
               if not has]
    if missing:
        return (f"{name} has no pooled vector on the {' and '.join(missing)} side (its [{missing[0]}] tower has no"
                " `pool` stage), so it cannot shortlist by inner product: give a first stage with pools on both"
                " sides (VSE++, GPO: --first-stage OTHER.safetensors)")
    dims = model.wiring.image[-1].output.dim, model.wiring.text[-1].output.dim
    if dims[0] != dims[1]:
        return f"{name}'s pooled vectors differ in width (image {dims[0]}, text {dims[1]}): no inner product"
    return None


def unit_vectors(enc: Encoded) -> np.ndarray:
    """The first stage's vectors of an encoded batch: its pooled vectors, L2-normalised, float32 (B, D)."""
    return l2norm(enc.global_.float()).cpu().numpy().astype(np.float32, copy=False)


def kept(model: ITMModel, side: str, enc: Encoded) -> Encoded:
    """Only what ``model``'s branches read of ``side`` (what re-scoring needs stored)."""
    keep_local, keep_global = model.reads(side)
    return Encoded(enc.local if keep_local else None, enc.global_ if keep_global else None)


@torch.no_grad()
def encoded_batches(model: ITMModel, side: str, split: Split, vocab: Vocabulary | None, device: torch.device | str,
                    batch_size: int) -> Iterator[tuple[np.ndarray, Encoded]]:
    """(item indices, encoding) of each batch of ``side`` of ``split``, in split order."""
    if side == "image":
        for b in image_batches(split, batch_size=batch_size):
            regions = Regions(b.images.to(device), b.image_lengths.to(device),
                              None if b.boxes is None else b.boxes.to(device),
                              None if b.image_sizes is None else b.image_sizes.to(device))
            yield np.asarray(b.indices), model.encode_images(regions)
    else:
        for b in caption_batches(split, vocab, batch_size=batch_size):
            yield np.asarray(b.indices), model.encode_texts(Tokens(b.tokens.to(device), b.lengths.to(device)))


# ----------------------------------------------------------------------------------- faiss index


def new_index(dim: int, spec: str = DEFAULT_INDEX):
    """An empty faiss inner-product index from a factory string ("Flat", "HNSW32", "IVF1024,Flat", ...)."""
    import faiss

    try:
        return faiss.index_factory(int(dim), spec, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1].split(": ")[-1][:120]
        raise ItmkitError(f"index type {spec!r} is not a faiss index factory string ({reason}); e.g. Flat (exact),"
                          " HNSW32, IVF1024,Flat, IVF4096,PQ32 (docs/retrieval.md)") from None


def set_search_parameters(index, params: str | None) -> None:
    """Apply faiss search parameters ("nprobe=16", "efSearch=128", comma-separated) to ``index``."""
    if not params:
        return
    import faiss

    for item in params.split(","):
        name, _, value = item.partition("=")
        try:
            faiss.ParameterSpace().set_index_parameter(index, name.strip(), float(value))
        except (RuntimeError, ValueError):
            raise ItmkitError(f"search parameter {item.strip()!r} does not apply to this index"
                              f" ({type(index).__name__}): expected NAME=VALUE, e.g. nprobe=16 (IVF) or"
                              " efSearch=128 (HNSW)") from None


class IndexBuilder:
    """Add unit vectors to a faiss index as they come; an index that needs training (IVF, PQ) is trained
    on the first ``train_size`` vectors, held until then (so memory stays that buffer plus the index)."""

    def __init__(self, dim: int, spec: str = DEFAULT_INDEX, train_size: int = 100_000):
        self.index = new_index(dim, spec)
        self.spec = spec
        self.train_size = train_size
        self.buffer: list[np.ndarray] = []
        self.buffered = 0

    def add(self, vectors: np.ndarray) -> None:
        if self.index.is_trained:
            self.index.add(np.ascontiguousarray(vectors, dtype=np.float32))
            return
        self.buffer.append(vectors)
        self.buffered += len(vectors)
        if self.buffered >= self.train_size:
            self._train()

    def _train(self) -> None:
        sample = np.ascontiguousarray(np.concatenate(self.buffer), dtype=np.float32)
        self.buffer, self.buffered = [], 0
        try:
            self.index.train(sample)
        except RuntimeError as exc:
            reason = str(exc).strip().splitlines()[-1][:160]
            raise ItmkitError(f"index type {self.spec!r} cannot be trained on {len(sample)} vectors ({reason}):"
                              " an IVF index needs at least as many vectors as lists (IVF<lists>), about 39 per"
                              " list for a good quantizer; use fewer lists or Flat for a small gallery") from None
        self.index.add(sample)

    def finish(self):
        if not self.index.is_trained or self.buffer:
            self._train()
        return self.index


# ----------------------------------------------------------------------------------- re-scoring


@torch.no_grad()
def rescore(model: ITMModel, queries: Encoded, query_side: str, candidates: np.ndarray, store: FragmentStore,
            device: torch.device | str = "cpu") -> np.ndarray:
    """Second-stage scores (Q, K) of each query against its candidates (Q, K store positions; -1 = none).

    One block per query: the query against its K candidates (K x 1 for a caption query, 1 x K for an
    image query), every model stage vectorised over the block. Missing candidates score -inf.
    """
    out = np.full(candidates.shape, -np.inf, dtype=np.float32)
    for q in range(candidates.shape[0]):
        valid = np.flatnonzero(candidates[q] >= 0)
        if not valid.size:
            continue
        gallery = store.take(candidates[q, valid]).to(device)
        query = queries.select(slice(q, q + 1)).to(device)
        if query_side == "text":
            scores = model.score(gallery, query)[:, 0]
        else:
            scores = model.score(query, gallery)[0]
        out[q, valid] = scores.float().cpu().numpy()
    return out


def shortlist_order(rescored: np.ndarray) -> np.ndarray:
    """Each row's shortlist positions by second-stage score, best first (ties keep the first stage's order)."""
    return np.argsort(-rescored, axis=1, kind="stable")


# ----------------------------------------------------------------------------------- evaluation


@attrs.frozen
class Side:
    """One side of a split as two-stage evaluation reads it: first-stage unit vectors (N, D) and the
    second stage's encodings in a fragment store, both in split order."""

    vectors: np.ndarray
    store: FragmentStore


def encode_side(side: str, split: Split, first: tuple[ITMModel, Vocabulary], second: tuple[ITMModel, Vocabulary],
                folder: Path, *, device: torch.device | str, batch_size: int,
                update: Callable[[int], None] | None = None) -> Side:
    """Encode ``side`` with the first stage (vectors) and the second (a fragment store in ``folder``);
    one pass when both are the same model."""
    vectors: list[np.ndarray] = []
    writer = FragmentWriter(folder)
    done = 0
    for _, enc in encoded_batches(second[0], side, split, second[1], device, batch_size):
        writer.append(kept(second[0], side, enc))
        if first[0] is second[0]:
            vectors.append(unit_vectors(enc))
        done += len(enc.global_ if enc.local is None else enc.local.feats)
        if update:
            update(done)
    writer.close()
    if first[0] is not second[0]:
        vectors = [unit_vectors(enc) for _, enc in encoded_batches(first[0], side, split, first[1], device, batch_size)]
    return Side(np.concatenate(vectors), FragmentStore(folder))


def two_stage_ranks(queries: Side, gallery: Side, query_ids: np.ndarray, gallery_ids: np.ndarray,
                    truth: Callable[[np.ndarray, np.ndarray], np.ndarray], model: ITMModel, query_side: str, k: int,
                    *, index_spec: str = DEFAULT_INDEX, search_params: str | None = None,
                    device: torch.device | str = "cpu", timer: dict[str, float] | None = None,
                    update: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Rank of each query's first true match in its two-stage list, and whether one reached the shortlist.

    ``query_ids`` / ``gallery_ids``: split positions of the queries and of the gallery (a protocol fold);
    ``truth(query_ids, gallery_ids)`` gives the (Q, N) bool matrix of true matches. The list is the K
    shortlisted items by second-stage score, then the others by first-stage score; ranks are 0-based
    and read as the standard evaluation reads a matrix row (ties: the later item first).
    """
    timer = {} if timer is None else timer
    start = time.perf_counter()
    builder = IndexBuilder(gallery.vectors.shape[1], index_spec, train_size=len(gallery_ids))
    builder.add(gallery.vectors[gallery_ids])
    index = builder.finish()
    set_search_parameters(index, search_params)
    timer["shortlist"] = timer.get("shortlist", 0.0) + time.perf_counter() - start
    k = min(k, len(gallery_ids))
    ranks = np.empty(len(query_ids), dtype=np.int64)
    reached = np.empty(len(query_ids), dtype=bool)
    query_store = queries.store
    for c0 in range(0, len(query_ids), _QUERIES_PER_CHUNK):
        chunk = query_ids[c0:c0 + _QUERIES_PER_CHUNK]
        vectors = np.ascontiguousarray(queries.vectors[chunk])
        t0 = time.perf_counter()
        _, local = index.search(vectors, k)  # (Q, k) gallery-local positions, -1 past what was found
        t1 = time.perf_counter()
        candidates = np.where(local >= 0, gallery_ids[np.maximum(local, 0)], -1)
        rescored = rescore(model, query_store.take(chunk), query_side, candidates, gallery.store, device)
        t2 = time.perf_counter()
        timer["shortlist"] += t1 - t0
        timer["rescore"] = timer.get("rescore", 0.0) + t2 - t1
        # The whole list as one key row: shortlisted items above every other, by their second-stage score.
        key = (vectors @ gallery.vectors[gallery_ids].T).astype(np.float64)
        found = local >= 0
        lift = key.max() - rescored[found].min() + 1.0 if found.any() else 0.0
        rows = np.broadcast_to(np.arange(len(chunk))[:, None], local.shape)
        key[rows[found], local[found]] = rescored[found] + lift
        hits = truth(chunk, gallery_ids)  # (Q, N)
        order = _descending_order(key)
        ranks[c0:c0 + len(chunk)] = np.take_along_axis(hits, order, axis=1).argmax(axis=1)
        reached[c0:c0 + len(chunk)] = (np.take_along_axis(hits, np.maximum(local, 0), axis=1) & found).any(axis=1)
        if update:
            update(c0 + len(chunk))
    return ranks, reached


@attrs.frozen
class TwoStageResult:
    """Two-stage evaluation by a protocol: its metrics plus ``i2t_shortlist_recall`` / ``t2i_shortlist_recall``
    (% of queries with a true match in the shortlist, averaged over folds like the metrics), and the
    seconds of each stage (``encode``: both models on both sides; ``shortlist``: index and search;
    ``rescore``: the second stage on the shortlists)."""

    metrics: dict[str, float]
    seconds: dict[str, float]


def evaluate_two_stage(second: tuple[ITMModel, Vocabulary], first: tuple[ITMModel, Vocabulary], split: Split,
                       protocol: str, k: int, *, index_spec: str = DEFAULT_INDEX, search_params: str | None = None,
                       device: torch.device | str = "cpu", batch_size: int = 256, progress=None) -> TwoStageResult:
    """Evaluate retrieval where ``first`` shortlists ``k`` items per query and ``second`` re-scores them,
    within each gallery of the protocol (coco-1k-5fold: each fold), in both directions."""
    from itmkit.evaluation import _owners

    problem = first_stage_problem(first[0], "the first stage")
    if problem:
        raise ItmkitError(problem)
    if k < 1:
        raise ItmkitError(f"--shortlist {k}: the shortlist must hold at least 1 item")
    owners = _owners(split.caption_images)
    image_of = np.arange(split.num_captions) // owners if isinstance(owners, int) else owners
    galleries = protocol_galleries(protocol, owners, split.num_images)
    models = {id(first[0]): first[0], id(second[0]): second[0]}
    states = {key: m.training for key, m in models.items()}
    timer: dict[str, float] = {}
    folds, recalls = [], []
    try:
        for m in models.values():
            m.eval()
        with tempfile.TemporaryDirectory(prefix="itmkit-twostage-") as tmp:
            start = time.perf_counter()
            sides = {}
            for side, n in (("image", split.num_images), ("text", split.num_captions)):
                with task(progress, f"encode {side}s", n) as update:
                    sides[side] = encode_side(side, split, first, second, Path(tmp) / side, device=device,
                                              batch_size=batch_size, update=update)
            timer["encode"] = time.perf_counter() - start
            for images, captions in galleries:
                with task(progress, "image queries", len(images)) as update:
                    i2t, i2t_reached = two_stage_ranks(
                        sides["image"], sides["text"], images, captions,
                        lambda q, g: image_of[g][None, :] == q[:, None], second[0], "image", k,
                        index_spec=index_spec, search_params=search_params, device=device, timer=timer, update=update)
                with task(progress, "caption queries", len(captions)) as update:
                    t2i, t2i_reached = two_stage_ranks(
                        sides["text"], sides["image"], captions, images,
                        lambda q, g: g[None, :] == image_of[q][:, None], second[0], "text", k,
                        index_spec=index_spec, search_params=search_params, device=device, timer=timer, update=update)
                folds.append(ranks_metrics(i2t, t2i))
                recalls.append((100.0 * i2t_reached.mean(), 100.0 * t2i_reached.mean()))
    finally:
        for key, m in models.items():
            m.train(states[key])
    metrics = folds[0] if len(folds) == 1 else average_folds(folds)
    metrics["i2t_shortlist_recall"] = float(np.mean([r[0] for r in recalls]))
    metrics["t2i_shortlist_recall"] = float(np.mean([r[1] for r in recalls]))
    timer["total"] = sum(timer.values())
    return TwoStageResult(metrics, timer)
