"""``itmkit index build`` and ``itmkit search``: a faiss index of a gallery and queries against it (issue 14)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from itmkit.errors import ItmkitError

index_app = typer.Typer(no_args_is_help=True, help="Build a retrieval index of a gallery (docs/retrieval.md).")
SIDE_CHOICES = {"images": ("image",), "captions": ("text",), "both": ("image", "text")}


def register(app: typer.Typer) -> None:
    """Add the retrieval commands to the ``itmkit`` command line."""
    app.add_typer(index_app, name="index")
    app.command("search")(search)


def _checkpoint(path: Path, device):
    from itmkit.checkpoint import load_checkpoint
    from itmkit.index import Checkpoint, file_sha256

    loaded = load_checkpoint(path, device)
    loaded.model.eval()
    return Checkpoint(Path(path), loaded.model, loaded.vocab, file_sha256(path))


@index_app.command("build")
def build(
    model: Annotated[Path, typer.Argument(help="the checkpoint whose encodings are stored for re-scoring (and whose"
                                         " pooled vectors shortlist, unless --first-stage)")],
    out: Annotated[Path, typer.Option("-o", "--out", help="the index folder to write (new, or empty; --force"
                                      " replaces an index)")],
    data: Annotated[Optional[str], typer.Option(help="dataset folder (default: the recipe's \\[data].path)")] = None,
    split: Annotated[Optional[str], typer.Option(help="split to index (default: the recipe's test split)")] = None,
    first_stage: Annotated[Optional[Path], typer.Option("--first-stage", help="the checkpoint whose pooled vectors"
                                                        " go into the faiss index (VSE++, GPO; needed when MODEL has"
                                                        " no pools, e.g. SCAN, SGRAF)")] = None,
    side: Annotated[str, typer.Option(help="what to index: images (text queries), captions (--image queries), or"
                                      " both")] = "both",
    index_type: Annotated[Optional[str], typer.Option("--index-type", help="faiss index factory string: Flat (exact,"
                                                      " the default), HNSW32, IVF4096,Flat, IVF4096,PQ32, ...")] = None,
    search_params: Annotated[Optional[str], typer.Option("--search-params", help="default search parameters stored"
                                                         " with the index, e.g. nprobe=32 or efSearch=128")] = None,
    train_size: Annotated[int, typer.Option("--train-size", help="vectors an IVF / PQ index is trained on (the first"
                                            " ones of the gallery)")] = 100_000,
    shard_size: Annotated[int, typer.Option("--shard-size", help="items per shard of the stored encodings")] = 4096,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="items encoded at once (default: the"
                                                      " recipe's eval batch size)")] = None,
    device: Annotated[str, typer.Option(help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")] = "auto",
    force: Annotated[bool, typer.Option("--force", metavar="", help="replace an existing index at --out")] = False,
) -> None:
    """Embed a split's images and/or captions into a faiss index, with the encodings re-scoring needs."""
    from itmkit.cli import _device, err, out as console
    from itmkit.datasets import recorded_data_dir
    from itmkit.errors import did_you_mean
    from itmkit.index import build_index, check_index_target
    from itmkit.preflight import check_eval_data
    from itmkit.progress import make_progress
    from itmkit.twostage import DEFAULT_INDEX, first_stage_problem

    if side not in SIDE_CHOICES:
        raise ItmkitError(f"--side {side!r} is not known" + did_you_mean(side, SIDE_CHOICES))
    for flag, value in (("--train-size", train_size), ("--shard-size", shard_size), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise ItmkitError(f"{flag} must be at least 1, got {value}")
    check_index_target(out.absolute(), force)  # before the long part
    dev = _device(device)
    second = _checkpoint(model, dev)
    first = _checkpoint(first_stage, dev) if first_stage else second
    problem = first_stage_problem(first.model, str(first.path))
    if problem:
        raise ItmkitError(problem)
    recipe = second.model.recipe
    folder = recorded_data_dir(data, recipe.data.path, model, log=err.print)
    split_name = split or recipe.data.test_split
    models = [(str(model), second.model)] + ([(str(first_stage), first.model)] if first_stage else [])
    the_split = check_eval_data(folder, split_name, None, models)
    start = time.perf_counter()
    with make_progress() as progress:
        manifest = build_index(second, first, folder, the_split, out, sides=SIDE_CHOICES[side],
                               index_spec=index_type or DEFAULT_INDEX, train_size=train_size, shard_size=shard_size,
                               batch_size=batch_size or recipe.train.eval_batch_size, search_params=search_params,
                               device=dev, force=force, progress=progress, log=err.print)
    counts = ", ".join(f"{n['items']} {name}" for name, n in manifest["sides"].items())
    size = sum(manifest["files"].values()) / 2**20
    console.print(f"indexed {counts} of split {split_name!r} into {out} ({manifest['index_type']},"
                  f" {manifest['dim']}-d, {size:,.1f} MiB) in {time.perf_counter() - start:.1f} s")


def search(
    index: Annotated[Path, typer.Argument(help="an index folder (itmkit index build)")],
    query: Annotated[Optional[str], typer.Argument(help="a caption to retrieve images for")] = None,
    k: Annotated[int, typer.Option("--k", help="results to show")] = 10,
    rescore: Annotated[Optional[Path], typer.Option(help="re-score the shortlist with this checkpoint: the index's"
                                                    " MODEL (its encodings are stored)")] = None,
    shortlist: Annotated[Optional[int], typer.Option(help="--rescore: first-stage results re-scored (default:"
                                                     " max(k, 100))")] = None,
    image: Annotated[Optional[str], typer.Option("--image", help="retrieve captions for this image id of the indexed"
                                                 " split, instead of images for a text")] = None,
    first_stage: Annotated[Optional[Path], typer.Option("--first-stage", help="where the index's first-stage"
                                                        " checkpoint is now, if it moved (checked by sha256)")] = None,
    search_params: Annotated[Optional[str], typer.Option("--search-params", help="faiss search parameters for this"
                                                         " query, e.g. nprobe=64 or efSearch=256")] = None,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="print one JSON object")] = False,
    device: Annotated[str, typer.Option(help="'auto' (cuda if available), 'cpu', 'cuda', ...")] = "auto",
) -> None:
    """Retrieve images for a caption (or captions for an image, --image) from an index; --rescore re-ranks."""
    from rich.table import Table

    from itmkit.cli import _device, err, out as console
    from itmkit.data.vocab import tokenize
    from itmkit.errors import did_you_mean
    from itmkit.index import Index, check_recorded, encode_query_text, image_file, search as run_search
    from itmkit.twostage import unit_vectors

    if (query is None) == (image is None):
        raise ItmkitError("give a query: a caption (itmkit search INDEX \"a red circle\") or --image ID, not both")
    if k < 1:
        raise ItmkitError(f"--k must be at least 1, got {k}")
    if shortlist is not None and shortlist < 1:
        raise ItmkitError(f"--shortlist must be at least 1, got {shortlist}")
    if shortlist is not None and rescore is None:
        raise ItmkitError("--shortlist N sets how many first-stage results are re-scored: give --rescore MODEL with it")
    idx = Index(index)
    manifest = idx.manifest
    dev = _device(device)
    second = None
    if rescore is not None:
        second = _checkpoint(check_recorded(manifest["model"], rescore, "--rescore", idx.folder), dev)
    if image is None:
        gallery = "images"
        idx.require("images", "a text query retrieves images")
        if not query.strip():
            raise ItmkitError("the query is empty: give a caption, e.g. \"a small red circle left of a blue square\"")
        recorded = manifest["first_stage"]
        if second is not None and recorded["sha256"] == manifest["model"]["sha256"]:
            first = second
        else:
            first = _checkpoint(check_recorded(recorded, first_stage, "the first stage", idx.folder), dev)
        words = tokenize(query)
        if not any(w in first.vocab for w in words):
            err.print(f"warning: no word of the query is in the first stage's vocabulary ({len(first.vocab)} words):"
                      " it reads as unknown words only, the ranking means little")
        vector = unit_vectors(encode_query_text(first, query, dev))[0]
        rescorer = second and (second.model, encode_query_text(second, query, dev), "text")
    else:
        gallery = "captions"
        idx.require("captions", "--image retrieves captions")
        idx.require("images", "--image reads the query image's vectors from the index")
        ids = idx.image_ids()
        if image not in ids:
            raise ItmkitError(f"--image {image!r} is not an image of index {index} ({len(ids)} images of split"
                              f" {manifest['split']!r}, e.g. {ids[0]!r})" + did_you_mean(image, ids[:100000]))
        row = ids.index(image)
        vector = idx.vectors("images")[row]
        rescorer = second and (second.model, idx.store("images").take([row]).to(dev), "image")
    depth = shortlist or max(k, 100)
    hits, seconds = run_search(idx, vector, gallery, k, shortlist=depth, rescorer=rescorer,
                               search_params=search_params, device=dev)
    ids = idx.image_ids()
    results = []
    if gallery == "images":
        for rank, hit in enumerate(hits, 1):
            picture = image_file(idx, ids[hit.position], hit.position)
            results.append({"rank": rank, "image_id": ids[hit.position], "first_stage_score": hit.first_score,
                            "second_stage_score": hit.second_score, "file": str(picture) if picture else None})
    else:
        captions, owners = idx.captions(), idx.caption_images()
        for rank, hit in enumerate(hits, 1):
            results.append({"rank": rank, "caption": captions[hit.position], "caption_index": hit.position,
                            "image_id": ids[owners[hit.position]], "of_query_image": bool(owners[hit.position] == row),
                            "first_stage_score": hit.first_score, "second_stage_score": hit.second_score})
    if as_json:
        print(json.dumps({"index": str(index), "query": query, "image": image, "gallery": gallery, "k": k,
                          "rescored_by": str(rescore) if rescore else None, "shortlist": depth if rescore else None,
                          "results": results, "seconds": seconds}))
        return
    title = (f"{gallery} for {query!r}" if image is None else f"captions for image {image}") + f" ({index})"
    table = Table(title=title)
    table.add_column("rank", justify="right")
    table.add_column("image id" if gallery == "images" else "caption")
    if gallery == "captions":
        table.add_column("of image")
    table.add_column("first stage", justify="right")
    if rescore:
        table.add_column("re-scored", justify="right")
    if gallery == "images":
        table.add_column("file")
    for r in results:
        row_cells = [str(r["rank"]), r["image_id"] if gallery == "images" else r["caption"]]
        if gallery == "captions":
            row_cells.append(r["image_id"] + (" ✓" if r["of_query_image"] else ""))
        row_cells.append(f"{r['first_stage_score']:.4f}")
        if rescore:
            row_cells.append(f"{r['second_stage_score']:.4f}")
        if gallery == "images":
            row_cells.append(r["file"] or "")
        table.add_row(*row_cells)
    console.print(table)
    timing = ", ".join(f"{stage.replace('_', ' ')} {1000 * s:.1f} ms" for stage, s in seconds.items())
    console.print(f"{timing}" + (f"; re-scored the first {depth} by {rescore}" if rescore else ""))
