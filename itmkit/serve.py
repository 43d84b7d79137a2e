"""``itmkit serve``: a local retrieval page over one split, with each result's attention drawn on its picture.

Flask for the routes (a well-kept framework: routing, JSON, errors), waitress to serve them (a
production WSGI server in pure Python, where Flask's own server is for development). The page asks
the JSON routes; the model runs behind one lock, a query at a time.

What the page can send is a caption (at most MAX_QUERY_CHARS), an image's row in the split and a
result count; nothing names a file: pictures are found on the server from the row.

Two ways to rank, the same answers:

- without an index, the whole split is encoded once at start (the scoring engine's galleries) and a
  query is scored against every image (a caption) or every caption (an image), block by block;
- with ``--index`` (``itmkit index build``), the index's first stage shortlists and the model
  re-scores the shortlist from the index's stored encodings: for galleries too large to score whole.
"""

from __future__ import annotations

import errno
import functools
import importlib.util
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import torch
import typer

from itmkit.build import Encoded
from itmkit.errors import ItmkitError

MAX_QUERY_CHARS = 300
MAX_RESULTS = 50
DEFAULT_RESULTS = 10
DEFAULT_SHORTLIST = 100
PICTURES_KEPT = 256  # decoded pictures held for the page's requests
PAGE = Path(__file__).with_name("web") / "retrieval.html"


class FullScoring:
    """Rank by scoring the query against the whole split (encoded once, at start)."""

    def __init__(self, model, vocab, split, device, progress=None):
        from itmkit.data.loader import caption_batches, image_batches
        from itmkit.scoring import encode_images, encode_texts

        batch = model.recipe.train.eval_batch_size
        self.model, self.vocab, self.device = model, vocab, device
        self.images = encode_images(model, image_batches(split, batch_size=batch), device, progress)
        self.captions = encode_texts(model, caption_batches(split, vocab, batch_size=batch, by_length=True), device,
                                     progress)

    def images_for(self, text: str, query: Encoded) -> tuple[np.ndarray, np.ndarray]:
        """(rows, scores) of every image for a caption (``query``: its encoding), best first."""
        from itmkit.scoring import score_all

        scores = score_all(self.model, self.images, query, device=self.device)[0][:, 0]
        return _best_first(np.arange(len(scores)), scores)

    def captions_for(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(caption rows, scores) of every caption for image ``row``, best first."""
        from itmkit.scoring import score_all

        scores = score_all(self.model, self.images.block(row, row + 1), self.captions, device=self.device)[0][0]
        return _best_first(np.arange(len(scores)), scores)


class IndexScoring:
    """Rank through an index: its first stage shortlists, the model re-scores the shortlist."""

    def __init__(self, index, model, first, device, shortlist: int = DEFAULT_SHORTLIST):
        self.index, self.model, self.first, self.device, self.shortlist = index, model, first, device, shortlist

    def images_for(self, text: str, query: Encoded) -> tuple[np.ndarray, np.ndarray]:
        """(rows, scores) of the shortlist's images for a caption, re-scored by the model, best first."""
        from itmkit.index import encode_query_text, search
        from itmkit.twostage import unit_vectors

        vector = unit_vectors(encode_query_text(self.first, text, self.device))[0]
        hits, _ = search(self.index, vector, "images", self.shortlist, shortlist=self.shortlist,
                         rescorer=(self.model, query, "text"), device=self.device)
        return np.array([h.position for h in hits]), np.array([h.second_score for h in hits])

    def captions_for(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(caption rows, scores) of the shortlist's captions for image ``row``, re-scored, best first."""
        from itmkit.index import search

        vector = self.index.vectors("images")[row]
        query = self.index.store("images").take([row]).to(self.device)
        hits, _ = search(self.index, vector, "captions", self.shortlist, shortlist=self.shortlist,
                         rescorer=(self.model, query, "image"), device=self.device)
        return np.array([h.position for h in hits]), np.array([h.second_score for h in hits])


def _best_first(rows: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores, kind="stable")  # ties keep the split's order, as the metrics do
    return rows[order], scores[order]


class Retrieval:
    """What the page needs: ranked images for a caption, ranked captions for an image, pictures, overlays."""

    def __init__(self, checkpoint, split, data_dir: Path, image_ids: list[str], device, ranker):
        self.checkpoint, self.model, self.vocab = checkpoint, checkpoint.model, checkpoint.vocab
        self.split, self.data_dir, self.image_ids, self.device = split, data_dir, image_ids, device
        self.ranker = ranker
        self.lock = threading.Lock()  # one model call at a time: waitress answers on several threads
        # the pictures last shown, kept (the built-in data draws them): a bounded number, whatever the gallery
        self.picture = functools.lru_cache(maxsize=PICTURES_KEPT)(self._find_picture)
        self.attends = self._attends()

    def _attends(self) -> bool:
        """Whether the model reports cross-attention (tried once, on the split's first image and caption)."""
        from itmkit.explain import explain_row

        return bool(explain_row(self.model, self.vocab, self.split, 0, self.split.captions[0], device=self.device).maps)

    def overlays(self) -> bool:
        """Whether results can show the caption's attention over their pictures (pixel boxes and a model that attends)."""
        return self.attends and self.split.box_layout == "xyxy"

    def search(self, text: str, k: int) -> list[dict]:
        from itmkit.index import encode_query_text

        with self.lock, torch.no_grad():
            query = encode_query_text(self.checkpoint, text, self.device)
            rows, scores = self.ranker.images_for(text, query)
        hits = []
        for rank, (row, score) in enumerate(zip(rows[:k].tolist(), scores[:k].tolist()), 1):
            picture = self.picture(row) is not None
            hits.append({"rank": rank, "row": row, "image_id": self.image_ids[row], "score": score,
                         "picture": picture, "overlay": picture and self.overlays()})
        return hits

    def captions(self, row: int, k: int) -> list[dict]:
        with self.lock, torch.no_grad():
            rows, scores = self.ranker.captions_for(row)
        owners = self.split.caption_images
        return [{"rank": r + 1, "row": int(c), "caption": self.split.captions[c], "score": float(s),
                 "of_image": bool(owners[c] == row)} for r, (c, s) in enumerate(zip(rows[:k], scores[:k]))]

    def _find_picture(self, row: int):
        """The PIL picture of image ``row``, or None (``picture``, the cached call, is what callers use)."""
        from itmkit.pictures import find_picture

        return find_picture(self.data_dir, self.split.name, row, self.image_ids[row])

    def overlay(self, row: int, text: str) -> bytes | None:
        """PNG: the picture with the caption's attention over its boxes (the words' mean); None without a picture
        or when the model does not attend (``overlays``)."""
        from itmkit.explain import explain_row
        from itmkit.pictures import caption_heat_png, split_pixel_boxes

        picture = self.picture(row)
        if picture is None or not self.overlays():
            return None
        with self.lock:
            result = explain_row(self.model, self.vocab, self.split, row, text, device=self.device)
        weights = result.maps[result.default_map()].weights[result.words()].mean(axis=0)
        return caption_heat_png(picture, split_pixel_boxes(self.split, row, picture), weights)


# ------------------------------------------------------------------------------------ the app


def create_app(retrieval: Retrieval, *, title: str = "itmkit"):
    """The Flask app: the page, /api/search, /api/images/ROW/captions, /pictures/ROW.png, /overlays/ROW.png."""
    import io

    from flask import Flask, abort, jsonify, request, send_file

    from itmkit.explain import unknown_words

    app = Flask("itmkit.serve")
    app.config["MAX_CONTENT_LENGTH"] = 4096  # the page sends queries in the URL; no request needs a body
    html = (PAGE.read_text(encoding="utf-8").replace("{{TITLE}}", _html_escape(title))
            .replace("{{MAX_QUERY_CHARS}}", str(MAX_QUERY_CHARS)))

    def query_text() -> str:
        text = request.args.get("q", "")
        if len(text) > MAX_QUERY_CHARS:
            abort(400, f"the query is {len(text)} characters long; at most {MAX_QUERY_CHARS}")
        if not text.strip():
            abort(400, "the query is empty: type a caption, e.g. 'a small red circle left of a blue square'")
        return text

    def count() -> int:
        k = request.args.get("k", str(DEFAULT_RESULTS))
        if not (k.isascii() and k.isdigit() and 1 <= int(k) <= MAX_RESULTS):
            abort(400, f"k must be a whole number from 1 to {MAX_RESULTS}, got {k[:20]!r}")
        return int(k)

    def image_row(row: int) -> int:
        if not 0 <= row < len(retrieval.image_ids):
            abort(404, f"no image {row}: the split has images 0 to {len(retrieval.image_ids) - 1}")
        return row

    def png(payload: bytes | None):
        if payload is None:
            abort(404, "this image has no picture")
        return send_file(io.BytesIO(payload), mimetype="image/png", max_age=3600)

    @app.get("/")
    def page():
        return html

    @app.get("/api/search")
    def search():
        text, k = query_text(), count()
        return jsonify({"query": text, "results": retrieval.search(text, k), "attention": retrieval.attends,
                        "unknown_words": unknown_words(retrieval.vocab, text)})

    @app.get("/api/images/<int(signed=True):row>/captions")
    def captions(row: int):
        row, k = image_row(row), count()
        return jsonify({"row": row, "image_id": retrieval.image_ids[row], "captions": retrieval.captions(row, k)})

    @app.get("/pictures/<int(signed=True):row>.png")
    def picture(row: int):
        found = retrieval.picture(image_row(row))
        if found is None:
            return png(None)
        buffer = io.BytesIO()
        found.save(buffer, format="PNG")
        return png(buffer.getvalue())

    @app.get("/overlays/<int(signed=True):row>.png")
    def overlay(row: int):
        row, text = image_row(row), query_text()
        if not retrieval.attends:
            abort(404, "this model has no cross-attention to draw (its pictures are at /pictures/ROW.png)")
        return png(retrieval.overlay(row, text))

    @app.errorhandler(400)
    @app.errorhandler(404)
    @app.errorhandler(405)
    @app.errorhandler(413)
    def error(exc):
        return jsonify({"error": exc.description}), exc.code

    return app


def _html_escape(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def check_host(host: str) -> None:
    """Refuse a host that is not an address or name this machine can listen on, before loading anything."""
    import socket

    try:
        socket.getaddrinfo(host, None)
    except socket.gaierror as exc:
        raise ItmkitError(f"--host {host!r}: not an address of this machine ({exc.strerror})") from None


# ------------------------------------------------------------------------------- the command


def register(app) -> None:
    app.command(name="serve")(serve)


def serve(
    checkpoint: Annotated[Path, typer.Argument(help="an itmkit checkpoint (.safetensors)")],
    data: Annotated[Optional[str], typer.Option(help="dataset folder (default: the recipe's \\[data].path)")] = None,
    split: Annotated[Optional[str], typer.Option(help="split to search (default: the recipe's test split)")] = None,
    index: Annotated[Optional[Path], typer.Option("--index", help="an index folder of this checkpoint and split"
                                                  " (itmkit index build): its first stage shortlists, the model"
                                                  " re-scores; without it the whole split is encoded at start")] = None,
    shortlist: Annotated[int, typer.Option(help="--index: first-stage results re-scored per query", min=1)] = DEFAULT_SHORTLIST,
    host: Annotated[str, typer.Option(help="address to listen on (127.0.0.1: this machine only)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port (0: any free one, printed)", min=0, max=65535)] = 8000,
    device: Annotated[str, typer.Option(help="'auto' (cuda if available), 'cpu', 'cuda', ...")] = "auto",
) -> None:
    """A local web page: type a caption, see the images ranked with their attention; click one for its captions."""
    from itmkit.cli import _device, err, out
    from itmkit.datasets import recorded_data_dir
    from itmkit.data.split import split_image_ids
    from itmkit.preflight import check_eval_data
    from itmkit.progress import make_progress, task
    from itmkit.retrieval_cli import _checkpoint

    missing = [name for name in ("flask", "waitress") if importlib.util.find_spec(name) is None]
    if missing:
        raise ItmkitError(f"itmkit serve needs Flask and waitress ({', '.join(missing)} not installed):"
                          " pip install 'itmkit[serve]'")
    import waitress

    check_host(host)
    dev = _device(device)
    model = _checkpoint(checkpoint, dev)
    recipe = model.model.recipe
    folder = recorded_data_dir(data, recipe.data.path, checkpoint, log=err.print)
    the_split = check_eval_data(folder, split or recipe.data.test_split, None, [(str(checkpoint), model.model)])
    image_ids = split_image_ids(folder, the_split, err.print)
    if index is not None:
        ranker = _index_ranker(index, model, the_split, shortlist, dev)
    else:
        with make_progress() as progress, task(progress, f"encode split {the_split.name!r}", None) as update:
            ranker = FullScoring(model.model, model.vocab, the_split, dev, lambda done, total: update(done, None))
    retrieval = Retrieval(model, the_split, folder, image_ids, dev, ranker)
    app = create_app(retrieval, title=f"itmkit: {recipe.info.name} on {folder.name}/{the_split.name}")
    # waitress warns whenever requests wait for a thread: a page's ten overlays do, one model call at a time
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    try:
        server = waitress.create_server(app, host=host, port=port, threads=4)
    except OSError as exc:
        hint = " (another program listens there: try another --port, or --port 0 for any free one)" \
            if exc.errno == errno.EADDRINUSE else " (not an address of this machine: try 127.0.0.1)" \
            if exc.errno == errno.EADDRNOTAVAIL else ""
        raise ItmkitError(f"cannot listen on {host} port {port}: {exc.strerror}{hint}") from None
    if host not in ("127.0.0.1", "localhost", "::1"):
        err.print(f"warning: --host {host}: the page is open to every machine that can reach this one")
    address = f"[{host}]" if ":" in host else host  # an IPv6 address in a URL is bracketed
    out.print(f"serving {checkpoint} on http://{address}:{server.effective_port}/ "
              f"({the_split.num_images} images, {the_split.num_captions} captions; Ctrl+C stops)", soft_wrap=True)
    sys.stdout.flush()
    signal.signal(signal.SIGTERM, _stop)  # a kill stops the server as Ctrl+C does
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


def _stop(signum, frame) -> None:
    raise KeyboardInterrupt


def _index_ranker(folder: Path, model, split, shortlist: int, device) -> IndexScoring:
    """The index at ``folder``, checked to be of this checkpoint and split, with its first stage loaded."""
    from itmkit.index import Index, check_recorded
    from itmkit.retrieval_cli import _checkpoint

    index = Index(folder)
    manifest = index.manifest
    check_recorded(manifest["model"], model.path, "MODEL", index.folder)
    for side in ("images", "captions"):
        index.require(side, "the page retrieves images for a caption and captions for an image")
    if manifest["split"] != split.name or manifest["num_images"] != split.num_images:
        raise ItmkitError(f"index {folder} holds split {manifest['split']!r} ({manifest['num_images']} images) of"
                          f" {manifest['data']}; the page shows split {split.name!r} ({split.num_images} images):"
                          " give the same --data and --split the index was built from")
    first = model if manifest["first_stage"]["sha256"] == model.sha256 else _checkpoint(
        check_recorded(manifest["first_stage"], None, "the first stage", index.folder), device)
    return IndexScoring(index, model.model, first, device, shortlist)
