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


def shortlists(queries: np.ndarray, gallery: np.ndarray, gallery_ids: np.ndarray, k: int, *,
               index_spec: str = DEFAULT_INDEX, search_params: str | None = None) -> np.ndarray:
    """Each query vector's top ``k`` among ``gallery[gallery_ids]`` by inner product, as split positions
    (Q, k), best first; -1 where an approximate index found fewer."""
    builder = IndexBuilder(gallery.shape[1], index_spec, train_size=len(gallery_ids))
    builder.add(gallery[gallery_ids])
    index = builder.finish()
    set_search_parameters(index, search_params)
    _, local = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(gallery_ids)))
    return np.where(local >= 0, gallery_ids[np.maximum(local, 0)], -1)


MAX_BLOCK_PAIRS = 256  # captions scored against one image in one call (cut in length order: little padding)


@torch.no_grad()
def score_pairs(model: ITMModel, images: FragmentStore, texts: FragmentStore, image_pos: np.ndarray,
                caption_pos: np.ndarray, *, device: torch.device | str = "cpu",
                update: Callable[[int], None] | None = None) -> np.ndarray:
    """Second-stage scores of a set of (image, caption) pairs, in their order.

    Pairs are grouped by image, and each image is scored against its captions in blocks of up to
    ``MAX_BLOCK_PAIRS`` (1 x n), the captions taken shortest first so that each block is padded only
    to its own longest caption (on the built-in data that alone doubles the rate). A two-stage
    evaluation's shortlists, both directions together, so become a few blocks per image, where one
    block per query would be several times slower.
    """
    scores = np.empty(len(image_pos), dtype=np.float32)
    order = np.lexsort((texts.lengths()[caption_pos], image_pos))
    bounds = np.flatnonzero(np.diff(image_pos[order])) + 1
    done = 0
    for group in np.split(order, bounds) if len(order) else []:
        image = images.take(image_pos[group[:1]]).to(device)
        for s in range(0, len(group), MAX_BLOCK_PAIRS):
            part = group[s:s + MAX_BLOCK_PAIRS]
            scores[part] = model.score(image, texts.take(caption_pos[part]).to(device))[0].float().cpu().numpy()
        done += len(group)
        if update:
            update(done)
    return scores


def list_ranks(candidates: np.ndarray, rescored: np.ndarray, queries: np.ndarray, gallery: np.ndarray,
               gallery_ids: np.ndarray, truth: Callable[[slice], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Rank of each query's first true match in its two-stage list, and whether one reached the shortlist.

    ``candidates`` (Q, K): split positions of the shortlist (-1: none), ``rescored`` their second-stage
    scores; ``queries`` (Q, D) and ``gallery`` (N, D) the first stage's vectors, ``gallery_ids`` the
    gallery's split positions, ``truth(rows)`` the (rows, N) bool matrix of true matches among them. The list is the shortlist by
    second-stage score, then every other gallery item by first-stage score; ranks are 0-based and read as
    the standard evaluation reads a matrix row (ties: the later item first).
    """
    ranks = np.empty(len(candidates), dtype=np.int64)
    reached = np.empty(len(candidates), dtype=bool)
    where = np.full(int(gallery_ids.max()) + 1, -1, dtype=np.int64)
    where[gallery_ids] = np.arange(len(gallery_ids))  # split position -> column of the gallery
    for c0 in range(0, len(candidates), _QUERIES_PER_CHUNK):
        rows = slice(c0, c0 + _QUERIES_PER_CHUNK)
        found = candidates[rows] >= 0
        columns = where[np.maximum(candidates[rows], 0)]
        # The whole list as one key row: shortlisted items above every other, by their second-stage score.
        key = (queries[rows] @ gallery[gallery_ids].T).astype(np.float64)
        lift = key.max() - rescored[rows][found].min() + 1.0 if found.any() else 0.0
        r = np.broadcast_to(np.arange(len(found))[:, None], found.shape)
        key[r[found], columns[found]] = rescored[rows][found] + lift
        hits = truth(rows)
        ranks[rows] = np.take_along_axis(hits, _descending_order(key), axis=1).argmax(axis=1)
        reached[rows] = (np.take_along_axis(hits, columns, axis=1) & found).any(axis=1)
    return ranks, reached


@attrs.frozen
class TwoStageResult:
    """Two-stage evaluation by a protocol: its metrics plus ``i2t_shortlist_recall`` / ``t2i_shortlist_recall``
    (% of queries with a true match in the shortlist, averaged over folds like the metrics), and the
    seconds of each stage (``encode``: both models on both sides; ``shortlist``: index and search;
    ``rescore``: the second stage on the shortlisted pairs; ``rank``: reading the ranks off the lists)."""

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
                t0 = time.perf_counter()
                i2t_lists = shortlists(sides["image"].vectors[images], sides["text"].vectors, captions, k,
                                       index_spec=index_spec, search_params=search_params)
                t2i_lists = shortlists(sides["text"].vectors[captions], sides["image"].vectors, images, k,
                                       index_spec=index_spec, search_params=search_params)
                t1 = time.perf_counter()
                # Both directions' shortlists as one set of (image, caption) pairs, each scored once.
                i2t_pairs = (np.repeat(images, i2t_lists.shape[1]), i2t_lists.ravel())
                t2i_pairs = (t2i_lists.ravel(), np.repeat(captions, t2i_lists.shape[1]))
                image_pos = np.concatenate([i2t_pairs[0], t2i_pairs[0]])
                caption_pos = np.concatenate([i2t_pairs[1], t2i_pairs[1]])
                valid = (image_pos >= 0) & (caption_pos >= 0)
                pair_keys, inverse = np.unique(image_pos[valid] * split.num_captions + caption_pos[valid],
                                               return_inverse=True)
                with task(progress, "re-score shortlisted pairs", len(pair_keys)) as update:
                    unique_scores = score_pairs(second[0], sides["image"].store, sides["text"].store,
                                                pair_keys // split.num_captions, pair_keys % split.num_captions,
                                                device=device, update=update)
                scores = np.full(len(image_pos), -np.inf, dtype=np.float32)
                scores[valid] = unique_scores[inverse]
                t2 = time.perf_counter()
                i2t, i2t_reached = list_ranks(i2t_lists, scores[:i2t_lists.size].reshape(i2t_lists.shape),
                                              sides["image"].vectors[images], sides["text"].vectors, captions,
                                              lambda rows: image_of[captions][None, :] == images[rows, None])
                t2i, t2i_reached = list_ranks(t2i_lists, scores[i2t_lists.size:].reshape(t2i_lists.shape),
                                              sides["text"].vectors[captions], sides["image"].vectors, images,
                                              lambda rows: images[None, :] == image_of[captions[rows], None])
                for stage, seconds in (("shortlist", t1 - t0), ("rescore", t2 - t1), ("rank", time.perf_counter() - t2)):
                    timer[stage] = timer.get(stage, 0.0) + seconds
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
