"""The papers' own code, imported from a local clone at run time, for the benchmarks to time against.

Nothing of it is copied into this project: a file of the clone is read, the fixes current PyTorch and
Python 3 need are applied to its text in memory (each with the reason, and refused if the text is not
there: another version of the file), and it is executed as a module. The imports it makes of its own
repository's modules can be given as ready modules (``stubs``), so that only what is timed is loaded.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

# A fix: (the official text, what replaces it, why); ``count`` 0 replaces every occurrence.
Fix = tuple[str, str, str]

SLICE = "a float slice index in Python 3"
SCAN_MODEL_FIXES: tuple[Fix, ...] = (
    ("cap_emb[:,:,:cap_emb.size(2)/2] + cap_emb[:,:,cap_emb.size(2)/2:]",
     "cap_emb[:,:,:cap_emb.size(2)//2] + cap_emb[:,:,cap_emb.size(2)//2:]", SLICE),
    ("loss.data[0]", "loss.item()", "a 0-d tensor cannot be indexed"),
)
SCAN_EVALUATION_FIXES: tuple[Fix, ...] = (
    ("(len(images)-1)/shard_size + 1", "(len(images)-1)//shard_size + 1", "a float range bound in Python 3"),
    ("(len(captions)-1)/shard_size + 1", "(len(captions)-1)//shard_size + 1", "a float range bound in Python 3"),
    ("volatile=True).cuda()", "volatile=True)", "no GPU here: the same loop on the CPU"),
)
SGRAF_MODEL_FIXES: tuple[Fix, ...] = (
    ("cap_emb[:, :, :cap_emb.size(2)/2] + cap_emb[:, :, cap_emb.size(2)/2:]",
     "cap_emb[:, :, :cap_emb.size(2)//2] + cap_emb[:, :, cap_emb.size(2)//2:]", SLICE),
    ("        if torch.cuda.is_available():\n            I = mask.cuda()\n",
     "        I = mask.cuda() if torch.cuda.is_available() else mask\n",
     "the loss's diagonal mask is defined only on CUDA"),
)
SGRAF_EVALUATION_FIXES: tuple[Fix, ...] = (
    (".float().cuda()", ".float()", "no GPU here: the same loop on the CPU"),
)
# IMRAM's model.py runs unchanged on current PyTorch for what is timed (its scores); evaluation.py needs:
IMRAM_EVALUATION_FIXES: tuple[Fix, ...] = (
    ("]).cuda()", "])", "no GPU here: the same loop on the CPU"),
)


def import_file(clone: Path, filename: str, name: str, fixes: tuple[Fix, ...], repository: str,
                stubs: dict[str, types.ModuleType] | None = None) -> types.ModuleType:
    """``clone/filename`` executed as module ``name`` with ``fixes`` applied to its text (every occurrence).

    ``stubs`` are put in ``sys.modules`` first, for the file's imports of its own repository's modules.
    """
    path = Path(clone) / filename
    if not path.is_file():
        raise SystemExit(f"--official {clone}: no {filename} there; give a clone of {repository}")
    source = path.read_text()
    for old, new, why in fixes:
        if old not in source:
            raise SystemExit(f"{path}: expected {old!r} ({why}); is this {repository}'s {filename}?")
        source = source.replace(old, new)
    for stub_name, module in (stubs or {}).items():
        sys.modules[stub_name] = module
    module = types.ModuleType(name)
    module.__file__ = str(path)
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module


def empty_module(name: str, **attributes) -> types.ModuleType:
    """A module holding only ``attributes``: what an official file imports and the benchmark never calls."""
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


def torchvision_stub() -> dict[str, types.ModuleType]:
    """torchvision, which SCAN's and IMRAM's model.py import for raw-image encoders only."""
    vision = empty_module("torchvision")
    vision.models = empty_module("torchvision.models")
    return {"torchvision": vision, "torchvision.models": vision.models}


def evaluation_stubs(model: types.ModuleType) -> dict[str, types.ModuleType]:
    """An evaluation.py's imports of its repository: ``model`` (the official model.py), data and vocab
    (loaders of the datasets, never called by a benchmark that gives the loops its own arrays)."""
    unused = lambda *args, **kwargs: None  # noqa: E731 - imported by evaluation.py, never called here
    return {"model": model, "data": empty_module("data", get_test_loader=unused),
            "vocab": empty_module("vocab", Vocabulary=object, deserialize_vocab=unused)}


def scan_model(clone: Path) -> types.ModuleType:
    """kuanghuei/SCAN's model.py (torchvision stubbed)."""
    return import_file(clone, "model.py", "scan_official_model", SCAN_MODEL_FIXES, "https://github.com/kuanghuei/SCAN",
                       torchvision_stub())


def scan_evaluation(clone: Path) -> types.ModuleType:
    """kuanghuei/SCAN's evaluation.py, its shard_xattn_* loops calling the official model.py's scores."""
    return import_file(clone, "evaluation.py", "scan_official_evaluation", SCAN_EVALUATION_FIXES,
                       "https://github.com/kuanghuei/SCAN", evaluation_stubs(scan_model(clone)))


def sgraf_model(clone: Path) -> types.ModuleType:
    """Paranioar/SGRAF's model.py."""
    return import_file(clone, "model.py", "sgraf_official_model", SGRAF_MODEL_FIXES,
                       "https://github.com/Paranioar/SGRAF")


def sgraf_evaluation(clone: Path) -> types.ModuleType:
    """Paranioar/SGRAF's evaluation.py: shard_attn_scores calling the official SGRAF's forward_sim (its sim_enc)."""
    return import_file(clone, "evaluation.py", "sgraf_official_evaluation", SGRAF_EVALUATION_FIXES,
                       "https://github.com/Paranioar/SGRAF", evaluation_stubs(sgraf_model(clone)))


def imram_evaluation(clone: Path) -> types.ModuleType:
    """HuiChen24/IMRAM's evaluation.py: shard_xattn and its shard_xattn_*_IMRAM loops calling the official
    model.py's xattn_score_Text_IMRAM / xattn_score_Image_IMRAM (model.py unchanged, torchvision stubbed)."""
    model = import_file(clone, "model.py", "imram_official_model", (), "https://github.com/HuiChen24/IMRAM",
                        torchvision_stub())
    return import_file(clone, "evaluation.py", "imram_official_evaluation", IMRAM_EVALUATION_FIXES,
                       "https://github.com/HuiChen24/IMRAM", evaluation_stubs(model))


def import_files(clone: Path, filenames: tuple[str, ...], repository: str,
                 stubs: dict[str, types.ModuleType] | None = None) -> types.ModuleType:
    """Files of a clone's packages executed in order, each as the module its path names (``models/rnn.py`` as
    ``models.rnn``) and put in ``sys.modules`` with its package, so that a later file's imports of an earlier
    one, absolute or relative, find it (a package's own ``__init__.py`` is not run). Returns the last."""
    import warnings

    module = None
    for filename in filenames:
        name = filename.removesuffix(".py").replace("/", ".")
        package, _, leaf = name.rpartition(".")
        if package and package not in sys.modules:
            sys.modules[package] = empty_module(package, __path__=[])
        with warnings.catch_warnings():  # a relative import in a module without __package__ resolves by its
            warnings.simplefilter("ignore", ImportWarning)  # __name__, as intended, and says so: not a fault
            module = import_file(clone, filename, name, (), repository, stubs)
        sys.modules[name] = module
        if package:
            setattr(sys.modules[package], leaf, module)
    assert module is not None, "no file given"
    return module


# --------------------------------------------------------------------------------------------- LgQu/DIME

DIME = "https://github.com/LgQu/DIME"
DIME_EVALUATION_FIXES: tuple[Fix, ...] = (
    (").cuda()\n", ")\n", "no GPU here: calItr's shards on the CPU"),
)


def dime_interaction(clone: Path) -> types.ModuleType:
    """LgQu/DIME's models/InteractionModule.py, with the files of its cells (models/ runs unchanged)."""
    cells = ("Router", "SelfAttention", "Refinement", "Cells", "DynamicInteraction", "InteractionModule")
    return import_files(clone, tuple(f"models/{name}.py" for name in cells), DIME)


def dime_text_net(clone: Path) -> types.ModuleType:
    """LgQu/DIME's models/TextNet.py, EncoderText: the n-gram head over BERT's last hidden states.

    BERT itself (models/BERT.py, and tokenization.py, which need ``six``) is stubbed: the benchmarks give the
    hidden states, so ``BertModel`` hands back the states it is given in place of token ids, and
    ``BertConfig.from_json_file`` returns the config object it is given (``opt.bert_config_file``).
    """
    import torch

    class GivenStates(torch.nn.Module):
        def __init__(self, config) -> None:
            super().__init__()

        def forward(self, input_ids, token_type_ids=None, attention_mask=None):
            return [input_ids], None  # (all layers, pooled): only the last layer is read

    bert = empty_module("models.BERT", BertModel=GivenStates,
                        BertConfig=types.SimpleNamespace(from_json_file=lambda config: config))
    return import_files(clone, ("models/TextNet.py",), DIME,
                        {"models.BERT": bert, "tokenization": empty_module("tokenization")})


def dime_evaluation(clone: Path) -> types.ModuleType:
    """LgQu/DIME's evaluation.py: calItr, calling ``model.itr_module`` shard by shard (its data loader and
    model.py's DIME, which builds BERT, stubbed: the benchmark gives the encoded arrays and the module)."""
    unused = lambda *args, **kwargs: None  # noqa: E731 - imported by evaluation.py, never called here
    stubs = {"data": empty_module("data", get_test_loader=unused), "model": empty_module("model", DIME=object)}
    return import_file(clone, "evaluation.py", "dime_official_evaluation", DIME_EVALUATION_FIXES, DIME, stubs)


# ------------------------------------------------------------------------ Wangt-CN/MTFN-RR-PyTorch-Code

MTFN = "https://github.com/Wangt-CN/MTFN-RR-PyTorch-Code"
MTFN_MODEL_FIXES: tuple[Fix, ...] = (
    ("\ufeff", "", "a UTF-8 byte-order mark: Python's import skips it, compile() of the text does not"),
)
MTFN_RERANK_FIXES: tuple[Fix, ...] = (
    ("d = np.load('flickr1_stage1_d.npy')", "d = np.zeros((15, 75))",
     "the file ends in a script re-ranking the authors' own score file; imported, it runs on a small stand-in"),
)


def mtfn_model(clone: Path) -> types.ModuleType:
    """Wangt-CN/MTFN-RR-PyTorch-Code's model.py: FusionNoAtt (Core_Fusion, _classif).

    Its seq2vec, the skip-thoughts GRU (Cadene/skip-thoughts.torch with the pretrained files), is stubbed to an
    identity: the benchmark gives precomputed sentence vectors on both sides. utils' training helpers are
    imported by model.py and never called.
    """
    import torch

    unused = lambda *args, **kwargs: None  # noqa: E731
    stubs = {"seq2vec": empty_module("seq2vec", factory=lambda vocab_words, options: torch.nn.Identity()),
             "utils": empty_module("utils", collect_match=unused, collect_neg=unused, acc_train=unused)}
    return import_file(clone, "model.py", "mtfn_official_model", MTFN_MODEL_FIXES, MTFN, stubs)


def mtfn_rerank(clone: Path) -> types.ModuleType:
    """Wangt-CN/MTFN-RR-PyTorch-Code's rerank.py: i2t_rerank, t2i_rerank, acc_i2t2, acc_t2i2 (its ``utils``
    import unused). Importing it prints the stand-in script's two result lines."""
    return import_file(clone, "rerank.py", "mtfn_official_rerank", MTFN_RERANK_FIXES, MTFN,
                       {"utils": empty_module("utils")})


# -------------------------------------------------------------------------------------------- erobic/ramen

RAMEN = "https://github.com/erobic/ramen"


def ramen_model(clone: Path) -> types.ModuleType:
    """erobic/ramen's models/ramen.py (Ramen: MultiModalCore, then the classifier) with
    components/multi_modal_core.py, components/nonlinearity.py and models/rnn.py, unchanged.

    The question encoder (components/language_model.py: GloVe word embeddings and a GRU) is stubbed by
    identities: the benchmark gives each caption's q vector, as the text tower's pool hands it over.
    """
    import torch

    class WordEmbedding(torch.nn.Identity):
        def init_embedding(self, np_file) -> None:  # the GloVe file: not read
            pass

    class QuestionEmbedding(torch.nn.Module):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__()

        def forward(self, q, qlen=None):
            return q

    language = empty_module("components.language_model", WordEmbedding=WordEmbedding,
                            QuestionEmbedding=QuestionEmbedding)
    files = ("components/nonlinearity.py", "models/rnn.py", "components/multi_modal_core.py", "models/ramen.py")
    return import_files(clone, files, RAMEN, {"components.language_model": language})
