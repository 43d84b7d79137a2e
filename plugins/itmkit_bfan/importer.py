"""Import an official BFAN checkpoint (CrossmodalGroup/BFAN ``model_best.pth.tar``) into itmkit.

The container is SCAN's: ``{epoch, model: [img_enc, txt_enc], best_rsum, opt, Eiters}``, with
``opt`` the training ``argparse.Namespace``. The image encoder is ``fc`` (a Linear, or a
``weight_norm`` Linear when ``--precomp_enc_type weight_norm``); the text encoder is ``embed``
plus a GRU that is *always* bidirectional (``rnn.*`` and ``rnn.*_reverse``). BFAN has no
attention weights: focal attention is parameter-free, so the options decide it (``lambda_softmax``,
``focal_type``).

The options become a recipe in the layout of ``recipes/bfan_*.toml`` (two [[match]] branches,
t2i + i2t, weight 1 each, whose sum is BFAN's bidirectional score), and the weights are renamed
to the model's keys. The official layout is checked first, key by key and shape by shape,
against what the options imply, so nothing is dropped or guessed silently.
"""

from __future__ import annotations

from typing import Any

import tomli_w

from itmkit.build import DataPorts
from itmkit.data.vocab import Vocabulary
from itmkit.errors import CheckpointError
from itmkit.importing import (Converted, OfficialCheckpoint, check_state, fold_weight_norm, gru_text_layout, option,
                              scalar_gain, training_options, weight_norm_layout)

FOCAL_TYPES = ("equal", "prob")
ENCODER_TYPES = ("basic", "weight_norm")
# Options that only matter for training: when a checkpoint lacks one (or holds one the recipe
# cannot take), the official train.py's default is used.
TRAIN_DEFAULTS = {"margin": 0.2, "max_violation": False, "learning_rate": 2e-4, "num_epochs": 15,
                  "lr_update": 15, "batch_size": 128, "grad_clip": 2.0}


def official_image_layout(embed: int, img_dim: int, enc_type: str) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the official EncoderImagePrecomp / EncoderImageWeightNormPrecomp."""
    if enc_type == "weight_norm":  # weight_norm(dim=None): a scalar gain and the direction
        return weight_norm_layout("fc", embed, img_dim)
    return {"fc.weight": (embed, img_dim), "fc.bias": (embed,)}



def _dataset(data_name: str) -> tuple[str, str, str]:
    """(short name, protocol, test split) from the official ``data_name``."""
    if data_name.startswith("coco"):
        return "coco", "coco-1k-5fold", "testall"  # BFAN's testall.py: split='testall', fold5=True
    return data_name.removesuffix("_precomp") or "f30k", "f30k-1k", "test"


def recipe_table(options: dict[str, Any], where: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The itmkit recipe (as a TOML table) equivalent to BFAN's training options, and the training notes."""
    focal_type = option(options, "focal_type", where, str)
    if focal_type not in FOCAL_TYPES:
        raise CheckpointError(f"{where}: unknown focal_type {focal_type!r}; BFAN has {', '.join(FOCAL_TYPES)}")
    data_name = option(options, "data_name", where, str)
    short, protocol, test_split = _dataset(data_name)
    branch = {"lambda_softmax": option(options, "lambda_softmax", where, float), "focal_type": focal_type}
    training = training_options(options, TRAIN_DEFAULTS, where)
    table = {
        "recipe": {
            "name": f"bfan-{short}-{focal_type}-imported",
            "description": f"official BFAN-{focal_type} checkpoint ({data_name}) imported from {where}",
            "embed_dim": option(options, "embed_size", where, int),
        },
        "image": {"encoder": {"stage": "core.precomp",
                              "normalize": not option(options, "no_imgnorm", where, bool, False)}},
        "text": {"encoder": {
            "stage": "core.bigru",
            "word_dim": option(options, "word_dim", where, int),
            "num_layers": option(options, "num_layers", where, int),
            "bidirectional": True,
            "normalize": not option(options, "no_txtnorm", where, bool, False),
        }},
        "match": [
            {"cross": {"stage": "bfan.t2i", **branch}, "similarity": {"stage": "core.cosine"},
             "aggregate": {"stage": "core.mean"}, "weight": 1.0},
            {"cross": {"stage": "bfan.i2t", **branch}, "similarity": {"stage": "core.cosine"},
             "aggregate": {"stage": "core.mean"}, "weight": 1.0},
        ],
        "loss": {"stage": "core.triplet", **training.loss},
        "data": {"path": f"data/{data_name}", "protocol": protocol, "test_split": test_split},
        "train": training.train,
    }
    return table, training.notes


def convert(official: OfficialCheckpoint, vocab: Vocabulary) -> Converted:
    """BFAN options -> recipe, official weights -> our keys, after checking the official layout."""
    where = f"{official.path} (bfan)"
    options = official.options
    table, notes = recipe_table(options, where)
    if len(official.modules) != 2:
        raise CheckpointError(f"{where}: expected 'model' = [img_enc, txt_enc] (2 state dicts),"
                              f" found {len(official.modules)}")
    image, text = official.modules
    embed, img_dim = option(options, "embed_size", where, int), option(options, "img_dim", where, int)
    enc_type = option(options, "precomp_enc_type", where, str, "basic")
    if enc_type not in ENCODER_TYPES:
        raise CheckpointError(f"{where}: unknown precomp_enc_type {enc_type!r}; BFAN has {', '.join(ENCODER_TYPES)}")
    image = scalar_gain(image, "fc.weight_g")
    check_state(image, official_image_layout(embed, img_dim, enc_type), f"{where} image encoder (model[0])")
    text_layout = gru_text_layout(len(vocab), table["text"]["encoder"]["word_dim"], embed,
                                  table["text"]["encoder"]["num_layers"], bidirectional=True)  # BFAN: always a bi-GRU
    check_state(text, text_layout, f"{where} text encoder (model[1]) with a vocabulary of {len(vocab)} words")
    if enc_type == "weight_norm":
        image = {"fc.weight": fold_weight_norm(image["fc.weight_g"], image["fc.weight_v"]), "fc.bias": image["fc.bias"]}
    state = {f"image.encoder.{k}": v.float() for k, v in image.items()}
    state.update({f"text.encoder.{k}": v.float() for k, v in text.items()})
    return Converted(tomli_w.dumps(table), state, DataPorts(feature_dim=img_dim, vocab_size=len(vocab)), notes)
