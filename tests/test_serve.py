"""``itmkit serve``: the JSON routes rank as full scoring does (with and without an index), inputs are
limited, no path reaches the file system; and the page itself, driven in a real headless Chromium."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from itmkit.datasets import open_named_split
from itmkit.evaluate import similarity_matrix
from itmkit.data.split import split_image_ids
from itmkit.index import Index
from itmkit.retrieval_cli import _checkpoint
from itmkit.serve import MAX_QUERY_CHARS, FullScoring, IndexScoring, Retrieval, create_app

from cliutil import invoke
from test_index import make_checkpoints

# Chromium as Debian installs it (`make test` installs it when missing), else one named by ITMKIT_CHROMIUM.
CHROMIUM = os.environ.get("ITMKIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
# As root on a machine with no network: no sandbox, and none of Chromium's own connections.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def scored(tiny_scan, tiny_data):
    """The tiny trained SCAN over the tiny test split: its checkpoint, the split, the full score matrix."""
    checkpoint = _checkpoint(tiny_scan, "cpu")
    split = open_named_split(tiny_data, "test")
    sims, _ = similarity_matrix(checkpoint.model, checkpoint.vocab, split)
    return checkpoint, split, sims


@pytest.fixture(scope="module")
def client(scored, tiny_data):
    checkpoint, split, _ = scored
    ranker = FullScoring(checkpoint.model, checkpoint.vocab, split, "cpu")
    retrieval = Retrieval(checkpoint, split, tiny_data, split_image_ids(tiny_data, split, None), "cpu", ranker)
    return create_app(retrieval).test_client()


@pytest.mark.parametrize("caption", [0, 123, 499])
def test_search_ranks_images_as_full_scoring(client, scored, caption):
    _, split, sims = scored
    body = client.get("/api/search", query_string={"q": split.captions[caption], "k": 10}).get_json()
    rows = [r["row"] for r in body["results"]]
    assert rows == np.argsort(-sims[:, caption], kind="stable")[:10].tolist()
    np.testing.assert_allclose([r["score"] for r in body["results"]], sims[rows, caption], atol=1e-5)
    assert [r["image_id"] for r in body["results"]] == [f"shapes-test-{row:06d}" for row in rows]
    assert all(r["picture"] for r in body["results"])


def test_an_images_captions_rank_as_full_scoring(client, scored):
    _, split, sims = scored
    body = client.get("/api/images/17/captions", query_string={"k": 7}).get_json()
    rows = [c["row"] for c in body["captions"]]
    assert rows == np.argsort(-sims[17], kind="stable")[:7].tolist()
    assert [c["caption"] for c in body["captions"]] == [split.captions[r] for r in rows]
    assert [c["of_image"] for c in body["captions"]] == [r // 5 == 17 for r in rows]


def test_pictures_and_attention_overlays_are_pngs_of_the_image(client):
    plain = Image.open(io.BytesIO(client.get("/pictures/4.png").data))
    overlay = client.get("/overlays/4.png", query_string={"q": "a red circle"})
    assert overlay.mimetype == "image/png"
    drawn = Image.open(io.BytesIO(overlay.data))
    assert plain.size == drawn.size == (128, 128)
    assert np.abs(np.asarray(plain, dtype=int) - np.asarray(drawn, dtype=int)).max() > 30  # the heat is drawn


@pytest.mark.parametrize("url, code, message", [
    ("/api/search?q=", 400, "the query is empty"),
    ("/api/search?q=" + "a" * (MAX_QUERY_CHARS + 1), 400, f"at most {MAX_QUERY_CHARS}"),
    ("/api/search?q=red&k=0", 400, "k must be a whole number from 1 to 50"),
    ("/api/search?q=red&k=51", 400, "k must be a whole number from 1 to 50"),
    ("/api/search?q=red&k=abc", 400, "k must be a whole number from 1 to 50, got 'abc'"),
    ("/api/search?q=red&k=2.5", 400, "k must be a whole number from 1 to 50"),
    ("/api/images/100/captions", 404, "no image 100: the split has images 0 to 99"),
    ("/api/images/-1/captions", 404, "no image -1: the split has images 0 to 99"),
    ("/pictures/-1.png", 404, "no image -1"),
    ("/pictures/..%2F..%2Fetc%2Fpasswd", 404, ""),
    ("/pictures/%2Fetc%2Fpasswd.png", 404, ""),
    ("/overlays/3.png", 400, "the query is empty"),
])
def test_bad_requests_get_a_json_error_and_touch_no_file(client, url, code, message):
    response = client.get(url)
    assert response.status_code == code
    assert message in response.get_json()["error"]


def test_words_the_model_does_not_know_are_named(client):
    body = client.get("/api/search", query_string={"q": "a red zzqx circle"}).get_json()
    assert body["unknown_words"] == ["zzqx"] and len(body["results"]) == 10


def test_only_reads_are_allowed(client):
    assert client.post("/api/search?q=red").status_code == 405


def test_with_an_index_the_shortlist_rescored_ranks_as_full_scoring(tmp_path):
    folder, data = make_checkpoints(tmp_path)
    built = invoke("index", "build", str(folder / "scan.safetensors"), "--first-stage", str(folder / "vsepp.safetensors"),
                   "--data", str(data), "--split", "test", "-o", str(folder / "idx"), "--device", "cpu")
    assert built.returncode == 0, built.stderr
    model, first = _checkpoint(folder / "scan.safetensors", "cpu"), _checkpoint(folder / "vsepp.safetensors", "cpu")
    split = open_named_split(data, "test")
    sims, _ = similarity_matrix(model.model, model.vocab, split)
    ranker = IndexScoring(Index(folder / "idx"), model.model, first, "cpu", shortlist=150)  # the whole gallery
    client = create_app(Retrieval(model, split, data, split_image_ids(data, split, None), "cpu", ranker)).test_client()
    body = client.get("/api/search", query_string={"q": split.captions[42], "k": 30}).get_json()
    assert [r["row"] for r in body["results"]] == np.argsort(-sims[:, 42], kind="stable").tolist()
    captions = client.get("/api/images/5/captions", query_string={"k": 50}).get_json()["captions"]
    assert [c["row"] for c in captions] == np.argsort(-sims[5], kind="stable")[:50].tolist()


def test_a_model_without_attention_shows_plain_pictures(tiny_data, tmp_path):
    from itmkit.build import DataPorts, build_model
    from itmkit.checkpoint import save_checkpoint
    from itmkit.data.vocab import Vocabulary
    from itmkit.recipe import parse_recipe

    from conftest import TINY_RECIPE

    split = open_named_split(tiny_data, "test")
    vocab = Vocabulary.load(tiny_data / "vocab.json")
    model = build_model(parse_recipe(TINY_RECIPE.replace("DATA", str(tiny_data))),
                        DataPorts(split.feature_dim, len(vocab), split.num_regions), seed=0)
    save_checkpoint(tmp_path / "vsepp.safetensors", model, vocab)
    checkpoint = _checkpoint(tmp_path / "vsepp.safetensors", "cpu")
    retrieval = Retrieval(checkpoint, split, tiny_data, split_image_ids(tiny_data, split, None), "cpu",
                          FullScoring(checkpoint.model, checkpoint.vocab, split, "cpu"))
    client = create_app(retrieval).test_client()
    body = client.get("/api/search", query_string={"q": "a red circle", "k": 3}).get_json()
    assert body["attention"] is False
    assert all(r["picture"] and not r["overlay"] for r in body["results"])
    assert client.get("/pictures/0.png").status_code == 200
    overlay = client.get("/overlays/0.png", query_string={"q": "a red circle"})
    assert overlay.status_code == 404 and "no cross-attention" in overlay.get_json()["error"]


def test_the_command_refuses_what_it_cannot_serve(tiny_scan, tiny_data, tmp_path):
    import socket

    bad_host = invoke("serve", str(tiny_scan), "--data", str(tiny_data), "--host", "no-such-host.invalid")
    assert bad_host.returncode == 1 and "--host 'no-such-host.invalid'" in bad_host.stderr
    no_index = invoke("serve", str(tiny_scan), "--data", str(tiny_data), "--index", str(tmp_path))
    assert no_index.returncode == 1 and "is not an itmkit index" in no_index.stderr
    with socket.socket() as taken:  # a port another program listens on
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = invoke("serve", str(tiny_scan), "--data", str(tiny_data), "--port", str(port), "--device", "cpu")
    assert busy.returncode == 1 and f"cannot listen on 127.0.0.1 port {port}" in busy.stderr
    assert "another program listens there" in busy.stderr and "internal error" not in busy.stderr


# ------------------------------------------------------------------------------ in a real browser


@pytest.fixture
def server(tiny_scan, tiny_data, tmp_path):
    """``itmkit serve`` in its own process on a free localhost port; stopped after the test."""
    log = open(tmp_path / "serve.err", "w")
    process = subprocess.Popen([sys.executable, "-m", "itmkit", "serve", str(tiny_scan), "--data", str(tiny_data),
                                "--port", "0", "--device", "cpu"], stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = process.stdout.readline()  # "serving ... on http://127.0.0.1:PORT/ ...", once it listens
        assert "serving" in line, f"itmkit serve did not start: {line!r} {(tmp_path / 'serve.err').read_text()}"
        yield line.split(" on ", 1)[1].split()[0]
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
    assert process.returncode is not None


def browser_page(playwright):
    if CHROMIUM is None:
        pytest.skip("NO BROWSER: the web page's browser test did not run. Install Chromium (Debian: apt-get install"
                    " chromium, which `make test` does) or set ITMKIT_CHROMIUM to a Chromium executable")
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    return browser, browser.new_page(viewport={"width": 1400, "height": 900})


def test_the_page_finds_the_image_of_a_caption_and_lists_its_captions(server, scored, tmp_path):
    from playwright.sync_api import sync_playwright

    _, split, sims = scored
    # a caption of the test split whose own image the model ranks in its top 5
    caption = next(c for c in range(split.num_captions) if c // 5 in np.argsort(-sims[:, c], kind="stable")[:5])
    expected = f"shapes-test-{caption // 5:06d}"
    with sync_playwright() as p:
        browser, page = browser_page(p)
        try:
            page.goto(server)
            page.fill("#query", split.captions[caption])
            page.press("#query", "Enter")
            page.wait_for_selector(".result >> nth=9", timeout=30_000)
            top5 = page.eval_on_selector_all(".result", "cards => cards.slice(0, 5).map(c => c.dataset.imageId)")
            assert expected in top5
            page.wait_for_function("[...document.querySelectorAll('.result img')].every(i => i.complete"
                                   " && i.naturalWidth === 128)", timeout=30_000)  # every overlay drawn
            page.click(f".result[data-image-id='{expected}']")
            page.wait_for_selector("#caption-list li >> nth=9", timeout=30_000)
            assert page.inner_text("#captions-title") == f"Best captions for {expected}"
            listed = page.eval_on_selector_all("#caption-list li", "items => items.map(i => i.firstChild.textContent)")
            best = np.argsort(-sims[caption // 5], kind="stable")[:10]
            assert [text.strip() for text in listed] == [split.captions[c].strip() for c in best]
            shot = tmp_path / "page.png"
            page.screenshot(path=str(shot), full_page=True)
            assert Image.open(shot).width == 1400
            # the input's maxlength stops typing at 300 characters; a script can still send more: refused
            assert page.get_attribute("#query", "maxlength") == str(MAX_QUERY_CHARS)
            page.evaluate("text => search(text)", "a" * (MAX_QUERY_CHARS + 5))
            page.wait_for_selector("#status.error", timeout=30_000)
            assert f"at most {MAX_QUERY_CHARS}" in page.inner_text("#status")
        finally:
            browser.close()
