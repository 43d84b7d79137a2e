"""Resolve what a recipe's [data] table names: the built-in dataset, a folder, a vocabulary."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from itmkit.build import DataPorts
from itmkit.data.shapes import DEFAULT_SIZES, GENERATOR_VERSION, VOCAB_THRESHOLD, captions_for, make_scene, write_shapes
from itmkit.data.shapes_scene import item_rng
from itmkit.data.split import Split, open_split
from itmkit.data.vocab import Vocabulary
from itmkit.errors import DataError
from itmkit.recipe import Recipe
from itmkit.runs import hold_lock, plain_name, remove_dead_temp_dirs, temp_dir_prefix

BUILTIN = "shapes"
GENERATION_LOCK = ".shapes.lock"
HDF5_SUFFIXES = (".h5", ".hdf5")
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def cache_home() -> Path:
    """Where generated data lives: $ITMKIT_HOME, else ~/.cache/itmkit."""
    return Path(os.environ.get("ITMKIT_HOME") or Path.home() / ".cache" / "itmkit")


def is_hdf5_file(path: Path) -> bool:
    """Whether ``path`` is a file meant as an HDF5 dataset: by its suffix, else by HDF5's signature."""
    if not path.is_file():
        return False
    if path.suffix.lower() in HDF5_SUFFIXES:
        return True
    try:
        with path.open("rb") as f:
            return f.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE
    except OSError:
        return False


def is_dataset_path(path: str | Path) -> bool:
    """Whether ``path`` is where a dataset can be: a folder, or an HDF5 file (docs/data.md)."""
    path = Path(path).expanduser()
    return path.is_dir() or is_hdf5_file(path)


def resolve_data_dir(path: str, progress=None, log=None) -> Path:
    """A dataset folder or HDF5 file; 'shapes' is the built-in dataset, generated once into the cache.

    Every reader of splits (``split.open_parts``, ``available_splits``) takes either: naming the
    HDF5 file is also how a folder holding several of them says which one it means.
    """
    if path != BUILTIN:
        folder = Path(path).expanduser()
        if folder.is_file() and not is_hdf5_file(folder):
            raise DataError(f"data path {folder} is a file but not an HDF5 file (.h5, .hdf5): a dataset is a folder"
                            " (precomp or HDF5 files) or an HDF5 file itself")
        if not is_dataset_path(folder):
            raise DataError(f"data folder not found: {folder} (a folder or an HDF5 file; use 'shapes' for the"
                            " built-in dataset, or `itmkit data synth DIR`)")
        return folder
    folder = builtin_folder()
    if (folder / "shapes.json").exists():
        _clean_dead_generations(folder.parent)
        return folder
    lock = folder.parent / GENERATION_LOCK
    # One generator per cache at a time: a second process waits, then finds the finished dataset.
    with hold_lock(lock, wait=False) as taken:
        if not taken and log:
            log(f"waiting for another process generating the built-in dataset into {folder.parent}")
    with hold_lock(lock, wait=True):
        if (folder / "shapes.json").exists():
            return folder
        remove_dead_temp_dirs(folder.parent, "shapes")
        if log:
            log(f"generating the built-in dataset into {folder} (once; about a minute)")
        # Generate beside the final place and rename, so a killed generation never leaves half a
        # dataset; the PID in the temporary name lets a later run tell a dead generator's leftovers.
        tmp = Path(tempfile.mkdtemp(prefix=temp_dir_prefix("shapes"), dir=folder.parent))
        try:
            write_shapes(tmp, seed=0, progress=progress)
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "shapes.json").exists():
                raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return folder


def builtin_folder() -> Path:
    """Where the built-in dataset is (or will be) generated."""
    return cache_home() / f"shapes-v{GENERATOR_VERSION}-seed0"


def builtin_words(sizes: dict[str, int] = DEFAULT_SIZES) -> Vocabulary:
    """The built-in dataset's vocabulary, from its captions alone, without generating the dataset.

    Captions follow from each scene description; rendering the images and extracting their features
    is what takes a minute and a half. The same words as ``write_shapes`` keeps: train and dev
    captions, the same threshold.
    """
    captions = [caption for name in ("train", "dev") for index in range(sizes.get(name, 0))
                for caption in captions_for(make_scene(0, name, index), item_rng(0, name, index, "captions"))]
    return Vocabulary.build(captions, threshold=VOCAB_THRESHOLD)


def _clean_dead_generations(cache: Path) -> None:
    """Remove what killed generations left (180 MB each), when no generation is running."""
    if not any(cache.glob(".shapes-*")):
        return
    with hold_lock(cache / GENERATION_LOCK, wait=False) as taken:
        if taken:
            remove_dead_temp_dirs(cache, "shapes")


def resolve_vocab(vocab_path: str, data_dir: Path, train: Split) -> Vocabulary:
    """The recipe's vocabulary file, else DATA/vocab.json (beside DATA when it is an HDF5 file), else one
    built from the train captions."""
    if vocab_path:
        return Vocabulary.load(vocab_path)
    default = (data_dir if data_dir.is_dir() else data_dir.parent) / "vocab.json"
    if default.exists():
        return Vocabulary.load(default)
    return Vocabulary.build(train.captions, threshold=4)


def text_vocabulary(recipe: Recipe, data_dir: Path, train: Split):
    """What the recipe's captions are tokenised with: the data's words, as its text encoder takes them.

    Usually the word vocabulary of ``resolve_vocab``; GPO's encoder appends ``<mask>`` to it, a
    BERT encoder replaces it with its WordPiece tokenizer (``Stage.vocabulary``).
    """
    return recipe.text.encoder.spec.vocabulary(lambda: resolve_vocab(recipe.data.vocab, data_dir, train))


def data_ports(split: Split, vocab: Vocabulary) -> DataPorts:
    return DataPorts(feature_dim=split.feature_dim, vocab_size=len(vocab), num_regions=split.num_regions,
                     mask_id=getattr(vocab, "mask_id", None))


def open_named_split(data_dir: Path, name: str, key: str = "split") -> Split:
    """Split ``name`` of ``data_dir``; the name is a name (it may come from a checkpoint), never a path."""
    plain_name(name, key)
    try:
        return open_split(data_dir, name)
    except DataError:
        raise
    except OSError as exc:
        raise DataError(f"cannot read split {name!r} of {data_dir}: {exc}") from None


def recorded_data_dir(data: str | None, recorded: str, checkpoint: str | Path, log=None) -> Path:
    """The folder to evaluate a checkpoint on: the user's ``--data``, else the path its recipe records.

    The recorded path is a hint from a file, not an instruction: ``--data`` always wins, and a
    recorded folder is used only if it exists here as given (the built-in name, or a folder);
    otherwise the user is asked for ``--data``, nothing is searched for or generated elsewhere.
    """
    if data:
        return resolve_data_dir(data, log=log)
    if recorded != BUILTIN and not is_dataset_path(recorded):
        raise DataError(f"{checkpoint} was trained on data.path = {recorded!r}, which is not a folder or HDF5 file"
                        " here; pass the dataset to evaluate on with --data DIR")
    folder = resolve_data_dir(recorded, log=log)
    if log and recorded != BUILTIN:
        log(f"data: {folder} (the data.path recorded in {checkpoint}; --data overrides it)")
    return folder
