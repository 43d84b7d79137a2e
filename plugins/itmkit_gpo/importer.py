"""Convert an official VSE-infinity checkpoint (woodfrog/vse_infty ``model_best.pth``) into an itmkit model.

The file is ``{'epoch', 'model': [img_enc, txt_enc], 'best_rsum', 'opt', 'Eiters'}``, read by
``itmkit.importing.read_official``. Region-feature models (``precomp_enc_type = basic``) only:

    img_enc  fc.weight [E, F], fc.bias [E]                    -> image.encoder.fc.*
             mlp.layers.0.* [E/2, F], mlp.bns.0.* [E/2]        -> image.encoder.mlp.0.*, mlp.1.*
             mlp.layers.1.* [E, E/2]                           -> image.encoder.mlp.3.*
             mlp.bns.1.* [E]                                   (never used by the official forward: dropped)
             gpool.gru.*, gpool.linear.weight [1, 32]          -> image.pool.*
    txt_enc  bigru branch: embed.weight [V+1, W], rnn.*       -> text.encoder.* (gpo.bigru)
             master branch: bert.* (BertModel), linear.* [E, H] -> text.encoder.bert.*, .linear.* (gpo.bert)
                            bert.pooler.* (unused by the forward: dropped), bert.embeddings.position_ids
                            (a buffer of older transformers: checked, dropped)
             gpool.*                                           -> text.pool.*

The master (BERT) branch always trains inside nn.DataParallel, so its keys carry a ``module.``
prefix, which ``read_official`` removes for every importer. Every key is checked against the
layout the options imply: a missing, unexpected or mis-shaped key is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomli_w
import torch

from itmkit.build import DataPorts
from itmkit.data.vocab import Vocabulary
from itmkit.errors import CheckpointError
from itmkit.importing import (Converted, ModelDirectory, OfficialCheckpoint, check_state, gru_text_layout, option,
                              training_options)
from itmkit_bert.vocab import WordPieceVocabulary

# The official training defaults (arguments.py), used when an option is absent.
TRAIN_DEFAULTS = {"margin": 0.2, "learning_rate": 2e-4, "num_epochs": 30, "lr_update": 15, "batch_size": 128,
                  "grad_clip": 2.0, "vse_mean_warmup_epochs": 0}
GPO_HIDDEN = 32  # GPO(32, 32) in both encoders


def gpo_layout(prefix: str = "gpool.") -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the official GPO module (d_pe = d_hidden = 32)."""
    h = GPO_HIDDEN
    out = {f"{prefix}linear.weight": (1, h)}
    for suffix in ("", "_reverse"):
        out.update({f"{prefix}gru.weight_ih_l0{suffix}": (3 * h, h), f"{prefix}gru.weight_hh_l0{suffix}": (3 * h, h),
                    f"{prefix}gru.bias_ih_l0{suffix}": (3 * h,), f"{prefix}gru.bias_hh_l0{suffix}": (3 * h,)})
    return out


def batchnorm_layout(prefix: str, size: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}weight": (size,), f"{prefix}bias": (size,), f"{prefix}running_mean": (size,),
            f"{prefix}running_var": (size,), f"{prefix}num_batches_tracked": ()}


def image_layout(embed: int, img_dim: int) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of the official EncoderImageAggr (basic): fc, the 2-layer MLP with its two BatchNorms, GPO."""
    half = embed // 2
    return {"fc.weight": (embed, img_dim), "fc.bias": (embed,),
            "mlp.layers.0.weight": (half, img_dim), "mlp.layers.0.bias": (half,),
            "mlp.layers.1.weight": (embed, half), "mlp.layers.1.bias": (embed,),
            **batchnorm_layout("mlp.bns.0.", half), **batchnorm_layout("mlp.bns.1.", embed), **gpo_layout()}


def _pop_position_ids(txt: dict[str, torch.Tensor], where: str) -> None:
    ids = txt.pop("bert.embeddings.position_ids", None)
    if ids is not None and not torch.equal(ids.reshape(-1).long(), torch.arange(ids.numel())):
        raise CheckpointError(f"{where}: bert.embeddings.position_ids is not 0, 1, 2, ...;"
                              " not a BERT this importer knows")


def _bert_layout(path: Path, embed: int) -> dict[str, tuple[int, ...]]:
    """The official BERT text encoder's keys: our BERT's (from the local config) plus its pooler, linear, GPO."""
    from itmkit_bert.stages import load_bert

    bert = load_bert(str(path), pretrained=False)
    hidden = bert.config.hidden_size
    layout = {f"bert.{k}": tuple(v.shape) for k, v in bert.state_dict().items()}
    layout.update({"bert.pooler.dense.weight": (hidden, hidden), "bert.pooler.dense.bias": (hidden,),
                   "linear.weight": (embed, hidden), "linear.bias": (embed,), **gpo_layout()})
    return layout


def _variant(txt: dict[str, torch.Tensor], where: str) -> str:
    if "embed.weight" in txt:
        return "bigru"
    if any(k.startswith("bert.") for k in txt):
        return "bert"
    raise CheckpointError(f"{where}: model[1] (txt_enc) has neither embed.weight (bigru branch) nor bert.* keys"
                          " (master branch); not a VSE-infinity text encoder")


def convert(official: OfficialCheckpoint, vocab: Vocabulary | ModelDirectory) -> Converted:
    """Map VSE-infinity's options to a recipe and its img_enc / txt_enc weights to the gpo stages."""
    where = f"{official.path} (VSE-infinity options)"
    opts = official.options
    if len(official.modules) != 2:
        raise CheckpointError(f"{official.path}: a VSE-infinity checkpoint's 'model' holds 2 state dicts"
                              f" [img_enc, txt_enc], this one holds {len(official.modules)}")
    encoder_type = option(opts, "precomp_enc_type", where, str)
    if encoder_type != "basic":
        raise CheckpointError(f"{where}: precomp_enc_type={encoder_type!r}; only region-feature models ('basic')"
                              " import: the grid models ('backbone') run a CNN on raw images, which itmkit has no"
                              " stage for")
    embed, img_dim = option(opts, "embed_size", where, int), option(opts, "img_dim", where, int)
    unnormalised = [k for k in ("no_imgnorm", "no_txtnorm") if option(opts, k, where, bool, False)]
    if unnormalised:
        raise CheckpointError(f"{where}: {' and '.join(unnormalised)} set: the official score is then a dot product of"
                              " unnormalised vectors, which core.cosine does not compute")
    img, txt = dict(official.modules[0]), dict(official.modules[1])
    variant = _variant(txt, official.path)

    check_state(img, image_layout(embed, img_dim), f"{official.path}: model[0] (img_enc)")
    state = {
        "image.encoder.fc.weight": img["fc.weight"], "image.encoder.fc.bias": img["fc.bias"],
        "image.encoder.mlp.0.weight": img["mlp.layers.0.weight"], "image.encoder.mlp.0.bias": img["mlp.layers.0.bias"],
        "image.encoder.mlp.3.weight": img["mlp.layers.1.weight"], "image.encoder.mlp.3.bias": img["mlp.layers.1.bias"],
        **{f"image.encoder.mlp.1.{k}": img[f"mlp.bns.0.{k}"]
           for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")},
        **{f"image.pool.{k[len('gpool.'):]}": v for k, v in img.items() if k.startswith("gpool.")},
    }

    if variant == "bigru":
        if isinstance(vocab, ModelDirectory):
            raise CheckpointError(f"{official.path}: a BiGRU checkpoint (bigru branch) reads the SCAN vocabulary:"
                                  " pass vocab/{f30k,coco}_precomp_vocab.json as --vocab,"
                                  f" not the directory {vocab.path}")
        word_dim, layers = option(opts, "word_dim", where, int), option(opts, "num_layers", where, int, 1)
        size = len(vocab) + (vocab.mask_id is None)  # the official code appends <mask>
        rows = txt["embed.weight"].shape[0] if txt["embed.weight"].dim() == 2 else None
        if rows != size:
            raise CheckpointError(
                f"{official.path}: the vocabulary has {len(vocab)} words, so with <mask> appended {size}, but the"
                f" checkpoint's word embedding (txt_enc embed.weight) has {rows} rows; pass the SCAN vocabulary the"
                " model was trained with (F30K 8481 words, COCO 11353)")
        if option(opts, "vocab_size", where, int, None) not in (None, size):
            raise CheckpointError(f"{official.path}: the options say vocab_size={opts['vocab_size']}, the vocabulary"
                                  f" with <mask> has {size} words; pass the vocabulary the model was trained with")
        check_state(txt, {**gru_text_layout(size, word_dim, embed, layers, True), **gpo_layout()},
                    f"{official.path}: model[1] (txt_enc)")
        state.update({f"text.encoder.{k}": v for k, v in txt.items() if not k.startswith("gpool.")})
        encoder: dict[str, Any] = {"stage": "gpo.bigru", "word_dim": word_dim, "num_layers": layers,
                                   "bidirectional": True, "normalize": False}
        data = DataPorts(feature_dim=img_dim, vocab_size=size)
    else:
        if not isinstance(vocab, ModelDirectory):
            raise CheckpointError(f"{official.path}: a BERT checkpoint (master branch) tokenises with BERT's WordPiece:"
                                  " pass the local bert-base-uncased directory (config.json, vocab.txt) as --vocab")
        _pop_position_ids(txt, official.path)
        check_state(txt, _bert_layout(vocab.path, embed), f"{official.path}: model[1] (txt_enc)")
        state.update({f"text.encoder.{k}": v for k, v in txt.items()
                      if k.startswith(("bert.", "linear.")) and not k.startswith("bert.pooler.")})
        encoder = {"stage": "gpo.bert", "path": str(vocab.path.expanduser().resolve()), "lr_scale": 0.1,
                   "normalize": False}
        data = DataPorts(feature_dim=img_dim, vocab_size=len(WordPieceVocabulary.load(str(vocab.path))))
    state.update({f"text.pool.{k[len('gpool.'):]}": v for k, v in txt.items() if k.startswith("gpool.")})
    state = {k: v.detach().contiguous() if k.endswith("num_batches_tracked") else v.detach().float().contiguous()
             for k, v in state.items()}
    training = training_options(opts, TRAIN_DEFAULTS, where)
    return Converted(tomli_w.dumps(_recipe(official, variant, encoder, embed, training.loss, training.train, where)),
                     state, data, training.notes)


def _recipe(official: OfficialCheckpoint, variant: str, encoder: dict[str, Any], embed: int, loss: dict[str, Any],
            train: dict[str, Any], where: str) -> dict[str, Any]:
    data_name = option(official.options, "data_name", where, str, "f30k")
    coco = "coco" in data_name
    short = "coco" if coco else "f30k"
    return {
        "recipe": {"name": f"gpo-{short}-{variant}-imported", "embed_dim": embed,
                   "description": f"official VSE-infinity checkpoint {official.path} (epoch {official.epoch},"
                                  f" best dev rsum {official.best_rsum}), converted by itmkit import gpo"},
        "image": {"encoder": {"stage": "gpo.precomp", "drop_prob": 0.2},
                  "pool": {"stage": "gpo.pool", "normalize": True}},
        "text": {"encoder": encoder, "pool": {"stage": "gpo.pool", "normalize": True}},
        "match": [{"similarity": {"stage": "core.cosine"}}],
        # The official loop turns max_violation on from epoch vse_mean_warmup_epochs on, whatever the flag.
        "loss": {"stage": "core.triplet", "max_violation": True, **loss},
        "data": {"path": f"data/{short}_precomp", "protocol": "coco-1k-5fold" if coco else "f30k-1k",
                 "test_split": "testall" if coco else "test"},
        "train": {**train, "optimizer": "adamw", "weight_decay": 1e-4 if variant == "bert" else 0.01},
    }
