"""Convert an official DIME checkpoint (LgQu/DIME ``model_best.pth.tar``) into an itmkit model.

The released files ({Flickr30K,MSCOCO}_DIME_{it,ti}.pth.tar) are ``{'epoch', 'model': [img_enc,
txt_enc, itr_module], 'best_rsum', 'best_r1', 'opt', 'Eiters'}``, read by
``itmkit.importing.read_official``. ``--vocab`` is the local Hugging Face directory of the BERT the
model was trained with (bert-base-uncased: config.json, vocab.txt; its tokenizer encodes the
captions). The keys map to our stages (B = branches.0.stages.0, the dime.interaction stage):

    img_enc  fc.{weight [E, F], bias}                     -> image.encoder.fc.*            (core.precomp)
             bn.* (BatchNorm1d(E))                        -> image.pool.bn.*  (t2i; i2t never applies it:
                                                             checked and left out, said in the notes)
    txt_enc  bert.* (the frozen BERT, stored)             -> text.encoder.bert.bert.*       (dime.bert)
             bert.pooler.* (never used by the forward)    -> left out, said in the notes
             fc, convs1.{0,1,2} [E, 1, K, H], mapping     -> B.text_head.{fc, convs.{0,1,2}, mapping}
    itr      dynamic_itr_l{k}.{ric,glgc,imrc,cmrc}.router.mlp.{0,2}
                                                          -> B.interaction.layers.{k}.<cell>.router.mlp.*
             dynamic_itr_l{k}.glgc.fc_{1,2}               -> B.interaction.layers.{k}.glgc.fc_{1,2}
             dynamic_itr_l{k}.imrc.sa.att_layer.linears.{0,1,2}
                                                          -> B.interaction.layers.{k}.imrc.{query,key,value}
             dynamic_itr_l{k}.imrc.sa.feed_forward_layer.fc{1,2}
                                                          -> B.interaction.layers.{k}.imrc.fc{1,2}
             dynamic_itr_l{k}.cmrc.refine.{fc_scale,fc_shift,fc_1,fc_2}
                                                          -> B.interaction.layers.{k}.cmrc.*
             path_mapping [P, 36]                         -> B.path_mapping
             bn (BatchNorm1d(E), the score head)          -> B.head.bn

The stored BERT weights are the ones the model scores with (BERT is frozen, so they should equal
the pretrained ones): they are loaded, and compared with the directory's own weights when it has
some; a difference is reported (the directory then probably holds another BERT, whose tokenizer
may differ too). The official BERT.py names its parameters as Hugging Face does (LayerNorm.weight /
bias); a checkpoint with gamma / beta names is accepted too.
"""

from __future__ import annotations

from typing import Any

import tomli_w
import torch

from itmkit.build import DataPorts
from itmkit.errors import CheckpointError, did_you_mean
from itmkit.importing import Converted, ModelDirectory, OfficialCheckpoint, check_state, option, training_options
from itmkit_bert.vocab import WordPieceVocabulary
from itmkit_dime.modules import RAW_NORMS, TOTAL_PATHS

# train.py's defaults, used when an option is absent
TRAIN_DEFAULTS = {"margin": 0.2, "max_violation": True, "num_epochs": 30, "batch_size": 32, "learning_rate": 2e-4,
                  "lr_update": 15, "grad_clip": 2.0}
CELLS = ("ric", "glgc", "imrc", "cmrc")
WIDTHS = (1, 2, 3)  # TextNet's Ks, hard-coded
BRANCH = "branches.0.stages.0."
BN_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
PROTOCOLS = {"coco": ("coco-1k-5fold", "testall"), "f30k": ("f30k-1k", "test")}


def interaction_keys(embed: int, paths: int, hid_router: int, hid_imrc: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Official itr_module key -> (our key under the branch stage, shape)."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}

    def linear(theirs: str, ours: str, rows: int, cols: int) -> None:
        out[f"{theirs}.weight"] = (f"{ours}.weight", (rows, cols))
        out[f"{theirs}.bias"] = (f"{ours}.bias", (rows,))

    for k in range(3):
        src, dst = f"dynamic_itr_l{k}", f"interaction.layers.{k}"
        width = 1 if k == 2 else 4
        for cell in CELLS:
            linear(f"{src}.{cell}.router.mlp.0", f"{dst}.{cell}.router.mlp.0", hid_router, embed)
            linear(f"{src}.{cell}.router.mlp.2", f"{dst}.{cell}.router.mlp.2", width, hid_router)
        for name in ("fc_1", "fc_2"):
            linear(f"{src}.glgc.{name}", f"{dst}.glgc.{name}", embed, embed)
        for i, name in enumerate(("query", "key", "value")):
            linear(f"{src}.imrc.sa.att_layer.linears.{i}", f"{dst}.imrc.{name}", embed, embed)
        linear(f"{src}.imrc.sa.feed_forward_layer.fc1", f"{dst}.imrc.fc1", hid_imrc, embed)
        linear(f"{src}.imrc.sa.feed_forward_layer.fc2", f"{dst}.imrc.fc2", embed, hid_imrc)
        for name in ("fc_scale", "fc_shift", "fc_1", "fc_2"):
            linear(f"{src}.cmrc.refine.{name}", f"{dst}.cmrc.{name}", embed, embed)
    linear("path_mapping", "path_mapping", paths, TOTAL_PATHS)
    for key in BN_KEYS:
        out[f"bn.{key}"] = (f"head.bn.{key}", () if key == "num_batches_tracked" else (embed,))
    return out


def text_keys(embed: int, hidden: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Official txt_enc head key -> (our key under the branch stage, shape)."""
    out = {"fc.weight": ("text_head.fc.weight", (embed, hidden)), "fc.bias": ("text_head.fc.bias", (embed,)),
           "mapping.weight": ("text_head.mapping.weight", (embed, len(WIDTHS) * embed)),
           "mapping.bias": ("text_head.mapping.bias", (embed,))}
    for i, k in enumerate(WIDTHS):
        out[f"convs1.{i}.weight"] = (f"text_head.convs.{i}.weight", (embed, 1, k, hidden))
        out[f"convs1.{i}.bias"] = (f"text_head.convs.{i}.bias", (embed,))
    return out


def hf_bert_name(name: str) -> str:
    """A BERT parameter name with pytorch-pretrained-bert's LayerNorm gamma / beta as Hugging Face's weight / bias."""
    return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def _bert_weights(txt: dict[str, torch.Tensor], bert: torch.nn.Module, where: str) -> tuple[dict, dict]:
    """(the stored BERT's weights by our name, the text head's keys) from txt_enc; every key checked."""
    hidden = bert.config.hidden_size
    stored, head = {}, {}
    for key, value in txt.items():
        if key.startswith("bert."):
            name = hf_bert_name(key[len("bert."):])
            if name.endswith(("position_ids", "token_type_ids")):
                continue  # buffers of newer BERT code, no weights
            stored[name] = value
        else:
            head[key] = value
    expected = {k: tuple(v.shape) for k, v in bert.state_dict().items()
                if not k.endswith(("position_ids", "token_type_ids"))}
    expected.update({"pooler.dense.weight": (hidden, hidden), "pooler.dense.bias": (hidden,)})
    check_state({k: v for k, v in stored.items()}, expected, f"{where}: the stored BERT (bert.*)")
    return {k: v for k, v in stored.items() if not k.startswith("pooler.")}, head


def _compare_with_directory(stored: dict[str, torch.Tensor], folder, where: str) -> tuple[str, ...]:
    """A note when the stored frozen BERT differs from the directory's weights (or the directory has none)."""
    from itmkit_bert.stages import load_bert

    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        return (f"{where}: {folder} holds no BERT weights to compare with; the checkpoint's stored BERT is used",)
    try:
        pretrained = load_bert(str(folder), pretrained=True).state_dict()
    except Exception as exc:  # advice only: a directory whose weights do not load is reported, not fatal
        return (f"{where}: the BERT weights in {folder} could not be read for comparison ({exc}); the checkpoint's"
                " stored BERT is used",)
    worst, name = 0.0, ""
    for key, value in pretrained.items():
        mine = stored.get(key)
        if mine is None or mine.shape != value.shape or not value.is_floating_point() or not value.numel():
            continue
        diff = float((mine.float() - value.float()).abs().max())
        if diff > worst:
            worst, name = diff, key
    if worst > 1e-6:
        return (f"{where}: the checkpoint's frozen BERT differs from the weights in {folder} (largest difference"
                f" {worst:.3g}, in {name}); the stored weights are used, but check that --vocab names the BERT the"
                " model was trained with: its tokenizer encodes the captions",)
    return ()


def convert(official: OfficialCheckpoint, vocab: ModelDirectory) -> Converted:
    """Map DIME's options to a recipe and its img_enc / txt_enc / itr_module weights to the dime stages."""
    from itmkit_bert.stages import load_bert

    where = f"{official.path} (DIME options)"
    opts = official.options
    if not isinstance(vocab, ModelDirectory):
        raise CheckpointError(f"{official.path}: DIME tokenises with BERT's WordPiece: pass the local directory of"
                              " the BERT it was trained with (config.json, vocab.txt; bert-base-uncased) as --vocab")
    if len(official.modules) != 3:
        raise CheckpointError(f"{official.path}: a DIME checkpoint's 'model' holds 3 state dicts [img_enc, txt_enc,"
                              f" itr_module], this one holds {len(official.modules)}"
                              + (" (SAEM's layout? try `itmkit import saem`)" if len(official.modules) == 2 else ""))
    direction = option(opts, "direction", where, str)
    if direction not in ("i2t", "t2i"):
        raise CheckpointError(f"{where}: option direction={direction!r} is not i2t or t2i"
                              + did_you_mean(direction, ("i2t", "t2i")))
    raw_norm = option(opts, "raw_feature_norm_CMRC", where, str, "clipped_l2norm")
    if raw_norm not in RAW_NORMS:
        raise CheckpointError(f"{where}: option raw_feature_norm_CMRC={raw_norm!r} is not supported (the official"
                              f" l1norm variants call an undefined function)" + did_you_mean(raw_norm, RAW_NORMS))
    embed = option(opts, "embed_size", where, int)
    img_dim = option(opts, "img_dim", where, int)
    heads = option(opts, "num_head_IMRC", where, int, 16)
    hid_imrc = option(opts, "hid_IMRC", where, int, 512)
    hid_router = option(opts, "hid_router", where, int, 512)
    lambda_softmax = option(opts, "lambda_softmax_CMRC", where, float, 4.0)
    max_words = option(opts, "max_words", where, int, 32)
    trade_off = option(opts, "trade_off", where, float, 0.5)
    extra_stc = option(opts, "extra_stc", where, int, 0)
    extra_img = option(opts, "extra_img", where, int, 0)
    if embed % heads:
        raise CheckpointError(f"{where}: embed_size={embed} is not a multiple of num_head_IMRC={heads}")
    if lambda_softmax <= 0 or trade_off < 0:
        raise CheckpointError(f"{where}: lambda_softmax_CMRC={lambda_softmax} must be > 0 and trade_off={trade_off}"
                              " >= 0")
    img, txt, itr = (dict(m) for m in official.modules)
    notes: list[str] = []

    # image encoder
    image_layout = {"fc.weight": (embed, img_dim), "fc.bias": (embed,)}
    image_layout.update({f"bn.{k}": () if k == "num_batches_tracked" else (embed,) for k in BN_KEYS})
    check_state(img, image_layout, f"{official.path}: model[0] (img_enc)")
    state = {"image.encoder.fc.weight": img["fc.weight"], "image.encoder.fc.bias": img["fc.bias"]}
    if direction == "t2i":
        state.update({f"image.pool.bn.{k}": img[f"bn.{k}"] for k in BN_KEYS})
    else:
        notes.append(f"{official.path}: img_enc.bn is only applied in direction t2i; this i2t model never reads it"
                     " (checked and left out)")

    # text: the frozen BERT and DIME's head
    bert = load_bert(str(vocab.path), pretrained=False)
    hidden = bert.config.hidden_size
    positions = bert.config.max_position_embeddings
    if not 2 <= max_words <= positions:
        raise CheckpointError(f"{where}: max_words={max_words} does not fit the {positions} positions of the BERT"
                              f" in {vocab.path}")
    stored, head = _bert_weights(txt, bert, f"{official.path}: model[1] (txt_enc)")
    head_keys = text_keys(embed, hidden)
    check_state(head, {k: shape for k, (_, shape) in head_keys.items()}, f"{official.path}: model[1] (txt_enc) head")
    state.update({f"text.encoder.bert.{k}": v for k, v in stored.items()})
    state.update({BRANCH + ours: head[theirs] for theirs, (ours, _) in head_keys.items()})
    notes.append(f"{official.path}: txt_enc.bert.pooler is never used by the official forward (checked and left out)")
    notes += _compare_with_directory(stored, vocab.path.expanduser(), f"{official.path}: model[1] (txt_enc)")

    # interaction module
    mapping = itr.get("path_mapping.weight")
    paths = mapping.shape[0] if mapping is not None and mapping.dim() == 2 else 128
    keys = interaction_keys(embed, paths, hid_router, hid_imrc)
    check_state(itr, {k: shape for k, (_, shape) in keys.items()}, f"{official.path}: model[2] (itr_module)")
    state.update({BRANCH + ours: itr[theirs] for theirs, (ours, _) in keys.items()})
    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).contiguous() for k, v in state.items()}
    if trade_off == 0:  # our stage builds no path mapping without a path loss
        state = {k: v for k, v in state.items() if not k.startswith(BRANCH + "path_mapping.")}

    training = training_options(opts, TRAIN_DEFAULTS, where)
    notes += training.notes
    train = {**training.train, "optimizer": "adam"}
    if extra_stc:
        train["extra_captions"] = extra_stc
    if extra_img:
        train["extra_images"] = extra_img
    data_name = option(opts, "data_name", where, str, "f30k_precomp")
    short = "coco" if "coco" in data_name else "f30k"
    protocol, test_split = PROTOCOLS[short]
    similarity: dict[str, Any] = {"stage": "dime.interaction", "direction": direction, "lambda_softmax": lambda_softmax,
                                  "raw_feature_norm": raw_norm, "heads": heads, "hid_imrc": hid_imrc,
                                  "hid_router": hid_router, "path_hid": paths, "path_weight": trade_off}
    image_table: dict[str, Any] = {"encoder": {"stage": "core.precomp", "normalize": False}}
    if direction == "t2i":
        image_table["pool"] = {"stage": "dime.image_pool", "batchnorm": True}
    recipe = {
        "recipe": {"name": f"dime-{short}-{direction}-imported", "embed_dim": embed,
                   "description": f"official DIME checkpoint {official.path} (epoch {official.epoch}, best dev rsum"
                                  f" {official.best_rsum}), converted by itmkit import dime"},
        "image": image_table,
        "text": {"encoder": {"stage": "dime.bert", "path": str(vocab.path.expanduser().resolve()),
                             "max_words": max_words}},
        "match": [{"similarity": similarity}],
        "loss": {"stage": "core.triplet", **training.loss},
        "data": {"path": f"data/{short}_precomp", "protocol": protocol, "test_split": test_split},
        "train": train,
    }
    data = DataPorts(feature_dim=img_dim, vocab_size=len(WordPieceVocabulary.load(str(vocab.path))))
    return Converted(tomli_w.dumps(recipe), state, data, tuple(notes))
