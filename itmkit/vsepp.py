"""Convert an official VSE++ checkpoint (fartashf/vsepp ``model_best.pth.tar``) into an itmkit model.

VSE++ (Faghri et al., BMVC 2018) is built from core stages only, so its importer is the core's
(``itmkit import vsepp``). The file is ``{'epoch', 'model': [img_enc, txt_enc], 'best_rsum',
'opt', 'Eiters'}``, read by ``itmkit.importing.read_official`` (Python 2 pickles included).
Precomputed-feature models only (``data_name`` ending in ``_precomp``): one feature vector per
image, which the data readers present as one region.

    img_enc  fc.weight [E, img_dim], fc.bias [E]            -> image.encoder.fc.*   (core.precomp)
    txt_enc  embed.weight [V, word_dim]                      -> text.encoder.embed.* (core.bigru,
             rnn.{weight,bias}_{ih,hh}_l{k} (one direction)  -> text.encoder.rnn.*    bidirectional=false)

The official forward and how its options map:

    image    fc(f), l2norm unless --no_imgnorm, abs if --use_abs   core.precomp normalize / absolute,
                                                                   core.mean over the one region
    caption  GRU's state at the last word, l2norm, abs if --use_abs core.bigru absolute, core.last
    score    --measure cosine: im . s (cosine_sim)                 core.cosine (core.dot under --no_imgnorm,
                                                                   where im is not unit length)
             --measure order: -||max(0, s - im)||                  core.order
    loss     ContrastiveLoss(margin, max_violation)                core.triplet
"""

from __future__ import annotations

from typing import Any

import tomli_w

from itmkit.build import DataPorts
from itmkit.data.vocab import Vocabulary
from itmkit.errors import CheckpointError, did_you_mean
from itmkit.importing import (Converted, OfficialCheckpoint, Training, check_state, check_vocabulary_size,
                              gru_text_layout, option, training_options)

MEASURES = ("cosine", "order")
FLAG_DEFAULTS = {"measure": "cosine", "use_abs": False, "no_imgnorm": False}  # train.py's defaults
# data_name -> (evaluation protocol, test split) of the official evalrank
PROTOCOLS = {"coco_precomp": ("coco-1k-5fold", "testall")}
# train.py's defaults, for options only training reads
TRAIN_DEFAULTS = {"margin": 0.2, "max_violation": False, "learning_rate": 2e-4, "num_epochs": 30, "lr_update": 15,
                  "batch_size": 128, "grad_clip": 2.0}


def image_layout(embed: int, img_dim: int) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the official EncoderImagePrecomp: one linear layer."""
    return {"fc.weight": (embed, img_dim), "fc.bias": (embed,)}


def convert(official: OfficialCheckpoint, vocab: Vocabulary) -> Converted:
    """Map VSE++'s options to a recipe of core stages and its img_enc / txt_enc weights to them."""
    where = f"{official.path} (VSE++ options)"
    opts = official.options
    data_name = option(opts, "data_name", where, str)
    if not data_name.endswith("_precomp"):
        raise CheckpointError(f"{where}: data_name={data_name!r} is a full-image model (a {opts.get('cnn_type', 'CNN')}"
                              " on raw pixels), which itmkit has no stage for; only the precomp models import"
                              " (data_name ending in _precomp)")
    # Checkpoints older than the order-embedding flags were all cosine models of normalised vectors,
    # which is what train.py's defaults still say: an absent flag means that, not a guess.
    measure = option(opts, "measure", where, str, FLAG_DEFAULTS["measure"])
    if measure not in MEASURES:
        raise CheckpointError(f"{where}: option measure={measure!r} is not supported" + did_you_mean(measure, MEASURES))
    use_abs, no_imgnorm = (option(opts, k, where, bool, FLAG_DEFAULTS[k]) for k in ("use_abs", "no_imgnorm"))
    embed, word_dim, img_dim, layers = (option(opts, k, where, int)
                                        for k in ("embed_size", "word_dim", "img_dim", "num_layers"))
    if len(official.modules) != 2:
        raise CheckpointError(f"{official.path}: a VSE++ checkpoint's 'model' holds 2 state dicts"
                              f" [img_enc, txt_enc], this one holds {len(official.modules)}")
    img, txt = official.modules
    check_vocabulary_size(official, txt, len(vocab), f"file the model was trained with (vocab/{data_name}_vocab.pkl)")
    check_state(img, image_layout(embed, img_dim), f"{official.path}: model[0] (img_enc)")
    check_state(txt, gru_text_layout(len(vocab), word_dim, embed, layers, False), f"{official.path}: model[1] (txt_enc)")

    state = {f"image.encoder.{k}": v for k, v in img.items()}
    state.update({f"text.encoder.{k}": v for k, v in txt.items()})
    state = {k: v.detach().float().contiguous() for k, v in state.items()}
    similarity = "core.order" if measure == "order" else "core.dot" if no_imgnorm else "core.cosine"
    training = training_options(opts, TRAIN_DEFAULTS, where)
    recipe = _recipe(official, data_name, measure, similarity, training, embed=embed, word_dim=word_dim,
                     layers=layers, use_abs=use_abs, no_imgnorm=no_imgnorm)
    return Converted(tomli_w.dumps(recipe), state, DataPorts(feature_dim=img_dim, vocab_size=len(vocab)),
                     training.notes)


def _recipe(official: OfficialCheckpoint, data_name: str, measure: str, similarity: str, training: Training, *,
            embed: int, word_dim: int, layers: int, use_abs: bool, no_imgnorm: bool) -> dict[str, Any]:
    protocol, test_split = PROTOCOLS.get(data_name, ("f30k-1k", "test"))
    return {
        "recipe": {
            "name": f"vsepp-{data_name.removesuffix('_precomp')}-{measure}-imported",
            "description": f"official VSE++ checkpoint {official.path} (epoch {official.epoch}, best dev rsum"
                           f" {official.best_rsum}), converted by itmkit import vsepp",
            "embed_dim": embed,
        },
        "image": {"encoder": {"stage": "core.precomp", "normalize": not no_imgnorm, "absolute": use_abs},
                  "pool": {"stage": "core.mean"}},
        "text": {"encoder": {"stage": "core.bigru", "word_dim": word_dim, "num_layers": layers, "bidirectional": False,
                             "normalize": True, "absolute": use_abs},
                 "pool": {"stage": "core.last"}},
        "match": [{"similarity": {"stage": similarity}}],
        "loss": {"stage": "core.triplet", **training.loss},
        "data": {"path": f"data/{data_name}", "protocol": protocol, "test_split": test_split},
        "train": training.train,
    }
