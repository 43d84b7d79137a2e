"""DP-RNN's recipes: the paper's configuration, the three-phase schedule, and a trained pair of models
through the scoring engine and the ensemble."""

from __future__ import annotations

import sys
from pathlib import Path

import attrs
import numpy as np
import pytest
import torch

from itmkit.build import DataPorts, build_model
from itmkit.phases import resolve_schedule
from itmkit.recipe import load_recipe
from itmkit.testing import recipe_plugins
from itmkit.types import Regions, Tokens

ROOT = Path(__file__).parents[3]
# DP-RNN's own recipes (cross-paper ones such as dprnn_scan.toml also name other plugins' stages)
RECIPES = sorted(p for p in (ROOT / "recipes").glob("dprnn_*.toml") if recipe_plugins(p) == {"dprnn"})
TOL = dict(rtol=0, atol=1e-5)


def test_there_are_seven_recipes():
    assert [p.stem for p in RECIPES] == ["dprnn_coco_object", "dprnn_coco_word", "dprnn_f30k_object",
                                         "dprnn_f30k_word", "dprnn_shapes_macm", "dprnn_shapes_object",
                                         "dprnn_shapes_word"]


MODELS = [p for p in RECIPES if p.stem != "dprnn_shapes_macm"]


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.stem)
def test_every_recipe_builds_with_its_three_phases(path):
    recipe = load_recipe(path)
    model = build_model(recipe, DataPorts(256 if "shapes" in path.stem else 2048, 100, 36))
    match = model.branches[0].stages[0]
    assert match.orientation == path.stem.split("_")[-1]
    schedule = resolve_schedule(model)
    first, rnn, rest = schedule.phases
    assert first.off == {"match[0].similarity.recurrent"} and (first.first, first.stop) == (0, 1)
    assert rnn.trained and all(n.startswith("branches.0.stages.0.object_rnn.") for n in rnn.trained)
    assert rnn.trained == {n for n, _ in match.object_rnn.named_parameters(prefix="branches.0.stages.0.object_rnn")}
    assert rest.trained == schedule.trainable and rest.stop is None and not rest.off
    schedule.apply(model, 0)
    assert not bool(match.recurrent)
    schedule.apply(model, 1)
    assert bool(match.recurrent) and not model.text.training and match.object_rnn.training
    assert not any(p.requires_grad for p in model.image.parameters())


def test_the_multi_att_ablation_runs_macm_alone_on_every_pair():
    r = load_recipe(ROOT / "recipes" / "dprnn_shapes_macm.toml")
    word = load_recipe(ROOT / "recipes" / "dprnn_shapes_word.toml")
    m = r.match[0].similarity.spec
    assert not m.recurrent and m.preselect_train == 0 and not r.phases
    assert attrs.evolve(m, recurrent=True, preselect_train=10) == word.match[0].similarity.spec
    assert (r.train, r.image, r.text, r.loss, r.data) == (word.train, word.image, word.text, word.loss, word.data)
    model = build_model(r, DataPorts(256, 100, 36))
    assert not bool(model.branches[0].stages[0].recurrent)


@pytest.mark.parametrize("path", [p for p in RECIPES if "shapes" not in p.stem], ids=lambda p: p.stem)
def test_the_paper_recipes_have_the_paper_configuration(path):
    r = load_recipe(path)
    coco = "coco" in path.stem
    assert r.info.embed_dim == 1024 and r.text.encoder.spec.word_dim == 300
    assert r.image.encoder.spec.position
    m = r.match[0].similarity.spec
    assert (m.lambda_object, m.lambda_word, m.beta_word, m.clip, m.preselect_train, m.preselect) == (9.0, 4.0, 0.3,
                                                                                                      "relu", 10, 0)
    assert m.beta_object == (0.0 if coco else 0.3)
    assert (r.loss.spec.margin, r.loss.spec.max_violation, r.loss.spec.warmup_epochs) == (0.2, True, 0)
    t = r.train
    assert (t.batch_size, t.lr, t.lr_update, t.lr_decay, t.optimizer, t.grad_clip) == (
        128, 5e-4 if coco else 2e-4, 10, 0.1, "adam", 2.0)
    assert t.epochs == (20 if coco else 30)
    assert r.data.protocol == ("coco-1k-5fold" if coco else "f30k-1k")
    assert [p.epochs for p in r.phases[:2]] == [1, 1]


def scores_alone(checkpoint: Path, data: Path, split: str = "test"):
    """The scoring engine's matrix against each caption scored alone (with the images' boxes) on its own."""
    from itmkit.checkpoint import load_checkpoint
    from itmkit.data.split import open_split
    from itmkit.evaluate import similarity_matrix

    loaded = load_checkpoint(checkpoint)
    model, vocab = loaded.model.eval(), loaded.vocab
    s = open_split(data, split)
    sims, _ = similarity_matrix(model, vocab, s, batch_size=3)
    rows = np.arange(s.num_images)
    with torch.no_grad():
        images = model.encode_images(Regions(torch.as_tensor(s.image_features(rows)),
                                             torch.as_tensor(s.region_lengths(rows)),
                                             torch.as_tensor(np.array(s.boxes, dtype=np.float32)),
                                             torch.as_tensor(np.array(s.image_sizes))))
        alone = np.zeros_like(sims)
        for c in range(s.num_captions):
            ids = torch.tensor([vocab.encode(s.captions[c])])
            alone[:, c] = model.score(images, model.encode_texts(Tokens(ids, torch.tensor([ids.shape[1]]))))[:, 0]
    return sims, alone


def test_trained_models_score_a_split_as_each_caption_alone_and_ensemble(tmp_path):
    """Three tiny epochs (one per phase) of each orientation; the scoring engine (length-sorted caption
    batches, blocks) equals each caption alone; `itmkit eval a b` averages the two matrices."""
    sys.path.insert(0, str(Path(__file__).parent))
    sys.path.insert(0, str(ROOT / "tests"))
    from cliutil import invoke
    from tinyboxes import write_tiny_boxes

    from itmkit.train import train

    data = write_tiny_boxes(tmp_path / "data", width=8, regions=4)
    matrices = []
    for o in ("word", "object"):
        recipe = load_recipe(ROOT / "recipes" / f"dprnn_shapes_{o}.toml", [
            f"data.path={data}", "recipe.embed_dim=8", "text.encoder.word_dim=8", "train.epochs=3",
            "train.batch_size=8", "train.eval_batch_size=3", "data.dev_images=6",
            "match.0.similarity.preselect_train=3"])
        train(recipe, out_dir=tmp_path / o, log=lambda *a: None)
        sims, alone = scores_alone(tmp_path / o / "last.safetensors", data)
        np.testing.assert_allclose(sims, alone, rtol=0, atol=1e-5)
        matrices.append(sims)
    result = invoke("eval", str(tmp_path / "word" / "last.safetensors"), str(tmp_path / "object" / "last.safetensors"),
                    "--data", str(data), "--save-sims", str(tmp_path / "ensemble.npy"), "--json")
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(tmp_path / "ensemble.npy"), (matrices[0] + matrices[1]) / 2, rtol=0, atol=1e-6)
