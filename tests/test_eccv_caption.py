"""``itmkit eval --protocol eccv-caption``: ECCV Caption and CxC metrics through the eccv-caption package.

The package's ``Metrics`` evaluates every query it annotates (all 5000 test images and 24972 captions for
CxC), so a matrix it can score is the whole 5000 x 25000 one: built once per module (500 MB of float32).
Smaller crafted matrices check the ranked lists against the package's own metric functions on a subset.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from cliutil import assert_clean_failure, flat, invoke
from itmkit import eccv
from itmkit.errors import DataError, ItmkitError
from itmkit.evaluation import protocol_metrics, protocol_problem

N, K = eccv.NUM_IMAGES, eccv.CAPTIONS_PER_IMAGE


def reference_lists(sims, image_ids, caption_ids, depth):
    """Ranked lists the obvious way: a full stable sort of each row and each column, cut at ``depth``."""
    i2t = {int(image_ids[i]): caption_ids[np.argsort(-sims[i].astype(np.float64), kind="stable")[:depth]].tolist()
           for i in range(sims.shape[0])}
    t2i = {int(caption_ids[j]): image_ids[np.argsort(-sims[:, j].astype(np.float64), kind="stable")[:depth]].tolist()
           for j in range(sims.shape[1])}
    return i2t, t2i


def informative(rng, n_images, dtype=np.float32):
    """Noise, with each image's own 5 captions (columns 5i..5i+4) raised: recalls well above chance."""
    sims = rng.standard_normal((n_images, K * n_images), dtype=np.float32)
    rows = np.arange(n_images)
    sims.reshape(n_images, n_images, K)[rows, rows] += 2.5
    return sims.astype(dtype)


# ----------------------------------------------------------------------------- ranked lists


def test_top_is_the_stable_descending_sort_ties_included():
    rng = np.random.default_rng(0)
    for trial in range(40):
        rows = rng.integers(0, 3, (6, 25)) if trial % 2 else rng.standard_normal((6, 25))
        for depth in (1, 2, 5, 24, 25, 40):
            assert np.array_equal(eccv._top(rows, depth), np.argsort(-rows.astype(float), axis=1, kind="stable")[:, :depth])


def test_lists_on_a_crafted_subset_equal_the_packages_functions_on_full_lists():
    """Rows: 300 real test images that ECCV annotates, columns: their 1500 captions. The package's own
    compute_eccv_metrics / compute_r_at_k on our cut lists equal those on full, obviously sorted lists."""
    m = eccv.package()  # first: it imports the package quietly (no ujson warning)
    from eccv_caption._metrics import compute_eccv_metrics, compute_r_at_k

    images, captions_of = eccv.test_layout()
    annotated = [i for i in images.tolist() if i in m.eccv_gts["i2t"]][:300]
    image_ids = np.array(annotated, dtype=np.int64)
    caption_ids = np.concatenate([captions_of[i] for i in annotated])
    sims = informative(np.random.default_rng(1), len(annotated))
    sims[:, ::7] = np.round(sims[:, ::7])  # ties, also across the cut-off
    depth_i2t, depth_t2i = eccv.list_depths()
    ours = eccv.retrieved_items(sims, image_ids, caption_ids, depth_i2t, depth_t2i)
    full = reference_lists(sims, image_ids, caption_ids, None)
    for d, (mine, theirs) in enumerate(zip(ours, full)):
        direction = ("i2t", "t2i")[d]
        queries = set(mine)
        eccv_gts = {q: v for q, v in m.eccv_gts[direction].items() if q in queries}
        cxc_gts = {q: v for q, v in m.cxc_gts[direction].items() if q in queries}
        assert len(eccv_gts) > 50 and len(cxc_gts) > 250
        assert compute_eccv_metrics(mine, eccv_gts) == compute_eccv_metrics(theirs, eccv_gts)
        assert 0 < compute_eccv_metrics(mine, eccv_gts)["eccv_r1"] < 1
        for k in eccv.RECALL_KS:
            assert compute_r_at_k(mine, cxc_gts, K=k) == compute_r_at_k(theirs, cxc_gts, K=k)


# ------------------------------------------------------------------------ the whole 5K matrix


@pytest.fixture(scope="module")
def coco5k(tmp_path_factory):
    """A 5000 x 25000 informative matrix whose rows are the test images in a shuffled order, its ids file."""
    rng = np.random.default_rng(2)
    images, _ = eccv.test_layout()
    order = rng.permutation(N)
    sims = informative(rng, N)
    folder = tmp_path_factory.mktemp("coco5k")
    np.save(folder / "sims.npy", sims)
    (folder / "testall_ids.txt").write_text("".join(f"{i}\n" for i in images[order]))
    return sims, images[order], folder


def test_metrics_equal_the_package_called_directly_on_full_sorts(coco5k):
    sims, image_ids, _ = coco5k
    ours = eccv.eccv_caption_metrics(sims, image_ids)
    assert tuple(ours) == eccv.METRIC_KEYS
    _, captions_of = eccv.test_layout()
    caption_ids = np.concatenate([captions_of[int(i)] for i in image_ids])
    i2t, t2i = reference_lists(sims, image_ids, caption_ids, 100)
    m = eccv.package()
    items = {"i2t": i2t, "t2i": t2i}
    expected = m.eccv_metrics(items, "all")
    for k in eccv.RECALL_KS:
        expected[f"cxc_r{k}"] = m.cxc_recalls(items, "all", K=k)
    for d in ("i2t", "t2i"):
        for name in (*eccv.ECCV_METRICS, "cxc_r1", "cxc_r5", "cxc_r10"):
            assert ours[f"{d}_{name}"] == 100.0 * expected[name][d], (d, name)
    assert 5 < ours["i2t_cxc_r1"] < 95 and 1 < ours["t2i_eccv_map_at_r"] < 95  # not a trivial 0 or 100
    # The id mapping, checked against itmkit's own COCO 5K recalls: the package's original COCO labels, read
    # through our ids, rank exactly as the matrix's caption grouping does.
    plain = protocol_metrics(sims, "coco-5k")
    for k in eccv.RECALL_KS:
        coco = m.coco_5k_recalls(items, "all", K=k)
        assert 100.0 * coco["i2t"] == pytest.approx(plain[f"i2t_r{k}"]) and 100.0 * coco["t2i"] == pytest.approx(plain[f"t2i_r{k}"])


def test_cli_json_and_table_for_a_saved_matrix(coco5k):
    sims, image_ids, folder = coco5k
    result = invoke("eval", "--sims", str(folder / "sims.npy"), "--protocol", "eccv-caption",
                    "--ids", str(folder / "testall_ids.txt"), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == eccv.eccv_caption_metrics(sims, image_ids)
    assert "it/s" not in result.stderr  # the package's progress bar stays off the terminal
    table = invoke("eval", "--sims", str(folder / "sims.npy"), "--protocol", "eccv-caption",
                   "--ids", str(folder / "testall_ids.txt"))
    assert table.returncode == 0, table.stderr
    assert "ECCV mAP@R" in table.stdout and "CxC R@10" in table.stdout


def test_caption_ids_given_in_another_order_follow_their_columns(coco5k, tmp_path):
    """A --caption-ids file reorders what column j means: permuting both the file and the columns within
    each image gives the same metrics."""
    sims, image_ids, folder = coco5k
    _, captions_of = eccv.test_layout()
    caption_ids = np.concatenate([captions_of[int(i)] for i in image_ids])
    within = np.argsort(np.random.default_rng(3).random((N, K)), axis=1) + K * np.arange(N)[:, None]
    perm = within.reshape(-1)
    (tmp_path / "capids.txt").write_text("".join(f"{c}\n" for c in caption_ids[perm]))
    np.save(tmp_path / "sims.npy", sims[:, perm])
    result = invoke("eval", "--sims", str(tmp_path / "sims.npy"), "--protocol", "eccv-caption", "--json",
                    "--ids", str(folder / "testall_ids.txt"), "--caption-ids", str(tmp_path / "capids.txt"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == eccv.eccv_caption_metrics(sims, image_ids)


# ----------------------------------------------------------------------------------- the ids


def test_ids_one_per_caption_are_read_as_one_per_image(tmp_path):
    images, _ = eccv.test_layout()
    (tmp_path / "ids.txt").write_text("".join(f"{i}\n" for i in np.repeat(images, K)))
    assert np.array_equal(eccv.read_image_ids(tmp_path / "ids.txt"), images)
    lines = np.repeat(images, K)
    lines[7] = images[0]
    (tmp_path / "ids.txt").write_text("".join(f"{i}\n" for i in lines))
    with pytest.raises(DataError, match=r"lines 6\.\.10 \(image 1\) differ"):
        eccv.read_image_ids(tmp_path / "ids.txt")


def test_missing_or_short_ids_say_what_is_expected(tmp_path):
    with pytest.raises(DataError, match=r"testall_ids.txt is missing; expected .*one COCO image id per line"):
        eccv.data_ids(tmp_path, "testall")
    (tmp_path / "testall_ids.txt").write_text("1\n2\n")
    with pytest.raises(DataError, match=r"has 2 lines for 5000 images"):
        eccv.data_ids(tmp_path, "testall")
    with pytest.raises(DataError, match="not such a folder: pass --ids"):
        eccv.data_ids(tmp_path / "data.h5", "testall")


def test_ids_that_are_not_the_5k_test_images_are_refused():
    images, _ = eccv.test_layout()
    wrong = images.copy()
    wrong[3] = 9  # not a COCO test image
    with pytest.raises(DataError, match=r"1 of 5000 ids are not images of the COCO 5K test split .*\[9\]"):
        eccv.split_ids(wrong)
    twice = images.copy()
    twice[3] = images[4]
    with pytest.raises(DataError, match=rf"4999 distinct test images in 5000 ids \(repeated: \[{images[4]}\]\)"):
        eccv.split_ids(twice)
    with pytest.raises(DataError, match="4999 distinct"):
        eccv.split_ids(images[:-1])


def test_caption_ids_must_belong_to_their_rows_image():
    images, captions_of = eccv.test_layout()
    caption_ids = np.concatenate([captions_of[int(i)] for i in images])
    swapped = caption_ids.copy()
    swapped[[0, 5]] = swapped[[5, 0]]
    with pytest.raises(DataError, match=rf"line 1 holds {caption_ids[5]}, which is not a COCO caption of image {images[0]}"):
        eccv.split_ids(images, swapped)
    with pytest.raises(DataError, match="24999 ids for 25000 captions"):
        eccv.split_ids(images, caption_ids[:-1])


def test_the_package_order_groups_each_images_five_captions():
    """What the default caption ids rest on: the package's 25000 ids are 5 per image, consecutive, in the
    order of its 5000 images, and each is a caption of that image in the COCO annotations."""
    m = eccv.package()
    images, captions_of = eccv.test_layout()
    assert len(set(images.tolist())) == N and images[0] == 391895  # Karpathy's first test image
    flat_ids = np.concatenate([captions_of[int(i)] for i in images])
    assert np.array_equal(flat_ids, np.asarray(m.coco_ids))
    assert all(m.coco_gts["t2i"][int(c)] == [int(i)] for c, i in zip(flat_ids, np.repeat(images, K)))


# ------------------------------------------------------------------------------- the command


def test_the_protocol_is_listed_and_checked_like_the_others():
    help_text = flat(invoke("eval", "--help").stdout)
    assert "eccv-caption" in help_text and "--ids" in help_text and "--caption-ids" in help_text
    assert protocol_problem("eccv-caption", N) is None
    assert "5000-image COCO test split" in protocol_problem("eccv-caption", 1000)
    with pytest.raises(ItmkitError, match="reads COCO ids"):
        protocol_metrics(np.zeros((N, K * N), np.float32), "eccv-caption")


@pytest.mark.parametrize("args, message", [
    (("--protocol", "eccv-caption"), "needs --ids FILE: a saved matrix carries no ids"),
    (("--ids", "ids.txt"), "--ids gives the COCO ids of the eccv-caption protocol"),
    (("--protocol", "coco-5k", "--caption-ids", "c.txt"), "--caption-ids gives the COCO ids"),
    (("--protocol", "eccv-caption", "--ids", "ids.txt", "--rerank", "mtfn-rr"), "--rerank cannot go with"),
    (("--protocol", "eccv-caption", "--ids", "ids.txt"), "needs the COCO 5K test split: a 5000 x 25000 matrix"),
    (("--protocol", "eccv-caption", "--ids", "nothere.txt"), "nothere.txt is missing; expected"),
])
def test_bad_combinations_are_one_clear_error(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "sims.npy", np.zeros((4, 20), np.float32))
    (tmp_path / "ids.txt").write_text("1\n2\n3\n4\n")
    # the matrix is the wrong size, so the ids file's length is the first thing wrong with nothere.txt only
    if "nothere.txt" in args:
        np.save(tmp_path / "sims.npy", np.zeros((N, K * N), np.float16))
    assert message in assert_clean_failure(invoke("eval", "--sims", "sims.npy", *args))


def test_a_checkpoint_reads_the_ids_beside_its_split_before_scoring(tmp_path):
    from itmkit.data.precomp import write_split
    from tinydata import captions, train_tiny, write_tiny

    data = write_tiny(tmp_path / "data")
    run = train_tiny(tmp_path, data)
    rng = np.random.default_rng(4)
    write_split(data, "testall", features=rng.standard_normal((N, 3, 8)).astype(np.float32),
                captions=captions(N, rng))
    checkpoint = str(run / "model_best.safetensors")
    args = ("eval", checkpoint, "--split", "testall", "--protocol", "eccv-caption", "--device", "cpu")
    message = assert_clean_failure(invoke(*args))
    assert "testall_ids.txt is missing" in message and "SCAN's COCO layout" in message
    # SCAN's ids, here one line per caption: the checkpoint's matrix is scored as a saved one would be
    images, _ = eccv.test_layout()
    (data / "testall_ids.txt").write_text("".join(f"{i}\n" for i in np.repeat(images[::-1], K)))
    result = invoke(*args, "--json", "--save-sims", str(tmp_path / "sims.npy"))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == eccv.eccv_caption_metrics(np.load(tmp_path / "sims.npy"), images[::-1])
    small = assert_clean_failure(invoke("eval", checkpoint, "--split", "test", "--protocol", "eccv-caption",
                                        "--device", "cpu"))
    assert "5000-image COCO test split" in small
