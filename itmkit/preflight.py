"""Checks before the work: every split a command reads, against the recipe, the protocol, the model.

Training that finds a missing test split after thirty epochs, or a train split smaller than one
batch that takes no step and reports "loss 0.000", wastes the run. So ``itmkit train`` opens and
checks the train, dev and test splits before epoch 1, ``itmkit eval`` checks its split against
every checkpoint before scoring, and ``itmkit data check`` runs the same functions on a folder
(with ``--recipe``, exactly the checks ``train`` runs). Every problem is collected and reported
at once, one sentence each, naming the file and the recipe key.

The per-split checks (shapes, dtypes, caption counts, NaN or inf features, empty captions) and
the cross-split ones (feature widths, region counts) live in ``itmkit.data.check``; this module
adds what depends on how the data is used, and what the model's stages declare they need from it
(``Stage.data_needs``: region boxes in a layout, image sizes, bounded block indices, at most N
regions), read from the recipe's specs so that ``data check --recipe`` needs no model built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import numpy as np

from itmkit.data.check import _sentence, open_checked
from itmkit.data.split import (SCAN_CHUNK_IMAGES, Split, SplitParts, as_read, assemble, available_splits,
                               image_shape)
from itmkit.errors import DataError, ItmkitError, did_you_mean
from itmkit.evaluation import protocol_problem
from itmkit.runs import name_problem
from itmkit.stage import BoxLayout, DataNeeds

ROLES = ("train", "dev", "test")


class PreflightError(DataError):
    """Every problem found before the work started, one per line."""

    def __init__(self, where: str, problems: list[str], before: str):
        self.problems = problems
        if len(problems) == 1:  # one line, as every other error
            super().__init__(f"{problems[0].rstrip('.')} (found before {before}; nothing was run)")
            return
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{where}: {len(problems)} problems found before {before} (nothing was run):\n{lines}")


@attrs.frozen
class DataUse:
    """What a command reads from a dataset: a split per role, and what the splits must fit.

    Each role lists the names it accepts, first choice first, and the key that chose them.
    """

    splits: dict[str, tuple[str, ...]]  # role -> accepted names
    keys: dict[str, str]  # role -> where the names come from, for messages
    batch_size: int | None = None
    protocol: str | None = None
    needs: tuple[Need, ...] = ()  # what the model's stages need from every split (boxes, a region bound)

    @classmethod
    def of_recipe(cls, recipe: Any) -> DataUse:
        d = recipe.data
        return cls(
            splits={"train": (d.train_split,), "dev": (d.dev_split,), "test": (d.test_split,)},
            keys={role: f"data.{role}_split" for role in ROLES},
            batch_size=recipe.train.batch_size,
            protocol=d.protocol,
            needs=model_needs(recipe, f"the model of {recipe.info.name}"),
        )


# Without a recipe: the recipes' default names, and COCO's 'testall' as a test split.
DEFAULT_USE = DataUse(
    splits={"train": ("train",), "dev": ("dev",), "test": ("test", "testall")},
    keys={role: "the default split names; check against a recipe with --recipe" for role in ROLES},
)


def chosen_splits(use: DataUse, present: list[str]) -> dict[str, str | None]:
    """The split each role reads: its first accepted name that is present, else None."""
    return {role: next((n for n in names if n in present), None) for role, names in use.splits.items()}


def name_problems(use: DataUse) -> list[str]:
    """Split names that are not plain names (a split name becomes part of a file path)."""
    return [p for role, names in use.splits.items() for n in names if (p := name_problem(n, use.keys[role]))]


def _shape(split: Split | SplitParts) -> tuple[int, ...] | None:
    """(images, regions, width) as the model sees them (2-D global features: one region), or None if unreadable."""
    return image_shape(split) if isinstance(split, SplitParts) else tuple(split.features.shape)


def usage_problems(data_dir: Path, use: DataUse, present: list[str], opened: dict[str, SplitParts]) -> list[str]:
    """Missing and empty splits, a train split smaller than one batch, a test split the protocol cannot score,
    a split without what a stage of the model needs (``use.needs``)."""
    problems = []
    chosen = chosen_splits(use, present)
    found = ", ".join(present) if present else "none"
    for name in dict.fromkeys(n for n in chosen.values() if n is not None):
        if opened.get(name) is not None:
            problems.extend(p for need in use.needs for p in need_problems(opened[name], need))
    for role, name in chosen.items():
        names = use.splits[role]
        if name is None:
            wanted = " or ".join(repr(n) for n in names)
            close = did_you_mean(names[0], present) if present else ""
            close = close if close.startswith(" (did you mean") else ""
            problems.append(f"{data_dir} has no {role} split {wanted} ({use.keys[role]}); splits present: {found}{close}.")
            continue
        parts = opened.get(name)
        shape = None if parts is None else _shape(parts)
        if shape is None:
            continue  # could not be read: its own problem says why
        images = shape[0]
        if images == 0:
            problems.append(f"{parts.file('features')} holds no images: the {role} split {name!r} is empty.")
        elif role == "train" and use.batch_size is not None and len(parts.captions) < use.batch_size:
            problems.append(
                f"the train split {name!r} has {len(parts.captions)} captions, fewer than one batch of"
                f" train.batch_size = {use.batch_size}: no step would be taken"
                f" (lower it with --set train.batch_size=N)."
            )
        if role == "test" and use.protocol is not None and images > 0:
            problem = protocol_problem(use.protocol, images, f"the test split {name!r} ({parts.file('features')})")
            if problem:
                problems.append(_sentence(f"{problem} (data.protocol)"))
    return problems


def open_used_splits(data_dir: Path, use: DataUse) -> tuple[dict[str, SplitParts], dict[str, str | None], list[str]]:
    """Open each split ``use`` reads and check it; returns the parts by name, the choice per role, the problems."""
    problems = name_problems(use)
    if problems:
        return {}, {}, problems
    try:
        present = available_splits(data_dir)
    except DataError as err:
        return {}, {}, [_sentence(str(err))]
    chosen = chosen_splits(use, present)
    opened, found = open_checked(data_dir, (n for n in chosen.values() if n is not None))
    problems.extend(found)
    problems.extend(usage_problems(data_dir, use, present, opened))
    return opened, chosen, problems


@attrs.frozen(eq=False)
class TrainingSplits:
    train: Split
    dev: Split
    test: Split


def check_training_data(recipe: Any, data_dir: Path, *, resume_from: Path | None = None) -> TrainingSplits:
    """The recipe's train, dev and test splits, each opened and checked; a PreflightError listing
    every problem otherwise. ``resume_from``: a checkpoint whose feature width the data must have."""
    use = DataUse.of_recipe(recipe)
    opened, chosen, problems = open_used_splits(data_dir, use)
    train = opened.get(chosen.get("train") or "")
    if resume_from is not None and train is not None and resume_from.exists():
        problems.extend(_resume_problems(resume_from, train))
    if problems:
        raise PreflightError(str(data_dir), problems, "training")
    return TrainingSplits(*(assemble(opened[chosen[role]]) for role in ROLES))


def _resume_problems(checkpoint: Path, train: SplitParts) -> list[str]:
    from itmkit.checkpoint import read_checkpoint_meta  # imported here: checkpoint imports the model builder

    try:
        width = read_checkpoint_meta(checkpoint).feature_dim
    except ItmkitError:
        return []  # the resume itself reports an unreadable checkpoint
    return fit_problems(train, width, (), f"{checkpoint} (--resume)")


@attrs.frozen
class Need:
    """What one stage of a model declares it needs from the data (``Stage.data_needs``), and where it sits."""

    model: str  # for messages: "the model of NAME", or a checkpoint's path
    slot: str  # the recipe slot: image.encoder, match[0].cross
    stage: str  # its registered name
    needs: DataNeeds

    @property
    def who(self) -> str:
        return f"{self.model} ({self.slot}: {self.stage})"


def model_needs(recipe: Any, model: str) -> tuple[Need, ...]:
    """The data needs every stage of ``recipe`` declares; read from the specs, so no model is built."""
    return tuple(Need(model, slot.path, slot.spec.name, needs) for slot in recipe.slots()
                 if (needs := slot.spec.data_needs()) != DataNeeds())


def _file(split: Split | SplitParts, part: str) -> str:
    return split.file(part) if isinstance(split, SplitParts) else f"split {split.name!r} of {split.source} ({part})"


def fit_problems(split: Split | SplitParts, feature_dim: int | None, needs: tuple[Need, ...], model: str) -> list[str]:
    """Whether ``split`` fits a model of ``feature_dim``-wide inputs (None: not checked) and what its stages need."""
    shape = _shape(split)
    problems = []
    if shape is not None and len(shape) == 3 and feature_dim is not None and shape[2] != feature_dim:
        problems.append(f"{_file(split, 'features')} has {shape[2]}-d features, but {model} takes {feature_dim}-d"
                        " image features (features from another extractor?).")
    for need in needs:
        problems.extend(need_problems(split, need))
    return problems


def need_problems(split: Split | SplitParts, need: Need) -> list[str]:
    """What ``split`` lacks of what one stage declares it needs (boxes, their layout, image sizes, a region bound)."""
    shape = _shape(split)
    if shape is None or len(shape) != 3:
        return []  # unreadable: its own problem says why
    problems = []
    wanted = need.needs
    # A module with fixed region slots (SGRAF's BatchNorm over regions) masks images with fewer
    # regions and cuts stored padding past its slots: only more real regions than slots is refused.
    counts = getattr(split, "region_counts", None)
    if wanted.max_regions is not None:
        most = int(np.max(counts)) if counts is not None and len(counts) else shape[1]
        if most > wanted.max_regions:
            problems.append(f"{_file(split, 'features')} has images with {most} regions, but {need.who} was built"
                            f" for at most {wanted.max_regions}.")
    if not wanted.boxes:
        return problems
    accepted = " or ".join(f"{b.columns} columns ({b.meaning})" for b in wanted.boxes)
    boxes = split.boxes
    if boxes is None:
        return [*problems, f"{_file(split, 'boxes')} does not exist, but {need.who} needs region boxes per image"
                           f" and region: {accepted}."]
    if boxes.ndim != 3 or tuple(boxes.shape[:2]) != tuple(shape[:2]):
        return problems  # the split's own checks report the shape
    layout = next((b for b in wanted.boxes if b.columns == boxes.shape[-1]), None)
    if layout is None:
        return [*problems, f"{_file(split, 'boxes')} has {boxes.shape[-1]} columns per region, but {need.who}"
                           f" reads {accepted}."]
    if layout.needs_sizes and split.image_sizes is None:
        problems.append(f"{_file(split, 'image_sizes')} does not exist, but {need.who} needs each image's width and"
                        f" height to read the {layout.columns}-column boxes ({layout.meaning}) of"
                        f" {_file(split, 'boxes')}.")
    if layout.index_columns:
        problems.extend(_index_problems(split, boxes, layout, need))
    return problems


def _index_problems(split: Split | SplitParts, boxes: Any, layout: BoxLayout, need: Need) -> list[str]:
    """Indices above ``layout.index_max`` in the real regions' rows, a chunk of images at a time."""
    counts = getattr(split, "region_counts", None)
    num_images, num_regions = int(boxes.shape[0]), int(boxes.shape[1])
    for start in range(0, num_images, SCAN_CHUNK_IMAGES):
        index = as_read(boxes[start : start + SCAN_CHUNK_IMAGES])[..., : layout.index_columns]  # (n, R, K)
        real = np.ones(index.shape[:2], dtype=bool)
        if counts is not None and len(counts) == num_images:
            real = np.arange(num_regions)[None, :] < np.asarray(counts)[start : start + len(index), None]
        with np.errstate(invalid="ignore"):
            over = (index > layout.index_max) & real[..., None]  # NaN and negatives: the split's own checks
        if over.any():
            image, region, column = (int(v[0]) for v in np.nonzero(over))
            return [f"{_file(split, 'boxes')} has index {float(index[image, region, column]):g} in column {column} of"
                    f" region {region} of image {start + image}, but {need.who} takes indices 0 .. {layout.index_max}"
                    f" in the first {layout.index_columns} columns ({layout.meaning})."]
    return []


def check_model_fits(model: Any, splits: dict[str, Split], what: str) -> None:
    """Every split fits the model built for them (input width, what its stages need); a PreflightError otherwise."""
    needs = model_needs(model.recipe, what)
    width = model.data_ports.feature_dim
    problems = [p for split in splits.values() for p in fit_problems(split, width, needs, what)]
    if problems:
        raise PreflightError(", ".join(dict.fromkeys(s.source for s in splits.values())), problems, "training")


def check_eval_data(data_dir: Path, split: str, protocol: str | None, models: list[tuple[str, Any]]) -> Split:
    """The split ``itmkit eval`` scores, opened and checked against the protocol and every model."""
    use = DataUse(splits={"test": (split,)}, keys={"test": "--split, else the recipe's data.test_split"},
                  protocol=protocol, needs=tuple(n for label, model in models for n in model_needs(model.recipe, label)))
    opened, chosen, problems = open_used_splits(data_dir, use)
    parts = opened.get(chosen.get("test") or "")
    if parts is not None:
        for label, model in models:
            problems.extend(fit_problems(parts, model.data_ports.feature_dim, (), label))
    if problems:
        raise PreflightError(str(data_dir), problems, "scoring")
    return assemble(parts)
