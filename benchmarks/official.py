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


def scan_model(clone: Path) -> types.ModuleType:
    """kuanghuei/SCAN's model.py (torchvision, imported there for raw-image encoders only, stubbed)."""
    vision = empty_module("torchvision")
    vision.models = empty_module("torchvision.models")
    return import_file(clone, "model.py", "scan_official_model", SCAN_MODEL_FIXES, "https://github.com/kuanghuei/SCAN",
                       {"torchvision": vision, "torchvision.models": vision.models})


def scan_evaluation(clone: Path) -> types.ModuleType:
    """kuanghuei/SCAN's evaluation.py, its shard_xattn_* loops calling the official model.py's scores."""
    unused = lambda *args, **kwargs: None  # noqa: E731 - imported by evaluation.py, never called here
    stubs = {"model": scan_model(clone), "data": empty_module("data", get_test_loader=unused),
             "vocab": empty_module("vocab", Vocabulary=object, deserialize_vocab=unused)}
    return import_file(clone, "evaluation.py", "scan_official_evaluation", SCAN_EVALUATION_FIXES,
                       "https://github.com/kuanghuei/SCAN", stubs)
