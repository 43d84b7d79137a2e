"""Convert an official MTFN checkpoint (Wangt-CN/MTFN-RR-PyTorch-Code ``model_best.pth.tar``) into an itmkit model.

train.py saves ``{'epoch', 'arch', 'model': model.state_dict(), 'best_rsum', 'opt': argparse Namespace,
'options': the yaml's nested dict, 'Eiters'}``; ``itmkit.importing.read_official`` reads it (the single
state dict, the Namespace as ``options``, the nested dict in ``entries['options']``). The model's
layers come from ``options['model']``: ``fusion`` (dim_v, dim_t, dim_hv, dim_ht, dim_mm, R, the
dropouts, activation_* only when set), ``seq2vec`` (arch skipthoughts, type BayesianUniSkip, dropout,
fixed_emb) and ``classif`` (dropout, activation only when set). The keys map to our stages:

    seq2vec.embedding.weight (V + 1, 620), row 0 padding   -> text.encoder.embedding.weight, rows permuted
    seq2vec.rnn.gru_cell.weight_i{r,i,n}.{weight,bias}      -> text.encoder.gru.{weight,bias}_ih_l0 (r, z, n)
    seq2vec.rnn.gru_cell.weight_h{r,i,n}.weight (no bias)   -> text.encoder.gru.weight_hh_l0; bias_hh_l0 = 0
    fusion.linear_v / linear_t                              -> F.linear_v / linear_t
    fusion.list_linear_hv.{r} / list_linear_ht.{r}         -> F.linear_hv / linear_ht, rows r*dim_mm.. stacked
    linear_classif                                          -> F.linear_classif          (F = branches.0.stages.0)

``--vocab`` is the repository's vocabulary JSON (vocab/{flickr30k,coco}_splits_vocab.json): ``word2idx``
numbers the words from 1 (0 is the padding row) and has ``<unk>``, no <pad>/<start>/<end>. The itmkit
vocabulary keeps the words in that order after its four specials, and the embedding rows follow.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import tomli_w
import torch

from itmkit.build import DataPorts
from itmkit.data.vocab import Vocabulary
from itmkit.errors import CheckpointError, did_you_mean
from itmkit.importing import Converted, OfficialCheckpoint, VocabularyFile, check_state, option, training_options
from itmkit_mtfn.stages import ACTIVATIONS

# train.py's argparse defaults, used when an option is absent (the yaml's optim.batch_size is not read)
TRAIN_DEFAULTS = {"num_epochs": 120, "batch_size": 128}
DEFAULT_LR = 1e-4  # option/FusionNoattn_baseline.yaml optim.lr
FUSION = "branches.0.stages.0."
GATES = ("r", "i", "n")  # the official gate names; nn.GRU stacks them as r, z, n
PROTOCOLS = {"coco": ("coco-1k-5fold", "testall"), "f30k": ("f30k-1k", "test")}


def schedule(lr: float, epochs: int) -> list[dict[str, Any]]:
    """train.py's adjust_learning_rate as [[train.phase]] tables: lr/10 * (epoch // 8 + 4) below epoch 50,
    lr up to 100, lr / 10 after (only the phases that start before ``epochs``)."""
    phases = [{"name": f"warm-up {k + 4}/10 lr", "epochs": 8, "lr": lr / 10 * (k + 4)} for k in range(6)]
    phases += [{"name": "lr", "epochs": 52, "lr": lr}, {"name": "lr / 10", "epochs": 1, "lr": lr / 10}]
    kept, start = [], 0
    for phase in phases:  # epochs 0-47 warm up (48-49 are already at lr), 48-99 lr, 100- lr / 10
        if start >= epochs:
            break
        kept.append(phase)
        start += phase["epochs"]
    return kept


def read_vocabulary(path) -> tuple[Vocabulary, list[int]]:
    """The MTFN vocabulary JSON as an itmkit Vocabulary, and for each of its rows the official embedding row."""
    where = f"vocabulary file {path}"
    try:
        obj = json.loads(path.read_text(encoding="utf-8-sig"))
    except OSError as exc:
        raise CheckpointError(f"cannot read the {where}: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{where} is not valid JSON ({exc}); expected MTFN's vocab/*_splits_vocab.json") from None
    if not isinstance(obj, Mapping) or not isinstance(obj.get("word2idx"), Mapping):
        keys = sorted(map(str, obj))[:6] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{where}: expected a JSON object with a 'word2idx' object (MTFN's vocab/*_splits_vocab"
                              f".json: word -> id from 1), found {keys}")
    word2idx = obj["word2idx"]
    for word, index in word2idx.items():
        if isinstance(index, bool) or not isinstance(index, int):
            raise CheckpointError(f"{where}: word2idx[{word!r}] is {index!r:.40}; expected an integer id from 1")
    size = len(word2idx)
    if sorted(word2idx.values()) != list(range(1, size + 1)):
        odd = sorted(set(word2idx.values()) - set(range(1, size + 1)))[:5]
        raise CheckpointError(f"{where}: word2idx must number its {size} words 1..{size} once each (0 is the padding"
                              f" row); found ids such as {odd or 'repeated ones'}")
    if Vocabulary.UNK not in word2idx:
        raise CheckpointError(f"{where}: word2idx has no {Vocabulary.UNK!r}, which MTFN maps unknown words to"
                              + did_you_mean(Vocabulary.UNK, list(word2idx)[:2000]))
    reserved = [w for w in (Vocabulary.PAD, Vocabulary.START, Vocabulary.END) if w in word2idx]
    if reserved:
        raise CheckpointError(f"{where}: word2idx holds {reserved}, which MTFN's vocabulary never has (its tokens"
                              " come from NLTK, which splits '<pad>' into '<', 'pad', '>'); is this MTFN's vocabulary?")
    idx2word = obj.get("idx2word")
    if isinstance(idx2word, Mapping):
        for word, index in word2idx.items():
            if idx2word.get(str(index), word) != word:
                raise CheckpointError(f"{where}: idx2word[{str(index)!r}] is {idx2word[str(index)]!r} but"
                                      f" word2idx[{word!r}] is {index}; the two maps must be inverses")
    ordered = sorted(word2idx, key=word2idx.__getitem__)
    words = [w for w in ordered if w != Vocabulary.UNK]
    rows = [0, -1, -1, word2idx[Vocabulary.UNK], *(word2idx[w] for w in words)]  # -1: <start>/<end>, never read
    return Vocabulary([*Vocabulary.SPECIALS, *words]), rows


def _mapping(value: Any, where: str, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise CheckpointError(f"{where}: {name} is {type(value).__name__}; expected a dict of options"
                              " (option/FusionNoattn_baseline.yaml)")
    return value


def _activation(options: Mapping[str, Any], key: str, where: str) -> str:
    """An optional activation option (the official code applies F.<name> only when the key is set)."""
    if key not in options:
        return "none"
    name = options[key]
    if name not in ACTIVATIONS[1:]:
        raise CheckpointError(f"{where}: option {key}={name!r:.40} is not an activation itmkit knows (one of"
                              f" {', '.join(ACTIVATIONS[1:])})"
                              + (did_you_mean(name, ACTIVATIONS) if isinstance(name, str) else ""))
    return name


def model_options(official: OfficialCheckpoint) -> tuple[dict[str, Any], dict[str, Any], Mapping[str, Any]]:
    """(the mtfn.fusion fields, the mtfn.skipthoughts fields, the whole options dict), checked."""
    where = f"{official.path} (MTFN options)"
    if "options" not in official.entries:
        raise CheckpointError(f"{official.path}: no 'options' entry; MTFN's train.py saves the model options (the"
                              " yaml's dict) there" + did_you_mean("options", list(official.entries)))
    options = _mapping(official.entries["options"], where, "'options'")
    model = _mapping(options.get("model"), where, "options['model']")
    fusion = _mapping(model.get("fusion"), where, "options['model']['fusion']")
    seq2vec = _mapping(model.get("seq2vec"), where, "options['model']['seq2vec']")
    classif = _mapping(model.get("classif"), where, "options['model']['classif']")
    arch = option(seq2vec, "arch", f"{where} seq2vec", str, "skipthoughts")
    kind = option(seq2vec, "type", f"{where} seq2vec", str, "BayesianUniSkip")
    if arch != "skipthoughts" or kind != "BayesianUniSkip":
        raise CheckpointError(f"{where}: seq2vec is {arch} / {kind}; itmkit imports the skip-thoughts"
                              " BayesianUniSkip encoder of the official configuration")
    text = {"dropout": option(seq2vec, "dropout", f"{where} seq2vec", float, 0.25),
            "freeze_embedding": option(seq2vec, "fixed_emb", f"{where} seq2vec", bool, False)}
    head = {"rank": option(fusion, "R", f"{where} fusion", int),
            "dim_hv": option(fusion, "dim_hv", f"{where} fusion", int),
            "dim_ht": option(fusion, "dim_ht", f"{where} fusion", int),
            "dim_mm": option(fusion, "dim_mm", f"{where} fusion", int)}
    for key in ("v", "t", "hv", "ht"):
        head[f"dropout_{key}"] = option(fusion, f"dropout_{key}", f"{where} fusion", float)
    for key in ("v", "t", "hv", "ht", "mm"):
        head[f"activation_{key}"] = _activation(fusion, f"activation_{key}", f"{where} fusion")
    head["classif_activation"] = _activation(classif, "activation", f"{where} classif")
    head["classif_dropout"] = option(classif, "dropout", f"{where} classif", float)
    return head, text, options


def convert(official: OfficialCheckpoint, vocab: VocabularyFile) -> Converted:
    """Map MTFN's options to a recipe and its single state dict to mtfn.skipthoughts and mtfn.fusion."""
    if not isinstance(vocab, VocabularyFile):
        raise TypeError("the mtfn importer reads the vocabulary file itself (VocabularyFile)")
    if len(official.modules) != 1:
        raise CheckpointError(f"{official.path}: an MTFN checkpoint's 'model' is one state dict, this one holds"
                              f" {len(official.modules)}")
    head, text, options = model_options(official)
    words, rows = read_vocabulary(vocab.path)
    state = dict(official.modules[0])
    emb = state.get("seq2vec.embedding.weight")
    if emb is None or emb.dim() != 2:
        found = "no such key" if emb is None else f"shape {tuple(emb.shape)}"
        raise CheckpointError(f"{official.path}: model: expected the word embedding seq2vec.embedding.weight"
                              f" (words + 1, 620), found {found}; is this an MTFN checkpoint?")
    official_words = len(words) - 3  # without <pad>, <start>, <end>
    if emb.shape[0] != official_words + 1:
        raise CheckpointError(f"{official.path}: the vocabulary {vocab.path} has {official_words} words but the"
                              f" checkpoint's word embedding (seq2vec.embedding.weight) has {emb.shape[0]} rows"
                              f" ({official_words + 1} expected: the words and the padding row); pass the vocabulary"
                              " the model was trained with")
    word_dim = emb.shape[1]
    hidden = state["seq2vec.rnn.gru_cell.weight_hr.weight"].shape[0] if torch.is_tensor(
        state.get("seq2vec.rnn.gru_cell.weight_hr.weight")) else 2400
    r, d = head["rank"], head["dim_mm"]
    where = f"{official.path} (MTFN options)"
    fusion_opts = options["model"]["fusion"]
    dim_v = option(fusion_opts, "dim_v", f"{where} fusion", int, None)
    dim_t = option(fusion_opts, "dim_t", f"{where} fusion", int, hidden)
    if dim_v is None:
        linear_v = state.get("fusion.linear_v.weight")
        dim_v = linear_v.shape[1] if torch.is_tensor(linear_v) and linear_v.dim() == 2 else 2048
    if dim_t != hidden:
        raise CheckpointError(f"{where}: fusion.dim_t = {dim_t} but the GRU state has {hidden} values")
    layout: dict[str, tuple[int, ...]] = {"seq2vec.embedding.weight": (official_words + 1, word_dim)}
    for gate in GATES:
        layout[f"seq2vec.rnn.gru_cell.weight_i{gate}.weight"] = (hidden, word_dim)
        layout[f"seq2vec.rnn.gru_cell.weight_i{gate}.bias"] = (hidden,)
        layout[f"seq2vec.rnn.gru_cell.weight_h{gate}.weight"] = (hidden, hidden)
    layout.update({"fusion.linear_v.weight": (head["dim_hv"], dim_v), "fusion.linear_v.bias": (head["dim_hv"],),
                   "fusion.linear_t.weight": (head["dim_ht"], dim_t), "fusion.linear_t.bias": (head["dim_ht"],),
                   "linear_classif.weight": (1, d), "linear_classif.bias": (1,)})
    for k in range(r):
        layout[f"fusion.list_linear_hv.{k}.weight"] = (d, head["dim_hv"])
        layout[f"fusion.list_linear_hv.{k}.bias"] = (d,)
        layout[f"fusion.list_linear_ht.{k}.weight"] = (d, head["dim_ht"])
        layout[f"fusion.list_linear_ht.{k}.bias"] = (d,)
    check_state(state, layout, f"{official.path}: model")

    cell = "seq2vec.rnn.gru_cell.weight_"
    index = torch.tensor([max(row, 0) for row in rows])
    embedding = emb[index].clone()
    embedding[1:3] = 0  # <start>, <end>: MTFN's tokenisation never produces them
    out = {
        "text.encoder.embedding.weight": embedding,
        "text.encoder.gru.weight_ih_l0": torch.cat([state[f"{cell}i{g}.weight"] for g in GATES]),
        "text.encoder.gru.bias_ih_l0": torch.cat([state[f"{cell}i{g}.bias"] for g in GATES]),
        "text.encoder.gru.weight_hh_l0": torch.cat([state[f"{cell}h{g}.weight"] for g in GATES]),
        "text.encoder.gru.bias_hh_l0": torch.zeros(3 * hidden),
    }
    for ours, theirs in (("linear_v", "fusion.linear_v"), ("linear_t", "fusion.linear_t"),
                         ("linear_classif", "linear_classif")):
        out[f"{FUSION}{ours}.weight"] = state[f"{theirs}.weight"]
        out[f"{FUSION}{ours}.bias"] = state[f"{theirs}.bias"]
    for side in ("hv", "ht"):
        for kind in ("weight", "bias"):  # the R Linears stacked: rows r * dim_mm .. = list_linear_{side}[r]
            out[f"{FUSION}linear_{side}.{kind}"] = torch.cat([state[f"fusion.list_linear_{side}.{k}.{kind}"]
                                                              for k in range(r)])
    out = {k: v.detach().float().contiguous() for k, v in out.items()}
    notes = []
    if emb[0].abs().max() > 0:
        notes.append(f"{official.path}: the padding row of seq2vec.embedding.weight is not zero; it is kept (an"
                     " all-punctuation caption reads it)")

    opts = official.options
    training = training_options(opts, TRAIN_DEFAULTS, where)
    notes += training.notes
    optim = options.get("optim") if isinstance(options.get("optim"), Mapping) else {}
    lr = optim.get("lr", DEFAULT_LR)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
        notes.append(f"{where}: optim.lr={lr!r:.40} is not a learning rate; the recipe has {DEFAULT_LR}")
        lr = DEFAULT_LR
    epochs = training.train.get("epochs", TRAIN_DEFAULTS["num_epochs"])
    data_name = option(opts, "data_name", where, str, "flickr30k_splits")
    short = "coco" if "coco" in data_name else "f30k"
    protocol, test_split = PROTOCOLS[short]
    recipe = {
        "recipe": {"name": f"mtfn-{short}-imported", "embed_dim": head["dim_mm"],
                   "description": f"official MTFN checkpoint {official.path} (epoch {official.epoch}, best dev rsum"
                                  f" {official.best_rsum}), converted by itmkit import mtfn"},
        "image": {"encoder": {"stage": "core.raw"}, "pool": {"stage": "core.mean"}},
        "text": {"encoder": {"stage": "mtfn.skipthoughts", "word_dim": word_dim, "hidden_dim": hidden, **text},
                 "pool": {"stage": "core.last"}},
        "match": [{"similarity": {"stage": "mtfn.fusion", **head}}],
        "loss": {"stage": "core.triplet", "margin": 0.2, "max_violation": True},
        "data": {"path": f"data/{short}_precomp", "protocol": protocol, "test_split": test_split},
        "train": {**training.train, "lr": float(lr), "lr_decay": 1.0, "optimizer": "adam", "grad_clip": 0.0,
                  "phase": schedule(float(lr), epochs)},
    }
    data = DataPorts(feature_dim=dim_v, vocab_size=len(words))
    return Converted(tomli_w.dumps(recipe), out, data, tuple(notes), vocab=words)
