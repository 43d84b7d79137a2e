"""TOML recipes: parse, apply ``--set`` overrides, structure every slot into its stage spec.

A recipe names only registered stages; nothing in it is code. Every problem is collected and
reported at once as ``RecipeError``, each with its key path (``match[0].aggregate.lambda_lse``).
"""

from __future__ import annotations

import copy
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import attrs
import tomli_w

from itmkit.errors import ItmkitError, did_you_mean
from itmkit.inputs import read_input
from itmkit.plugins import Registry, get_registry
from itmkit.stage import ParamInfo, Stage, param
from itmkit.structure import Problem, check_param, describe_value, structure, unstructure

PROTOCOLS = ("f30k-1k", "coco-1k-5fold", "coco-5k")
# Tables and lists inside one another: a recipe needs about five levels (match[0].aggregate.param[...]).
# Deeper input is refused with a message before anything walks it recursively.
MAX_DEPTH = 16


class RecipeError(ItmkitError):
    """Everything wrong with one recipe, each problem with its key path."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = problems
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        lines = "\n".join(f"  - {p.render()}" for p in problems)
        super().__init__(f"{source}: {count} in the recipe:\n{lines}")


@attrs.frozen(kw_only=True)
class RecipeInfo:
    """The [recipe] table: the experiment's name and the joint embedding size."""

    name: str = param(help="experiment name, used for run folders and checkpoint metadata")
    embed_dim: int = param(1024, "joint embedding size given to encoders that leave theirs unset", ge=1)
    description: str = param("", "one line saying what this recipe reproduces")

    @name.validator
    def _plain(self, attribute: Any, value: str) -> None:
        # Without --out the run folder is runs/<name>: a path here would write outside runs/.
        from itmkit.runs import name_problem

        problem = name_problem(value, "recipe.name")
        if problem:
            raise ValueError(problem)


@attrs.frozen(kw_only=True)
class DataSpec:
    """The [data] table: where the data is and how it is evaluated."""

    path: str = param("shapes", "dataset folder, or 'shapes' for the built-in dataset")
    vocab: str = param("", "vocabulary JSON (default: DATA/vocab.json, else built from the train captions)")
    train_split: str = param("train", "split to train on")
    dev_split: str = param("dev", "split to validate on each epoch")
    test_split: str = param("test", "split the final table is computed on ('testall' for COCO)")
    protocol: str = param("f30k-1k", "evaluation protocol of the test split", choices=PROTOCOLS)
    dev_images: int = param(1000, "validate on the first N dev images (the official code: 1000)", ge=1, le=10**7)

    @path.validator
    def _given(self, attribute: Any, value: str) -> None:
        # An empty path is the current folder to pathlib: a run would read (or a check pass on)
        # whatever split files happen to lie where itmkit was started.
        if isinstance(value, str) and not value.strip():
            raise ValueError(f"data.path = {value!r} names no dataset: give a dataset folder, an HDF5 file,"
                             " or 'shapes' for the built-in dataset")


@attrs.frozen(kw_only=True)
class TrainSpec:
    """The [train] table: optimisation schedule and reproducibility."""

    epochs: int = param(30, "training epochs", ge=1)
    batch_size: int = param(128, "captions per batch (each with its image)", ge=2)
    lr: float = param(2e-4, "initial learning rate", gt=0.0)
    lr_update: int = param(15, "multiply the learning rate by lr_decay every this many epochs", ge=1)
    lr_decay: float = param(0.1, "learning rate factor applied every lr_update epochs", gt=0.0, le=1.0)
    optimizer: Literal["adam", "adamw", "adamax"] = param("adam", "optimiser (GPO uses adamw, RAMEN adamax)",
                                                           choices=("adam", "adamw", "adamax"))
    weight_decay: float = param(0.0, "weight decay (adamw: decoupled)", ge=0.0)
    grad_clip: float = param(2.0, "clip the gradient norm of all parameters to this (0 = off)", ge=0.0)
    seed: int = param(0, "seed of initialisation, shuffling and dropout", ge=0, le=2**32 - 1)  # numpy's seed range
    eval_batch_size: int = param(256, "items per batch when encoding for evaluation", ge=1)
    log_every: int = param(50, "write a metrics line every this many iterations", ge=1)
    extra_captions: int = param(0, "random extra captions per pair, only ever negatives (DIME i-t: 1)", ge=0, le=16)
    extra_images: int = param(0, "random extra images per pair, only ever negatives (DIME t-i: 1)", ge=0, le=16)

    def __attrs_post_init__(self) -> None:
        if self.extra_captions and self.extra_images:
            raise ValueError("extra_captions and extra_images cannot both be set: a block gets extra rows or extra"
                             " columns, not both")


@attrs.frozen(kw_only=True)
class PhaseSpec:
    """One [[train.phase]] table: a stretch of epochs with its own trained parts, learning rate and switches.

    Phases run in order, each for ``epochs`` epochs; the last one runs until ``train.epochs``. Paths name
    the model's parts as the recipe does (``image``, ``text.encoder``, ``match[0]``, ``match[0].similarity``),
    optionally followed by a submodule of that stage (``match[0].similarity.object_rnn``).
    """

    name: str = param("", "a label for logs and `itmkit build`")
    epochs: int = param(1, "epochs this phase lasts (the last phase: until train.epochs)", ge=1)
    train: tuple[str, ...] | None = param(None, "the parts that train in this phase (default: every trainable part)")
    lr: float | None = param(None, "this phase's learning rate, before the step decay (default: train.lr)", gt=0.0)
    off: tuple[str, ...] = param((), "switches turned off in this phase (a stage's bool buffer, e.g."
                                     " match[0].similarity.recurrent); every other switch is on")


@attrs.frozen
class Slot:
    """One stage in a recipe: its spec and where it sits (``image.encoder``, ``match[0].cross``)."""

    spec: Stage
    path: str


@attrs.frozen
class Tower:
    """One modality: encoder, optional intra-modal reasoners, optional pool to a global vector."""

    encoder: Slot
    reasoners: tuple[Slot, ...] = ()
    pool: Slot | None = None


@attrs.frozen
class Match:
    """One matching branch: [cross-attention] -> similarity -> [aggregate], times a weight."""

    similarity: Slot
    cross: Slot | None = None
    aggregate: Slot | None = None
    weight: float = 1.0
    path: str = "match[0]"
    pair: Slot | None = None  # rebuilds one side's fragments per pair (PairLocal) before the cross stage

    def slots(self) -> list[Slot]:
        return [s for s in (self.pair, self.cross, self.similarity, self.aggregate) if s is not None]


@attrs.frozen
class Objective:
    """One extra training term: an objective stage whose value, times ``weight``, is added to the loss."""

    slot: Slot
    weight: float = 1.0


@attrs.frozen
class Recipe:
    """A fully structured recipe; ``to_dict()`` is the resolved form saved with every run."""

    info: RecipeInfo
    image: Tower
    text: Tower
    match: tuple[Match, ...]
    loss: Slot
    data: DataSpec
    train: TrainSpec
    source: str = "<recipe>"
    objectives: tuple[Objective, ...] = ()
    phases: tuple[PhaseSpec, ...] = ()

    def slots(self) -> list[Slot]:
        out = []
        for tower in (self.image, self.text):
            out += [tower.encoder, *tower.reasoners] + ([tower.pool] if tower.pool else [])
        for branch in self.match:
            out += branch.slots()
        return out + [self.loss] + [o.slot for o in self.objectives]

    def to_dict(self) -> dict[str, Any]:
        def slot(s: Slot | None) -> dict[str, Any] | None:
            return None if s is None else {"stage": s.spec.name, **unstructure(s.spec)}

        def tower(t: Tower) -> dict[str, Any]:
            out: dict[str, Any] = {"encoder": slot(t.encoder)}
            if t.reasoners:
                out["reasoners"] = [slot(r) for r in t.reasoners]
            if t.pool:
                out["pool"] = slot(t.pool)
            return out

        branches = []
        for m in self.match:
            branch = {k: slot(getattr(m, k)) for k in ("pair", "cross", "similarity", "aggregate") if getattr(m, k)}
            branches.append({**branch, "weight": m.weight})
        out = {
            "recipe": unstructure(self.info),
            "image": tower(self.image),
            "text": tower(self.text),
            "match": branches,
            "loss": slot(self.loss),
            "data": unstructure(self.data),
            "train": unstructure(self.train),
        }
        if self.phases:  # absent without phases: older runs' recipes resolve as before
            out["train"]["phase"] = [unstructure(p) for p in self.phases]
        if self.objectives:  # absent, not empty, without objectives: older runs' recipes resolve as before
            out["objective"] = [{**slot(o.slot), "weight": o.weight} for o in self.objectives]
        return out

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


# Which stage kind each slot takes.
SECTIONS = ("recipe", "image", "text", "match", "loss", "objective", "data", "train")
WEIGHT = ParamInfo("weight", float, 1.0, "this branch's share of the model score", None, None, None, None)
# Non-negative: every objective is a loss to lower; a negative weight would push its term up without bound.
OBJECTIVE_WEIGHT = ParamInfo("weight", float, 1.0, "this objective's factor in the training loss", None, 0.0, None, None)
TOWER_KEYS = {"encoder": "encoder", "reasoners": "reasoner", "pool": "aggregator"}
MATCH_KEYS = {"pair": "pair", "cross": "cross", "similarity": "similarity", "aggregate": "aggregator", "weight": None}


def load_recipe(path: str | Path, overrides: list[str] = (), registry: Registry | None = None) -> Recipe:
    """Read a recipe file, apply ``--set KEY=VALUE`` overrides, structure and validate it."""
    path = Path(path)
    # A regular file of at most 64 MiB: a FIFO would block, /dev/zero would never end (itmkit.inputs).
    data = read_input(path, "recipe", error=ItmkitError, missing="recipe not found: {path}")
    try:
        text = data.decode("utf-8-sig")  # editors on Windows start UTF-8 files with a byte-order mark
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ItmkitError(f"{path}: line {line}: byte {data[exc.start:exc.start + 1]!r} is not UTF-8; a recipe must be"
                          " UTF-8 text (save it as UTF-8)") from None
    return parse_recipe(text, str(path), overrides, registry)


def parse_recipe(text: str, source: str = "<recipe>", overrides: list[str] = (), registry: Registry | None = None) -> Recipe:
    """Parse recipe TOML text (see ``load_recipe``)."""
    try:
        raw = _load_toml(text.removeprefix("\ufeff"))
    except ValueError as exc:
        raise ItmkitError(f"{source}: invalid TOML: {exc}") from None
    too_deep = _too_deep(raw)
    if too_deep is not None:
        raise ItmkitError(f"{source}: tables and lists nested more than {MAX_DEPTH} deep @ {too_deep}")
    raw, set_paths, problems = apply_overrides(raw, overrides)
    recipe, found = structure_recipe(raw, source, registry or get_registry())
    problems += found
    if problems:
        raise RecipeError(source, [_mark_override(p, set_paths) for p in problems])
    return recipe


def _load_toml(text: str) -> dict[str, Any]:
    """tomllib.loads, with its two other failures as ValueErrors that say what is wrong."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        raise
    except RecursionError:
        raise ValueError(f"tables and lists nested more than {MAX_DEPTH} deep") from None
    except ValueError as exc:  # int() past Python's 4300-digit limit
        raise ValueError(f"a number with too many digits ({str(exc).split(':')[0]})") from None


def _too_deep(value: Any, limit: int = MAX_DEPTH) -> str | None:
    """The key path of the first table or list nested deeper than ``limit``, else None (no recursion)."""
    stack: list[tuple[Any, list[str | int]]] = [(value, [])]
    while stack:
        node, parts = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in items:
            if isinstance(child, (dict, list)):
                if len(parts) + 1 >= limit:
                    return format_path([*parts[:4], "…", key]) if len(parts) > 4 else format_path([*parts, key])
                stack.append((child, [*parts, key]))
    return None


# One --set key segment: a name and any number of [index] suffixes, or a bare index (match.0.weight).
_SEGMENT = re.compile(r"(?P<name>[^.\[\]]*)(?P<indexes>(?:\[[^\]]*\])*)")


def _shown(item: str) -> str:
    """A --set item as messages quote it: printable, and not 100,000 characters long."""
    shown = item if item.isprintable() else repr(item)
    return shown if len(shown) <= 80 else shown[:80] + "…"


def parse_override(item: str) -> tuple[list[str | int], Any]:
    """'match[0].aggregate.lambda_lse=6' -> (['match', 0, 'aggregate', 'lambda_lse'], 6)."""
    item = item.removeprefix("\ufeff")
    if "=" not in item:
        raise ValueError(f"--set expects KEY=VALUE, got {item[:80]!r}")
    key, _, text = item.partition("=")
    try:
        value = _load_toml(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word such as a path: take it as a string
    except ValueError as exc:
        raise ValueError(f"--set {_shown(item)}: {exc}") from None
    if _too_deep([value]) is not None:
        raise ValueError(f"--set {_shown(key)}=…: the value nests tables and lists more than {MAX_DEPTH} deep")
    parts: list[str | int] = []
    segments = key.strip().split(".")
    if len(segments) > MAX_DEPTH:
        raise ValueError(f"--set {key[:40]}…: a key of {len(segments)} parts (a recipe key has at most {MAX_DEPTH})")
    for segment in segments:
        match = _SEGMENT.fullmatch(segment)
        if not segment or match is None or (not match["name"] and not match["indexes"]):
            raise ValueError(f"--set {_shown(item)}: malformed key segment {segment[:40]!r} (expected NAME, NAME[INDEX] or INDEX,"
                             " as in match[0].weight)")
        name = match["name"]
        if name:
            parts.append(int(name) if re.fullmatch("[0-9]+", name) else name)
        for index in re.findall(r"\[([^\]]*)\]", match["indexes"]):
            if not re.fullmatch("[0-9]+", index.strip()):
                raise ValueError(f"--set {_shown(item)}: list index [{index[:40]}] must be a whole number counting from 0,"
                                 " as in match[0].weight")
            parts.append(int(index))
    return parts, value


def format_path(parts: list[str | int]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def apply_overrides(raw: dict, overrides: list[str]) -> tuple[dict, dict[str, str], list[Problem]]:
    """Apply --set overrides to the raw dict; returns it, the set paths, and problems."""
    raw = copy.deepcopy(raw)
    set_paths: dict[str, str] = {}
    problems: list[Problem] = []
    for item in overrides:
        try:
            parts, value = parse_override(item)
        except ValueError as exc:
            problems.append(Problem("", str(exc)))
            continue
        if parts[0] not in SECTIONS:
            problems.append(Problem(format_path(parts), f"--set {_shown(item)}: no section {parts[0]!r}" + did_you_mean(str(parts[0]), SECTIONS)))
            continue
        node: Any = raw
        for i, part in enumerate(parts[:-1]):
            here = format_path(parts[: i + 1])
            if isinstance(part, int):
                if not isinstance(node, list):
                    what = f"{format_path(parts[:i]) or 'this'} is {describe_value(node)}"
                    problems.append(Problem(here, f"--set {_shown(item)}: {what}, not a list"))
                    break
                if part >= len(node):
                    size = len(node)
                    entries = "entry" if size == 1 else "entries"
                    problems.append(Problem(here, f"--set {_shown(item)}: there {'is' if size == 1 else 'are'} only {size} {entries} here"))
                    break
                node = node[part]
            elif isinstance(node, dict):
                if part not in node and isinstance(parts[i + 1], int):  # an index into a list the recipe lacks
                    problems.append(Problem(here, f"--set {_shown(item)}: the recipe has no list {part!r} here to index"))
                    break
                node = node.setdefault(part, {})
            else:
                node = None
            if not isinstance(node, dict) and not (isinstance(node, list) and isinstance(parts[i + 1], int)):
                what = "a list (index it: match[0].…)" if isinstance(node, list) else describe_value(node)
                problems.append(Problem(here, f"--set {_shown(item)}: this is {what}, not a table"))
                break
        else:
            last = parts[-1]
            if isinstance(last, int) or not isinstance(node, dict):
                problems.append(Problem(format_path(parts), f"--set {_shown(item)}: cannot set a list entry"))
                continue
            if isinstance(node.get(last), str) and not isinstance(value, str):
                value = item.partition("=")[2]  # a string key keeps the text: data.path=2024 is a folder name
            node[last] = value
            set_paths[format_path(parts)] = item
    return raw, set_paths, problems


def _mark_override(problem: Problem, set_paths: dict[str, str]) -> Problem:
    for path, item in set_paths.items():
        if problem.path == path or problem.path.startswith((path + ".", path + "[")):
            return Problem(problem.path, f"{problem.message} (from --set {_shown(item)})")
    return problem


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def structure_recipe(raw: dict, source: str, registry: Registry) -> tuple[Recipe | None, list[Problem]]:
    """Structure a raw recipe dict, collecting every problem."""
    problems: list[Problem] = []
    for key in raw:
        if key not in SECTIONS:
            problems.append(Problem(key, f"unknown section [{key}]" + did_you_mean(key, SECTIONS)))

    def section(name: str, cls: type, what: str, required: bool = False) -> Any:
        if name not in raw and required:
            problems.append(Problem(name, f"missing required section [{name}]"))
            return None
        value, found = structure(cls, raw.get(name, {}), name, what)
        problems.extend(found)
        return value

    info = section("recipe", RecipeInfo, "[recipe]", required=True)
    data = section("data", DataSpec, "[data]")
    train_raw = raw.get("train", {})
    phases_raw = train_raw.get("phase", []) if isinstance(train_raw, dict) else []
    if isinstance(train_raw, dict) and "phase" in train_raw:
        raw = {**raw, "train": {k: v for k, v in train_raw.items() if k != "phase"}}
    train = section("train", TrainSpec, "[train]")
    phases = _phases(phases_raw, problems)
    embed_dim = info.embed_dim if info else 1024

    def slot(table: Any, path: str, kind: str) -> Slot | None:
        if not isinstance(table, dict):
            problems.append(Problem(path, f"expected a table like {{ stage = \"...\", ... }} for a {kind} stage, got {describe_value(table)}"))
            return None
        name = table.get("stage")
        if name is None:
            problems.append(Problem(path, f"missing key 'stage' (the registered name of {_a(kind)} stage)"))
            return None
        if not isinstance(name, str):
            problems.append(Problem(f"{path}.stage", f"expected the name of a registered {kind} stage (a string),"
                                                     f" got {describe_value(name)}"))
            return None
        if name not in registry.stages:
            candidates = [n for n, c in registry.stages.items() if c.kind == kind] or list(registry.stages)
            problems.append(Problem(f"{path}.stage", f"unknown stage {name!r}" + did_you_mean(str(name), candidates)))
            return None
        cls = registry.stages[name]
        if cls.kind != kind:
            problems.append(Problem(f"{path}.stage", f"stage {name!r} is {_a(cls.kind)}, but this slot takes {_a(kind)}"))
            return None
        params = {k: v for k, v in table.items() if k != "stage"}
        if "embed_dim" in {f.name for f in attrs.fields(cls)} and params.get("embed_dim") is None:
            params["embed_dim"] = embed_dim
        spec, found = structure(cls, params, path, f"stage {name} (plugin {registry.owners[name]})")
        problems.extend(found)
        return Slot(spec, path) if spec is not None else None

    def tower(name: str) -> Tower | None:
        table = raw.get(name)
        if not isinstance(table, dict):
            problems.append(Problem(name, f"missing required section [{name}]" if table is None else f"[{name}] must be a table"))
            return None
        for key in table:
            if key not in TOWER_KEYS:
                problems.append(Problem(f"{name}.{key}", f"unknown key {key!r} in [{name}]" + did_you_mean(key, TOWER_KEYS)))
        if "encoder" not in table:
            problems.append(Problem(f"{name}.encoder", f"missing required slot 'encoder' in [{name}]"))
            encoder = None
        else:
            encoder = slot(table["encoder"], f"{name}.encoder", "encoder")
        reasoners_raw = table.get("reasoners", [])
        if not isinstance(reasoners_raw, list):
            problems.append(Problem(f"{name}.reasoners", "expected a list of stage tables"))
            reasoners_raw = []
        reasoners = tuple(slot(r, f"{name}.reasoners[{i}]", "reasoner") for i, r in enumerate(reasoners_raw))
        pool = slot(table["pool"], f"{name}.pool", "aggregator") if "pool" in table else None
        if encoder is None or None in reasoners or ("pool" in table and pool is None):
            return None
        return Tower(encoder, reasoners, pool)

    image, text = tower("image"), tower("text")

    branches_raw = raw.get("match")
    branches: list[Match] = []
    if branches_raw is None:
        problems.append(Problem("match", "missing required section [[match]] (at least one matching branch)"))
    elif not isinstance(branches_raw, list) or not branches_raw:
        problems.append(Problem("match", "expected one or more [[match]] tables"))
    else:
        for i, table in enumerate(branches_raw):
            path = f"match[{i}]"
            if not isinstance(table, dict):
                problems.append(Problem(path, "expected a [[match]] table"))
                continue
            for key in table:
                if key not in MATCH_KEYS:
                    problems.append(Problem(f"{path}.{key}", f"unknown key {key!r} in [[match]]" + did_you_mean(key, MATCH_KEYS)))
            if "similarity" not in table:
                problems.append(Problem(f"{path}.similarity", "missing required slot 'similarity' in [[match]]"))
                continue
            slots = {k: slot(table[k], f"{path}.{k}", kind) for k, kind in MATCH_KEYS.items() if kind and k in table}
            weight, found = check_param(WEIGHT, table.get("weight", 1.0), f"{path}.weight")
            if found:
                problems.extend(found)
                continue
            if any(v is None for v in slots.values()):
                continue
            branches.append(Match(slots["similarity"], slots.get("cross"), slots.get("aggregate"), float(weight), path,
                                  slots.get("pair")))

    loss = slot(raw["loss"], "loss", "loss") if "loss" in raw else None
    if "loss" not in raw:
        problems.append(Problem("loss", "missing required section [loss] (e.g. stage = \"core.triplet\")"))

    objectives: list[Objective] = []
    objectives_raw = raw.get("objective", [])
    if not isinstance(objectives_raw, list):
        problems.append(Problem("objective", "expected [[objective]] tables (one per extra training term)"))
        objectives_raw = []
    for i, table in enumerate(objectives_raw):
        path = f"objective[{i}]"
        if not isinstance(table, dict):
            problems.append(Problem(path, "expected an [[objective]] table like { stage = \"...\", weight = 1.0 }"))
            continue
        weight, found = check_param(OBJECTIVE_WEIGHT, table.get("weight", 1.0), f"{path}.weight")
        problems.extend(found)
        objective = slot({k: v for k, v in table.items() if k != "weight"}, path, "objective")
        if objective is not None and not found:
            objectives.append(Objective(objective, float(weight)))

    if train is not None and (train.extra_captions or train.extra_images) and objectives:
        key = "train.extra_captions" if train.extra_captions else "train.extra_images"
        problems.append(Problem(key, "extra negatives and [[objective]] terms cannot be combined: an objective reads"
                                     " the batch as pairs (one caption per image row)"))
    if problems:
        return None, problems
    return Recipe(info, image, text, tuple(branches), loss, data, train, source, tuple(objectives), phases), []


def _phases(tables: Any, problems: list[Problem]) -> tuple[PhaseSpec, ...]:
    """The [[train.phase]] tables, structured; problems are appended with their key paths."""
    if not isinstance(tables, list):
        problems.append(Problem("train.phase", "expected [[train.phase]] tables (one per stretch of epochs)"))
        return ()
    phases = []
    for i, table in enumerate(tables):
        phase, found = structure(PhaseSpec, table, f"train.phase[{i}]", "[[train.phase]]")
        problems.extend(found)
        if phase is not None:
            phases.append(phase)
    return tuple(phases)
