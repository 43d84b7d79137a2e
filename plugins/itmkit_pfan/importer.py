"""Import official PFAN checkpoints (``model_best.pth.tar``) as itmkit models: ``itmkit import pfan``.

PFAN's container is SCAN's: ``{'epoch', 'model': [img_enc, txt_enc], 'best_rsum', 'opt',
'Eiters'}``. The image encoder holds ``fc`` [E, F+200], ``fc_att`` [200, F] and
``position_embedding`` [257, 200] (a 16 x 16 grid plus the padding block, sizes fixed in the
official code); the text encoder is SCAN's GRU. The options become a recipe: the
``pfan.position`` encoder, ``core.bigru``, SCAN attention in the checkpoint's direction and,
for text-to-image, ``pfan.cosine_max`` (the official score adds half of each word's largest
attention weight) before ``core.mean``.
"""

from __future__ import annotations

from typing import Any

import tomli_w

from itmkit.attention import RAW_NORMS
from itmkit.build import DataPorts
from itmkit.data.vocab import Vocabulary
from itmkit.errors import CheckpointError, did_you_mean
from itmkit.importing import (Converted, OfficialCheckpoint, check_state, check_vocabulary_size, gru_text_layout,
                              option, training_options)

GRID, TOP_BLOCKS, POSITION_DIM = 16, 15, 200  # hard-coded in the official EncoderImagePrecomp
MAX_ATTENTION_WEIGHT = 0.5  # official xattn_score_t2i: row_sim + 0.5 * max_attn
# data_name -> (evaluation protocol, test split) as the official evalrank is called
PROTOCOLS = {"f30k_precomp": ("f30k-1k", "test"), "coco_precomp": ("coco-1k-5fold", "testall")}
# Options that only matter for training: when a checkpoint lacks one, train_attention.py's default.
TRAIN_DEFAULTS = {"margin": 0.2, "max_violation": False, "learning_rate": 2e-4, "num_epochs": 30,
                  "lr_update": 15, "batch_size": 128, "grad_clip": 2.0}


def image_layout(embed: int, img_dim: int) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the official position-attention image encoder's state dict."""
    return {
        "fc.weight": (embed, img_dim + POSITION_DIM),
        "fc.bias": (embed,),
        "fc_att.weight": (POSITION_DIM, img_dim),
        "fc_att.bias": (POSITION_DIM,),
        "position_embedding.weight": (GRID * GRID + 1, POSITION_DIM),
    }



def _aggregate(agg: str, cross: str, options: dict[str, Any], where: str) -> dict[str, Any]:
    """The aggregate slot for agg_func; t2i adds 0.5 * max attention, exact only for linear pools."""
    if agg == "Mean":
        return {"stage": "core.mean"}
    if agg == "Sum":
        return {"stage": "scan.sum"}
    if cross == "t2i":
        raise CheckpointError(
            f"{where}: agg_func={agg!r} with cross_attn='t2i' is not supported: the official score is"
            f" {agg}(cos) + 0.5 * {agg}(max attention), each pooled on its own, which pfan.cosine_max"
            " (cos + 0.5 * max per word, then one pool) equals only for Mean and Sum; every PFAN README"
            " recipe uses Mean"
        )
    if agg == "Max":
        return {"stage": "core.max"}
    if agg == "LogSumExp":
        return {"stage": "scan.lse", "lambda_lse": option(options, "lambda_lse", where, float)}
    raise CheckpointError(f"{where}: option agg_func={agg!r} is not supported"
                          + did_you_mean(agg, ("Mean", "Sum", "Max", "LogSumExp")))


def convert(official: OfficialCheckpoint, vocab: Vocabulary) -> Converted:
    """Map PFAN's options to a recipe and its img_enc / txt_enc weights to our stages."""
    where = f"{official.path} (PFAN options)"
    opts = official.options
    cross = option(opts, "cross_attn", where, str)
    if cross not in ("t2i", "i2t"):
        raise CheckpointError(f"{where}: option cross_attn={cross!r} is not supported" + did_you_mean(str(cross), ("t2i", "i2t")))
    raw_norm = option(opts, "raw_feature_norm", where, str)
    if raw_norm not in RAW_NORMS:
        raise CheckpointError(f"{where}: option raw_feature_norm={raw_norm!r} is not supported" + did_you_mean(str(raw_norm), RAW_NORMS))
    encoder_type = option(opts, "precomp_enc_type", where, str, "basic")
    if encoder_type != "basic":
        raise CheckpointError(f"{where}: precomp_enc_type={encoder_type!r}: only 'basic' has PFAN's position"
                              " attention (the official weight_norm encoder takes no boxes)")
    lambda_softmax = option(opts, "lambda_softmax", where, float)
    embed, word_dim, img_dim, layers = (option(opts, k, where, int)
                                        for k in ("embed_size", "word_dim", "img_dim", "num_layers"))
    bidirectional, no_imgnorm, no_txtnorm = (option(opts, k, where, bool)
                                             for k in ("bi_gru", "no_imgnorm", "no_txtnorm"))
    data_name = option(opts, "data_name", where, str, "precomp")
    aggregate = _aggregate(option(opts, "agg_func", where, str), cross, opts, where)

    if len(official.modules) != 2:
        raise CheckpointError(f"{official.path}: a PFAN checkpoint's 'model' holds 2 state dicts"
                              f" [img_enc, txt_enc], this one holds {len(official.modules)}")
    img, txt = dict(official.modules[0]), dict(official.modules[1])
    check_vocabulary_size(official, txt, len(vocab), "the model was trained with (PFAN ships"
                          " vocab/f30k_new_vocab.json, 8,531 words, and coco_precomp_vocab.json, 11,352)")
    check_state(img, image_layout(embed, img_dim), f"{official.path}: model[0] (img_enc)")
    check_state(txt, gru_text_layout(len(vocab), word_dim, embed, layers, bidirectional), f"{official.path}: model[1] (txt_enc)")
    state = {f"image.encoder.{k}": v for k, v in img.items()}
    state.update({f"text.encoder.{k}": v for k, v in txt.items()})
    state = {k: v.detach().float().contiguous() for k, v in state.items()}

    protocol, test_split = PROTOCOLS.get(data_name, ("f30k-1k", "test"))
    training = training_options(opts, TRAIN_DEFAULTS, where)
    similarity = ({"stage": "pfan.cosine_max", "max_weight": MAX_ATTENTION_WEIGHT} if cross == "t2i"
                  else {"stage": "core.cosine"})
    recipe = {
        "recipe": {
            "name": f"pfan-{data_name.removesuffix('_precomp')}-{cross}-imported",
            "description": f"official PFAN checkpoint {official.path} (epoch {official.epoch},"
                           f" best dev rsum {official.best_rsum}), converted by itmkit import pfan",
            "embed_dim": embed,
        },
        "image": {"encoder": {"stage": "pfan.position", "grid": GRID, "top_blocks": TOP_BLOCKS,
                              "position_dim": POSITION_DIM, "normalize": not no_imgnorm}},
        "text": {"encoder": {"stage": "core.bigru", "word_dim": word_dim, "num_layers": layers,
                             "bidirectional": bidirectional, "normalize": not no_txtnorm}},
        "match": [{
            "cross": {"stage": f"scan.{cross}", "lambda_softmax": lambda_softmax, "raw_feature_norm": raw_norm},
            "similarity": similarity,
            "aggregate": aggregate,
        }],
        "loss": {"stage": "core.triplet", **training.loss},
        "data": {"path": f"data/{data_name}", "protocol": protocol, "test_split": test_split},
        "train": training.train,
    }
    return Converted(tomli_w.dumps(recipe), state, DataPorts(feature_dim=img_dim, vocab_size=len(vocab)),
                     training.notes)
