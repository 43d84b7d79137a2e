"""A stored retrieval index: a gallery's first-stage vectors in faiss, and what re-scoring needs beside them.

An index folder (``itmkit index build``) holds, for each indexed side (``images``, ``captions``):

- ``SIDE.faiss``: the first stage's unit vectors in a faiss inner-product index (``faiss.write_index``);
- ``SIDE.vectors.npy``: the same vectors, memory-mapped (a query taken from the gallery: ``search --image``);
- ``SIDE.store/``: the re-scoring model's encodings, a fragment store (``itmkit.fragments``);

and ``image_ids.txt`` (one line per image), ``captions.txt`` and ``caption_images.npy`` (the captions'
texts and images, when captions are indexed), and ``manifest.json``, written last: what was built from
what (both checkpoints with their sha256, the data folder and split), and every file with its size.
A folder without a complete manifest is not an index: a build writes into a temporary sibling folder
and renames it into place, so a killed build leaves nothing that loads. Nothing is unpickled on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import numpy as np
import torch

from itmkit.build import Encoded, ITMModel
from itmkit.checkpoint import atomic_write_text
from itmkit.data.split import Split, split_image_ids
from itmkit.data.vocab import Vocabulary
from itmkit.errors import ItmkitError
from itmkit.fragments import DEFAULT_SHARD_SIZE, FragmentStore, FragmentWriter
from itmkit.progress import task
from itmkit.runs import hold_lock, remove_dead_temp_dirs, temp_dir_prefix
from itmkit.twostage import (DEFAULT_INDEX, IndexBuilder, encoded_batches, first_stage_problem, kept, rescore,
                             set_search_parameters, shortlist_order, unit_vectors)

MANIFEST = "manifest.json"
FORMAT = "itmkit-index"
VERSION = 1
SIDE_FOLDERS = {"image": "images", "text": "captions"}  # model side -> the index's name for it
DEFAULT_TRAIN_SIZE = 100_000  # vectors an IVF / PQ index is trained on (faiss wants ~39 per list at least)
RENDERED = "rendered"  # built-in data: images drawn on demand for search results


class IndexFolderError(ItmkitError):
    """An index folder that is missing, incomplete, damaged, or does not fit the command."""


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@attrs.frozen
class Checkpoint:
    """A loaded checkpoint and the file it came from: what an index records of a model."""

    path: Path
    model: ITMModel
    vocab: Vocabulary
    sha256: str

    def record(self) -> dict:
        return {"path": str(self.path.resolve()), "sha256": self.sha256, "recipe": self.model.recipe.info.name}


# ----------------------------------------------------------------------------------- building


def check_index_target(out: Path, force: bool) -> None:
    """Refuse an ``-o`` that is a file, a folder of other files, or an index without ``--force``."""
    if out.exists() and not out.is_dir():
        raise IndexFolderError(f"-o {out} exists and is not a folder; give a new folder for the index")
    if not out.is_dir():
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if MANIFEST not in entries:
        shown = ", ".join(entries[:6]) + (f" and {len(entries) - 6} more" if len(entries) > 6 else "")
        raise IndexFolderError(f"-o {out} is a folder of other files, not an itmkit index (it holds {shown}); build"
                          " into a new or empty folder, so nothing there is replaced")
    if not force:
        raise IndexFolderError(f"-o {out} is an index already; give --force to replace it, or another folder")


def _paired_batches(model: Checkpoint, first: Checkpoint, side: str, split: Split, device, batch_size: int
                    ) -> Iterator[tuple[Encoded, np.ndarray]]:
    """(the model's encoding, the first stage's unit vectors) of each batch of ``side``, in split order."""
    mine = encoded_batches(model.model, side, split, model.vocab, device, batch_size)
    if first.model is model.model:
        for _, enc in mine:
            yield enc, unit_vectors(enc)
        return
    theirs = encoded_batches(first.model, side, split, first.vocab, device, batch_size)
    for (rows, enc), (rows_first, enc_first) in zip(mine, theirs):
        assert np.array_equal(rows, rows_first)  # both read the split in order, in equal batches
        yield enc, unit_vectors(enc_first)


def _build_side(model: Checkpoint, first: Checkpoint, side: str, split: Split, folder: Path, *, index_spec: str,
                train_size: int, shard_size: int, batch_size: int, device, update: Callable[[int], None]) -> int:
    """Encode one side into ``folder``: the faiss index, the vectors, the fragment store; the item count."""
    name = SIDE_FOLDERS[side]
    count = split.num_images if side == "image" else split.num_captions
    dim = first.model.wiring.image[-1].output.dim
    builder = IndexBuilder(dim, index_spec, train_size=train_size)
    writer = FragmentWriter(folder / f"{name}.store", shard_size)
    vectors = np.lib.format.open_memmap(folder / f"{name}.vectors.npy", mode="w+", dtype=np.float32, shape=(count, dim))
    done = 0
    for enc, unit in _paired_batches(model, first, side, split, device, batch_size):
        writer.append(kept(model.model, side, enc))
        builder.add(unit)
        vectors[done:done + len(unit)] = unit
        done += len(unit)
        update(done)
    vectors.flush()
    del vectors
    writer.close()
    import faiss

    faiss.write_index(builder.finish(), str(folder / f"{name}.faiss"))
    return done


def build_index(model: Checkpoint, first: Checkpoint, data_dir: Path, split: Split, out: Path, *,
                sides: tuple[str, ...] = ("image", "text"), index_spec: str = DEFAULT_INDEX,
                train_size: int = DEFAULT_TRAIN_SIZE, shard_size: int = DEFAULT_SHARD_SIZE, batch_size: int = 256,
                search_params: str | None = None, device: torch.device | str = "cpu", force: bool = False,
                progress=None, log: Callable[[str], None] | None = None) -> dict:
    """Build an index of ``split`` at ``out`` (see the module docstring); returns its manifest.

    ``first`` shortlists (its pooled vectors; ``first`` may be ``model``), ``model``'s encodings are
    stored for re-scoring. Memory: one batch, one shard of encodings, the faiss index and, for an
    index that trains (IVF, PQ), ``train_size`` vectors until it is trained. Raises ItmkitError for a
    first stage without pools, an unusable ``out``, an index type faiss does not know or cannot train.
    """
    problem = first_stage_problem(first.model, str(first.path))
    if problem:
        raise IndexFolderError(problem)
    out = Path(out).absolute()
    check_index_target(out, force)
    set_search_parameters(IndexBuilder(first.model.wiring.image[-1].output.dim, index_spec).index, search_params)
    stem = f"{out.name}.building"
    with hold_lock(out.parent / f".{out.name}.lock", wait=False) as taken:
        if not taken:
            raise IndexFolderError(f"another itmkit index build is writing {out} (lock {out.parent / f'.{out.name}.lock'});"
                              " wait for it to finish, or build into another folder")
        remove_dead_temp_dirs(out.parent, stem)
        check_index_target(out, force)  # again under the lock: another build may have finished meanwhile
        tmp = Path(tempfile.mkdtemp(prefix=temp_dir_prefix(stem), dir=out.parent))
        try:
            model.model.eval()
            first.model.eval()
            counts = {}
            with torch.no_grad():
                for side in sides:
                    total = split.num_images if side == "image" else split.num_captions
                    with task(progress, f"index {SIDE_FOLDERS[side]}", total) as update:
                        counts[side] = _build_side(model, first, side, split, tmp, index_spec=index_spec,
                                                   train_size=train_size, shard_size=shard_size,
                                                   batch_size=batch_size, device=device, update=update)
            (tmp / "image_ids.txt").write_text("\n".join(split_image_ids(data_dir, split, log)) + "\n", encoding="utf-8")
            if "text" in sides:
                (tmp / "captions.txt").write_text("\n".join(c.replace("\n", " ") for c in split.captions) + "\n",
                                                  encoding="utf-8")
                np.save(tmp / "caption_images.npy", split.caption_images, allow_pickle=False)
            manifest = _manifest(model, first, data_dir, split, counts, index_spec, search_params, tmp)
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1) + "\n")  # last: the index is whole
            _move_into_place(tmp, out, stem)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _manifest(model: Checkpoint, first: Checkpoint, data_dir: Path, split: Split, counts: dict[str, int],
              index_spec: str, search_params: str | None, folder: Path) -> dict:
    from itmkit import __version__

    builtin = None
    if data_dir.is_dir() and (data_dir / "shapes.json").is_file():
        builtin = {"seed": int(json.loads((data_dir / "shapes.json").read_text()).get("seed", 0))}
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    return {
        "format": FORMAT, "version": VERSION, "itmkit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "sides": {SIDE_FOLDERS[side]: {"items": n} for side, n in counts.items()},
        "dim": first.model.wiring.image[-1].output.dim, "index_type": index_spec, "search_params": search_params,
        "model": model.record(), "first_stage": first.record(),
        "data": str(data_dir.resolve()), "split": split.name, "builtin_data": builtin,
        "num_images": split.num_images, "num_captions": split.num_captions, "files": files,
    }


def _move_into_place(tmp: Path, out: Path, stem: str) -> None:
    """Rename the finished ``tmp`` to ``out``; a replaced index is first moved aside, then deleted."""
    old = None
    if out.is_dir():
        old = out.parent / f"{temp_dir_prefix(stem)}old-{os.urandom(4).hex()}"
        os.rename(out, old)  # an empty folder, or an index the caller allowed to replace (--force)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------- loading


class Index:
    """An index folder read back: its manifest, and its sides' faiss indexes, vectors and stores on demand."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.sides = {name for name in self.manifest["sides"]}
        self._faiss: dict[str, object] = {}

    def require(self, name: str, why: str) -> None:
        if name not in self.sides:
            raise IndexFolderError(f"index {self.folder} has no {name} side ({why}); rebuild it with --side both")

    def faiss(self, name: str, search_params: str | None = None):
        if name not in self._faiss:
            import faiss

            try:
                self._faiss[name] = faiss.read_index(str(self.folder / f"{name}.faiss"))
            except RuntimeError as exc:
                raise IndexFolderError(f"index {self.folder}: {name}.faiss cannot be read"
                                  f" ({str(exc).strip().splitlines()[-1][:160]}); rebuild the index") from None
        index = self._faiss[name]
        set_search_parameters(index, search_params or self.manifest.get("search_params"))
        return index

    def vectors(self, name: str) -> np.ndarray:
        return np.load(self.folder / f"{name}.vectors.npy", mmap_mode="r", allow_pickle=False)

    def store(self, name: str) -> FragmentStore:
        return FragmentStore(self.folder / f"{name}.store")

    def image_ids(self) -> list[str]:
        return (self.folder / "image_ids.txt").read_text(encoding="utf-8").splitlines()

    def captions(self) -> list[str]:
        return (self.folder / "captions.txt").read_text(encoding="utf-8").splitlines()

    def caption_images(self) -> np.ndarray:
        return np.load(self.folder / "caption_images.npy", allow_pickle=False)


def read_manifest(folder: Path) -> dict:
    """The manifest of an index folder, after checking that every file it lists is there at its size."""
    if not folder.is_dir():
        raise IndexFolderError(f"index folder not found: {folder} (build one with `itmkit index build`)")
    path = folder / MANIFEST
    if not path.is_file():
        raise IndexFolderError(f"{folder} is not an itmkit index: it has no {MANIFEST} (a build writes it last, so a build"
                          " that did not finish leaves none); build it with `itmkit index build`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format is {manifest.get('format')!r}, not {FORMAT!r}")
        files = dict(manifest["files"])
        sides = dict(manifest["sides"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IndexFolderError(f"index {folder}: {MANIFEST} is damaged ({exc}); rebuild the index") from None
    if manifest.get("version") != VERSION:
        raise IndexFolderError(f"index {folder} is of index format version {manifest.get('version')}; this itmkit reads"
                          f" version {VERSION}: rebuild it")
    for name, size in files.items():
        file = folder / name
        if not file.is_file() or file.stat().st_size != size:
            state = "missing" if not file.is_file() else f"{file.stat().st_size} bytes, {size} recorded"
            raise IndexFolderError(f"index {folder}: {name} is {state}; the index is damaged, rebuild it")
    if not sides:
        raise IndexFolderError(f"index {folder}: {MANIFEST} lists no sides; rebuild the index")
    return manifest


def check_recorded(record: dict, path: Path | None, what: str, index: Path) -> Path:
    """The checkpoint file of ``record`` (or ``path``, when given), after checking its sha256 against it."""
    path = Path(path) if path is not None else Path(record["path"])
    if not path.is_file():
        raise IndexFolderError(f"{what} of index {index}, {path}, is not a file here (built from {record['path']},"
                               f" sha256 {record['sha256'][:12]}…)")
    if file_sha256(path) != record["sha256"]:
        raise IndexFolderError(f"{what} {path} is not the checkpoint index {index} was built with ({record['path']},"
                          f" sha256 {record['sha256'][:12]}…, recipe {record['recipe']}): its stored encodings"
                          " are that model's; re-score with it, or rebuild the index")
    return path


# ----------------------------------------------------------------------------------- searching


@attrs.frozen
class Hit:
    """One result: the gallery position, the first stage's cosine, the second stage's score (or None)."""

    position: int
    first_score: float
    second_score: float | None


@torch.no_grad()
def encode_query_text(checkpoint: Checkpoint, text: str, device) -> Encoded:
    """One caption encoded by a checkpoint's text tower (its own vocabulary), as a batch of one."""
    from itmkit.data.loader import pad_tokens
    from itmkit.types import Tokens

    tokens, lengths = pad_tokens([np.asarray(checkpoint.vocab.encode(text), dtype=np.int64)])
    checkpoint.model.eval()
    return checkpoint.model.encode_texts(Tokens(tokens.to(device), lengths.to(device)))


def search(index: Index, query_vector: np.ndarray, gallery: str, k: int, *, shortlist: int | None = None,
           rescorer: tuple[ITMModel, Encoded, str] | None = None, search_params: str | None = None,
           device: torch.device | str = "cpu") -> tuple[list[Hit], dict[str, float]]:
    """The top ``k`` of ``gallery`` ("images" / "captions") for one query, and each stage's seconds.

    ``query_vector`` (D,) is the first stage's unit vector of the query. With ``rescorer`` (the model,
    the query's encoding by it, the query's side "image" / "text"), the first stage's top ``shortlist``
    are re-scored by the model from the gallery's store and ordered by that score.
    """
    t0 = time.perf_counter()
    depth = max(k, shortlist or 0) if rescorer else k
    depth = min(depth, index.manifest["sides"][gallery]["items"])
    scores, positions = index.faiss(gallery, search_params).search(
        np.ascontiguousarray(query_vector[None], dtype=np.float32), depth)
    found = positions[0] >= 0
    positions, scores = positions[0][found], scores[0][found]
    seconds = {"first_stage": time.perf_counter() - t0}
    if rescorer is None:
        return [Hit(int(p), float(s), None) for p, s in zip(positions[:k], scores[:k])], seconds
    t1 = time.perf_counter()
    model, query, query_side = rescorer
    second = rescore(model, query, query_side, positions[None], index.store(gallery), device)
    order = shortlist_order(second)[0][:k]
    seconds["rescore"] = time.perf_counter() - t1
    return [Hit(int(positions[i]), float(scores[i]), float(second[0, i])) for i in order], seconds


def image_file(index: Index, image_id: str, position: int) -> Path | None:
    """The picture of an image of the built-in data: the data folder's ``images/SPLIT/ID.png`` when it was
    written, else drawn once into the index's ``rendered/`` folder. None for other data."""
    manifest = index.manifest
    if not manifest.get("builtin_data"):
        return None
    stored = Path(manifest["data"]) / "images" / manifest["split"] / f"{image_id}.png"
    if stored.is_file():
        return stored
    target = index.folder / RENDERED / f"{image_id}.png"
    if not target.is_file():
        from itmkit.data.shapes import render_image

        try:
            target.parent.mkdir(exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            render_image(manifest["split"], position, seed=manifest["builtin_data"]["seed"]).save(tmp, format="PNG")
            os.replace(tmp, target)
        except OSError:
            return None  # a read-only index: results without the picture
    return target
