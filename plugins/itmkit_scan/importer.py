"""Convert an official SCAN checkpoint (kuanghuei/SCAN ``model_best.pth.tar``) into an itmkit model.

The official file is ``{'epoch', 'model': [img_enc, txt_enc], 'best_rsum', 'opt', 'Eiters'}``;
``itmkit.importing.read_official`` unpickles it with an allow-list. Here the options become a
recipe (encoders, one [[match]] branch, loss, schedule) and the two state dicts are checked key
by key against the layout those options imply before they are renamed to our modules:

    img_enc  fc.weight [E, img_dim], fc.bias [E]         -> image.encoder.fc.*
             (precomp_enc_type=weight_norm: fc.weight_g, fc.weight_v, folded into fc.weight)
    txt_enc  embed.weight [V, word_dim]                   -> text.encoder.embed.weight
             rnn.{weight,bias}_{ih,hh}_l{k}[_reverse]     -> text.encoder.rnn.*

Nothing is dropped: an unexpected key, a missing key or a wrong shape is a CheckpointError.
"""

from __future__ import annotations

from typing import Any

import tomli_w
import torch

from itmkit.attention import RAW_NORMS
from itmkit.build import DataPorts
from itmkit.data.vocab import Vocabulary
from itmkit.errors import CheckpointError, did_you_mean
from itmkit.importing import (Converted, OfficialCheckpoint, check_state, check_vocabulary_size, fold_weight_norm,
                              gru_text_layout, option, scalar_gain, training_options, weight_norm_layout)

# agg_func -> the aggregate stage of the [[match]] branch
AGGREGATES = {"LogSumExp": "scan.lse", "Mean": "core.mean", "Max": "core.max", "Sum": "scan.sum"}
CROSS = {"t2i": "scan.t2i", "i2t": "scan.i2t"}
ENCODER_TYPES = ("basic", "weight_norm")
# data_name -> (evaluation protocol, test split) of the official evaluation
PROTOCOLS = {"f30k_precomp": ("f30k-1k", "test"), "coco_precomp": ("coco-1k-5fold", "testall")}
# Options that only matter for training: when a checkpoint lacks one, train.py's default is used.
TRAIN_DEFAULTS = {"margin": 0.2, "max_violation": False, "learning_rate": 2e-4, "num_epochs": 30,
                  "lr_update": 15, "batch_size": 128, "grad_clip": 2.0}


def _choice(options: dict[str, Any], name: str, choices, where: str) -> Any:
    value = option(options, name, where, str)
    if value not in choices:
        raise CheckpointError(f"{where}: option {name}={value!r} is not supported" + did_you_mean(str(value), choices))
    return value


def _check_modules(official: OfficialCheckpoint) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    if len(official.modules) != 2:
        raise CheckpointError(f"{official.path}: a SCAN checkpoint's 'model' holds 2 state dicts"
                              f" [img_enc, txt_enc], this one holds {len(official.modules)}")
    return dict(official.modules[0]), dict(official.modules[1])


def image_layout(embed: int, img_dim: int, encoder_type: str) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the official image encoder's state dict."""
    if encoder_type == "weight_norm":  # weight_norm(nn.Linear, dim=None): one scalar gain g
        return weight_norm_layout("fc", embed, img_dim)
    return {"fc.weight": (embed, img_dim), "fc.bias": (embed,)}


def convert(official: OfficialCheckpoint, vocab: Vocabulary) -> Converted:
    """Map SCAN's options to a recipe and its img_enc / txt_enc weights to our stages."""
    where = f"{official.path} (SCAN options)"
    opts = official.options
    cross = _choice(opts, "cross_attn", CROSS, where)
    agg = _choice(opts, "agg_func", AGGREGATES, where)
    raw_norm = _choice(opts, "raw_feature_norm", RAW_NORMS, where)
    encoder_type = _choice(opts, "precomp_enc_type", ENCODER_TYPES, where)
    lambda_softmax = option(opts, "lambda_softmax", where, float)
    embed, word_dim, img_dim, layers = (option(opts, k, where, int)
                                        for k in ("embed_size", "word_dim", "img_dim", "num_layers"))
    bidirectional, no_imgnorm, no_txtnorm = (option(opts, k, where, bool)
                                             for k in ("bi_gru", "no_imgnorm", "no_txtnorm"))
    data_name = option(opts, "data_name", where, str, "precomp")

    img, txt = _check_modules(official)
    check_vocabulary_size(official, txt, len(vocab), f"JSON the model was trained with"
                          f" (vocab/{data_name}_vocab.json: F30K 8481 words, COCO 11353)")
    img = scalar_gain(img, "fc.weight_g")
    check_state(img, image_layout(embed, img_dim, encoder_type), f"{official.path}: model[0] (img_enc)")
    check_state(txt, gru_text_layout(len(vocab), word_dim, embed, layers, bidirectional), f"{official.path}: model[1] (txt_enc)")

    state = {"image.encoder.fc.bias": img["fc.bias"]}
    if encoder_type == "weight_norm":
        state["image.encoder.fc.weight"] = fold_weight_norm(img["fc.weight_g"], img["fc.weight_v"])
    else:
        state["image.encoder.fc.weight"] = img["fc.weight"]
    state.update({f"text.encoder.{k}": v for k, v in txt.items()})
    state = {k: v.detach().float().contiguous() for k, v in state.items()}

    aggregate: dict[str, Any] = {"stage": AGGREGATES[agg]}
    if agg == "LogSumExp":
        aggregate["lambda_lse"] = option(opts, "lambda_lse", where, float)
    protocol, test_split = PROTOCOLS.get(data_name, ("f30k-1k", "test"))
    training = training_options(opts, TRAIN_DEFAULTS, where)
    recipe = {
        "recipe": {
            "name": f"scan-{data_name.removesuffix('_precomp')}-{cross}-{agg.lower()}-imported",
            "description": f"official SCAN checkpoint {official.path} (epoch {official.epoch},"
                           f" best dev rsum {official.best_rsum}), converted by itmkit import scan",
            "embed_dim": embed,
        },
        "image": {"encoder": {"stage": "core.precomp", "normalize": not no_imgnorm}},
        "text": {"encoder": {"stage": "core.bigru", "word_dim": word_dim, "num_layers": layers,
                             "bidirectional": bidirectional, "normalize": not no_txtnorm}},
        "match": [{
            "cross": {"stage": CROSS[cross], "lambda_softmax": lambda_softmax, "raw_feature_norm": raw_norm},
            "similarity": {"stage": "core.cosine"},
            "aggregate": aggregate,
        }],
        "loss": {"stage": "core.triplet", **training.loss},
        "data": {"path": f"data/{data_name}", "protocol": protocol, "test_split": test_split},
        "train": training.train,
    }
    return Converted(tomli_w.dumps(recipe), state, DataPorts(feature_dim=img_dim, vocab_size=len(vocab)),
                     training.notes)
