"""Convert an official IMRAM checkpoint (HuiChen24/IMRAM ``model_best.pth.tar``) into an itmkit model.

The official file is ``{'epoch', 'model', 'best_rsum', 'opt'}`` (no ``Eiters``). Its ``model`` is
ONE state dict of the whole network, saved from nn.DataParallel, so every key starts with
``module.``; ``itmkit.importing.read_official`` removes the prefix. The keys, checked one by one
against the layout the options imply, map to our modules:

    img_enc.fc_local.{weight [E, img_dim], bias}        -> image.encoder.fc.*
            (precomp_enc_type=weight_norm: fc_local.weight_g / weight_v, folded into fc.weight)
    txt_enc.embed.weight, txt_enc.rnn.*                  -> text.encoder.*
    linear_t2i / gate_t2i .{weight [E, 2E], bias [E]}    -> the imram.t2i branch's linear / gate
    linear_i2t / gate_i2t                                -> the imram.i2t branch's linear / gate

All four gate layers exist in every mode; the one direction a text_IMRAM or image_IMRAM model
never runs is checked and left out (said in the import notes). --model_mode chooses the
branches (full_IMRAM: both, each summed over its steps, as the official evaluation adds them);
--iteration_step is K, --no_IMRAM_norm turns the memory's renormalisation off, --lambda_softmax
and --raw_feature_norm apply to every step of both directions. IMRAM's per-step score is the
mean over the query fragments whatever --agg_func says, so agg_func is not read.
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
                              gru_text_layout, option, scalar_gain, training_options)
from itmkit_scan.importer import ENCODER_TYPES, PROTOCOLS, image_layout

# --model_mode -> the directions it scores with, as (official suffix, our stage)
MODES = {"full_IMRAM": (("t2i", "imram.t2i"), ("i2t", "imram.i2t")),
         "text_IMRAM": (("t2i", "imram.t2i"),),
         "image_IMRAM": (("i2t", "imram.i2t"),)}
GATES = ("linear_t2i", "gate_t2i", "linear_i2t", "gate_i2t")
TRAIN_DEFAULTS = {"margin": 0.2, "max_violation": False, "learning_rate": 2e-4, "num_epochs": 30,
                  "lr_update": 15, "batch_size": 128, "grad_clip": 2.0}


def split_state(state: dict[str, torch.Tensor], where: str) -> tuple[dict, dict, dict]:
    """The one state dict's keys by submodule: img_enc, txt_enc, and the four gate layers."""
    image, text, gates = {}, {}, {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head == "img_enc":
            image[rest] = value
        elif head == "txt_enc":
            text[rest] = value
        elif head in GATES:
            gates[key] = value
        else:
            raise CheckpointError(f"{where}: unexpected key {key!r}: an IMRAM model has img_enc.*, txt_enc.* and"
                                  f" {', '.join(g + '.*' for g in GATES)}" + did_you_mean(head, ("img_enc", "txt_enc", *GATES)))
    return image, text, gates


def convert(official: OfficialCheckpoint, vocab: Vocabulary) -> Converted:
    """Map IMRAM's options to a recipe and its single state dict to our stages."""
    where = f"{official.path} (IMRAM options)"
    opts = official.options
    count = len(official.modules)
    if count != 1 or "model_mode" not in opts:  # another model's checkpoint: say so before any option or key
        reasons = ([f"an IMRAM checkpoint's 'model' is one state dict of the whole network, this one holds {count}"]
                   if count != 1 else [])
        if not opts:
            reasons.append("it has no training options ('opt'), where every IMRAM run records its model_mode")
        elif "model_mode" not in opts:
            reasons.append("its options have no model_mode, which every IMRAM run records")
        hint = (" (a SCAN-family checkpoint, one state dict per tower? try `itmkit import scan` or bfan)"
                if count == 2 else " (a checkpoint of another model? `itmkit plugins` lists the importers)")
        raise CheckpointError(f"{official.path}: not an IMRAM checkpoint: " + "; ".join(reasons) + hint)
    mode = option(opts, "model_mode", where, str)
    if mode not in MODES:
        raise CheckpointError(f"{where}: option model_mode={mode!r} is not an IMRAM mode"
                              + did_you_mean(mode, MODES))
    raw_norm = option(opts, "raw_feature_norm", where, str)
    if raw_norm not in RAW_NORMS:
        raise CheckpointError(f"{where}: option raw_feature_norm={raw_norm!r} is not supported"
                              + did_you_mean(raw_norm, RAW_NORMS))
    encoder_type = option(opts, "precomp_enc_type", where, str, "basic")
    if encoder_type not in ENCODER_TYPES:
        raise CheckpointError(f"{where}: option precomp_enc_type={encoder_type!r} is not supported"
                              + did_you_mean(encoder_type, ENCODER_TYPES))
    steps = option(opts, "iteration_step", where, int)
    if not 1 <= steps <= 16:
        raise CheckpointError(f"{where}: option iteration_step={steps} is outside 1..16")
    lambda_softmax = option(opts, "lambda_softmax", where, float)
    embed, word_dim, img_dim, layers = (option(opts, k, where, int)
                                        for k in ("embed_size", "word_dim", "img_dim", "num_layers"))
    bidirectional, no_imgnorm, no_txtnorm, no_memory_norm = (
        option(opts, k, where, bool) for k in ("bi_gru", "no_imgnorm", "no_txtnorm", "no_IMRAM_norm"))
    data_name = option(opts, "data_name", where, str, "precomp")

    image, text, gates = split_state(official.modules[0], f"{official.path}: entry 'model'")
    check_vocabulary_size(official, text, len(vocab), f"JSON the model was trained with"
                          f" (vocab/{data_name}_vocab.json: F30K 8481 words, COCO 11353)")
    image = scalar_gain(image, "fc_local.weight_g")
    check_state({k.replace("fc_local.", "fc.", 1): v for k, v in image.items()},
                image_layout(embed, img_dim, encoder_type), f"{official.path}: img_enc (fc_local)")
    check_state(text, gru_text_layout(len(vocab), word_dim, embed, layers, bidirectional), f"{official.path}: txt_enc")
    check_state(gates, {f"{g}.{p}": (embed, 2 * embed) if p == "weight" else (embed,) for g in GATES
                        for p in ("weight", "bias")}, f"{official.path}: the memory's gate layers")

    state = {"image.encoder.fc.bias": image["fc_local.bias"]}
    if encoder_type == "weight_norm":
        state["image.encoder.fc.weight"] = fold_weight_norm(image["fc_local.weight_g"], image["fc_local.weight_v"])
    else:
        state["image.encoder.fc.weight"] = image["fc_local.weight"]
    state.update({f"text.encoder.{k}": v for k, v in text.items()})
    directions = MODES[mode]
    for b, (suffix, _) in enumerate(directions):
        for layer in ("linear", "gate"):
            for p in ("weight", "bias"):
                state[f"branches.{b}.stages.0.{layer}.{p}"] = gates[f"{layer}_{suffix}.{p}"]
    state = {k: v.detach().float().contiguous() for k, v in state.items()}
    unused = sorted({"t2i", "i2t"} - {s for s, _ in directions})
    notes = tuple(f"{official.path}: linear_{s} and gate_{s} are not used by model_mode={mode} (its official"
                  f" scores never read them); checked and left out" for s in unused)

    cross: dict[str, Any] = {"steps": steps, "lambda_softmax": lambda_softmax, "raw_feature_norm": raw_norm,
                             "renormalize": not no_memory_norm}
    protocol, test_split = PROTOCOLS.get(data_name, ("f30k-1k", "test"))
    training = training_options(opts, TRAIN_DEFAULTS, where)
    recipe = {
        "recipe": {
            "name": f"imram-{data_name.removesuffix('_precomp')}-{mode.removesuffix('_IMRAM')}-k{steps}-imported",
            "description": f"official IMRAM checkpoint {official.path} (epoch {official.epoch},"
                           f" best dev rsum {official.best_rsum}), converted by itmkit import imram",
            "embed_dim": embed,
        },
        "image": {"encoder": {"stage": "core.precomp", "normalize": not no_imgnorm}},
        "text": {"encoder": {"stage": "core.bigru", "word_dim": word_dim, "num_layers": layers,
                             "bidirectional": bidirectional, "normalize": not no_txtnorm}},
        "match": [{"similarity": {"stage": stage, **cross}, "aggregate": {"stage": "imram.steps", "pool": "mean"}}
                  for _, stage in directions],
        "loss": {"stage": "core.triplet", **training.loss},
        "data": {"path": f"data/{data_name}", "protocol": protocol, "test_split": test_split},
        "train": training.train,
    }
    return Converted(tomli_w.dumps(recipe), state, DataPorts(feature_dim=img_dim, vocab_size=len(vocab)),
                     notes + training.notes)
