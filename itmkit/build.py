"""Wire a recipe's stages through their ports, then build the model.

``wire()`` checks every connection before any tensor exists (port kinds, dims) and collects
every problem with its recipe key path. ``build_model()`` turns the wiring into an
``ITMModel``. The model is a readable composition: two towers, weighted matching branches,
a loss; the scoring engine and the trainer call it on blocks of images x captions.
"""

from __future__ import annotations

import inspect
from typing import Any

import attrs
import torch
from torch import nn

from itmkit import distributed, explain
from itmkit.errors import ItmkitError
from itmkit.ops import float32
from itmkit.recipe import Recipe, RecipeError, Slot
from itmkit.stage import PortError, stage_inputs, wired_pair_bytes
from itmkit.structure import Problem
from itmkit.types import (
    Aligned,
    GlobalPort,
    Local,
    LocalPort,
    LossPort,
    PairLocal,
    PairLocalPort,
    ParametersPort,
    Port,
    Regions,
    RegionsPort,
    ScorePort,
    BlockContext,
    Tokens,
    TokensPort,
)


@attrs.frozen
class DataPorts:
    """What the data gives the encoders: feature size, vocabulary size, regions per image, mask token."""

    feature_dim: int
    vocab_size: int
    num_regions: int | None = None
    mask_id: int | None = None  # the vocabulary's mask token, if it has one (GPO's caption augmentation)


@attrs.frozen
class Wire:
    """One stage as wired: its slot, input ports by parameter, where each comes from, its output."""

    slot: Slot
    inputs: dict[str, Port]
    sources: dict[str, str]
    output: Port


@attrs.frozen
class Wiring:
    """The checked graph of a recipe: per tower and per branch, the stages in order."""

    image: tuple[Wire, ...]
    text: tuple[Wire, ...]
    branches: tuple[tuple[Wire, ...], ...]
    loss: Wire
    image_global: bool
    text_global: bool
    objectives: tuple[Wire, ...] = ()

    def all(self) -> list[Wire]:
        return [*self.image, *self.text, *(w for b in self.branches for w in b), self.loss, *self.objectives]


# Where a training-step value comes from, as wiring messages and stage sources name it.
SCORES, REGIONS, TOKENS, PARAMETERS = ("the summed branch scores", "the batch's regions", "the batch's captions",
                                       "the model's parameters")


def _describe_inputs(accepts: tuple[type[Port], ...]) -> str:
    return " or ".join(p.__name__ for p in accepts)


def _connect(slot: Slot, available: dict[str, dict[type[Port], tuple[Port, str]]], problems: list[Problem]) -> Wire | None:
    """Feed each ports() parameter from ``available`` (by name, then by port class)."""
    inputs: dict[str, Port] = {}
    sources: dict[str, str] = {}
    for spec in stage_inputs(type(slot.spec)):
        offers = available.get(spec.name, {})
        chosen = next(((port, src) for cls in spec.accepts for c, (port, src) in offers.items() if issubclass(c, cls)), None)
        if chosen is None:
            if spec.optional:
                continue
            offered = ", ".join(f"{p.describe()} from {src}" for p, src in offers.values()) or "nothing"
            side = spec.name.removesuffix("_global")
            hint = (f": add a `pool` stage to [{side}] (its pooled vectors are what {spec.name} reads)"
                    if spec.name in ("image_global", "text_global") and not offers else "")
            problems.append(Problem(
                slot.path,
                f"port mismatch: stage {slot.spec.name} input {spec.name!r} expects"
                f" {_describe_inputs(spec.accepts)}, but {offered} is available there{hint}",
            ))
            return None
        inputs[spec.name], sources[spec.name] = chosen
    try:
        output = slot.spec.ports(**inputs)
    except PortError as exc:
        if inputs:
            sides = "inputs: " + ", ".join(f"{name}={port.describe()} from {sources[name]}" for name, port in inputs.items())
        else:
            offered = [f"{port.describe()} from {src}" for offers in available.values() for port, src in offers.values()]
            sides = "available here: " + (", ".join(offered) or "nothing")
        problems.append(Problem(slot.path, f"port mismatch in stage {slot.spec.name}: {exc} ({sides})"))
        return None
    return Wire(slot, inputs, sources, output)


def wire(recipe: Recipe, data: DataPorts) -> Wiring:
    """Check every connection of the recipe; raise RecipeError listing every mismatch."""
    problems: list[Problem] = []

    def tower(side: str, raw: Port) -> tuple[list[Wire], Port | None, Port | None]:
        t = getattr(recipe, side)
        wires: list[Wire] = []
        current: tuple[Port, str] = (raw, f"the {side} data")
        local = None
        for slot in [t.encoder, *t.reasoners]:
            w = _connect(slot, {"x": {type(current[0]): current}}, problems)
            if w is None:
                return wires, None, None
            if not isinstance(w.output, LocalPort):
                problems.append(Problem(slot.path, f"a {slot.spec.kind} here must produce LocalPort, {slot.spec.name} produces {w.output.describe()}"))
                return wires, None, None
            wires.append(w)
            current = (w.output, f"{slot.path} ({slot.spec.name})")
            local = w.output
        glob = None
        if t.pool is not None:
            w = _connect(t.pool, {"x": {type(current[0]): current}}, problems)
            if w is None:
                return wires, local, None
            if not isinstance(w.output, GlobalPort):
                problems.append(Problem(t.pool.path, f"a pool must produce GlobalPort, {t.pool.spec.name} produces {w.output.describe()}"))
                return wires, local, None
            wires.append(w)
            glob = w.output
        return wires, local, glob

    image_wires, image_local, image_global = tower("image", RegionsPort(data.feature_dim))
    text_wires, text_local, text_global = tower("text", TokensPort(data.vocab_size, data.mask_id))

    def side_offers(side: str, local: Port | None, glob: Port | None) -> dict[type[Port], tuple[Port, str]]:
        offers = {}
        if local is not None:
            offers[LocalPort] = (local, f"[{side}] fragments")
        if glob is not None:
            offers[GlobalPort] = (glob, f"[{side}] pool")
        return offers

    towers = {"image": side_offers("image", image_local, image_global), "text": side_offers("text", text_local, text_global)}
    for side in ("image", "text"):  # a tower's pooled vectors by their own name, beside its fragments
        towers[f"{side}_global"] = {k: v for k, v in towers[side].items() if k is GlobalPort}
    branches = []
    for branch in recipe.match:
        wires: list[Wire] = []
        previous: tuple[Port, str] | None = None
        for slot in branch.slots():
            available = dict(towers)
            if previous is not None:
                available["x"] = {type(previous[0]): previous}
            w = _connect(slot, available, problems)
            if w is None:
                break
            if slot is branch.pair and not isinstance(w.output, PairLocalPort):
                problems.append(Problem(slot.path, f"a pair stage must rebuild one side's fragments per pair"
                                                   f" (PairLocalPort), {slot.spec.name} produces {w.output.describe()}"))
                break
            wires.append(w)
            previous = (w.output, f"{slot.path} ({slot.spec.name})")
        else:
            if previous and not isinstance(previous[0], ScorePort):
                problems.append(Problem(branch.path, f"a [[match]] branch must end in a score (ScorePort), it ends in {previous[0].describe()}: add an `aggregate` stage"))
        branches.append(tuple(wires))

    scores = {"x": {ScorePort: (ScorePort(), SCORES)}}
    loss = _connect(recipe.loss, scores, problems)
    # An objective reads the batch's scores, the towers' outputs, the raw batch and the parameters.
    batch = {"regions": {RegionsPort: (RegionsPort(data.feature_dim), REGIONS)},
             "tokens": {TokensPort: (TokensPort(data.vocab_size, data.mask_id), TOKENS)},
             "parameters": {ParametersPort: (ParametersPort(), PARAMETERS)}}
    objectives = [_connect(o.slot, {**towers, **scores, **batch}, problems) for o in recipe.objectives]
    for w in [loss, *objectives]:  # a local stage file is never run through the conformance kit
        if w is not None and not isinstance(w.output, LossPort):
            problems.append(Problem(w.slot.path, f"stage {w.slot.spec.name} produces {w.output.describe()}, but this"
                                                 " slot needs a training loss (its ports() must return a LossPort)"))
    if problems:
        raise RecipeError(recipe.source, problems)
    return Wiring(tuple(image_wires), tuple(text_wires), tuple(branches), loss, image_global is not None,
                  text_global is not None, tuple(objectives))


# ================================================================================ the model


@attrs.frozen
class Encoded:
    """One side encoded: fragments (Local) and, if the tower has a pool, global vectors.

    A scoring gallery drops the half no branch reads, so either may be None there.
    """

    local: Local | None
    global_: torch.Tensor | None = None

    def select(self, rows: slice | torch.Tensor) -> Encoded:
        return Encoded(None if self.local is None else self.local.select(rows),
                       None if self.global_ is None else self.global_[rows])

    def split(self, size: int) -> list[Encoded]:
        """Consecutive groups of ``size`` items (``Local.split``: one autograd node per tensor)."""
        locals_ = self.local.split(size) if self.local is not None else None
        globals_ = self.global_.split(size) if self.global_ is not None else None
        groups = len(locals_ if locals_ is not None else globals_)
        return [Encoded(None if locals_ is None else locals_[i], None if globals_ is None else globals_[i])
                for i in range(groups)]

    def to(self, device: torch.device | str) -> Encoded:
        local = None
        if self.local is not None:
            local = Local(self.local.feats.to(device), self.local.mask.to(device),
                          {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.local.extras.items()})
        return Encoded(local, None if self.global_ is None else self.global_.to(device))


@attrs.frozen
class Step:
    """One training step's result: the total loss, the B x B scores, and each term by name (objectives' unweighted; a branch stage's as the stage weighted it)."""

    loss: torch.Tensor
    scores: torch.Tensor
    terms: dict[str, torch.Tensor]

    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loss, self.scores


class Tower(nn.Module):
    """encoder -> reasoners -> [pool], each stage's output feeding the next."""

    def __init__(self, encoder: nn.Module, reasoners: list[nn.Module], pool: nn.Module | None):
        super().__init__()
        self.encoder = encoder
        self.reasoners = nn.ModuleList(reasoners)
        self.pool = pool

    def forward(self, x: Regions | Tokens) -> Encoded:
        local = self.encoder(x)
        for reasoner in self.reasoners:
            local = reasoner(local)
        return Encoded(local, self.pool(local) if self.pool is not None else None)


class Branch(nn.Module):
    """One [[match]] branch: its stages in order, each fed from the towers or the previous stage."""

    def __init__(self, stages: list[nn.Module], sources: list[dict[str, str]], weight: float,
                 labels: list[str] | None = None):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.sources = sources
        self.weight = weight
        # Each stage's slot and name ("match[0].cross (scan.t2i)"): how itmkit.explain labels its attention.
        self.labels = labels or [type(stage).__name__ for stage in stages]
        # Which stages take the training step's BlockContext (a keyword ``context`` in their forward).
        self.takes_context = [_takes_context(stage) for stage in stages]

    def forward(self, image: Encoded, text: Encoded, context: BlockContext | None = None) -> torch.Tensor:
        """The branch's (Ni, Nt) scores; ``context`` (training only) goes to the stages that take it."""
        values: dict[str, Any] = {"[image] fragments": image.local, "[image] pool": image.global_,
                                  "[text] fragments": text.local, "[text] pool": text.global_}
        out: Any = None
        recording = explain.active()
        for stage, sources, takes, label in zip(self.stages, self.sources, self.takes_context, self.labels):
            kwargs = {name: (out if name == "x" else values[src]) for name, src in sources.items()}
            if takes and context is not None:
                kwargs["context"] = context
            if recording is not None:
                recording.stage = label
            out = stage(**kwargs)
            if recording is not None and isinstance(out, Aligned):  # the weights its similarity reads
                x = kwargs.get("x")  # regions a pair stage rearranged are drawn back where they are
                order = x.order if isinstance(x, PairLocal) and x.side == "image" else None
                explain.note_attention(out.weights, out.query_side, region_order=order)
        return out


# Bytes of pair-wise working memory per block of a training step's scores (``ITMModel.score_batch``). On a
# CPU, smaller than the scoring engine's 128 MiB: the backward pass walks every block's saved tensors again.
# Measured at batch 64 (2-core Xeon, 2 threads, one step): SGRAF-SGR 9.7 s whole, 6.3 s at 128 MiB, 4.7 s at
# 32 and at 8 MiB; SCAN t-i 0.94 s whole, 0.85 s at 32 MiB, 1.00 s at 8 MiB. A GPU wants large blocks.
TRAIN_BLOCK_BYTES = {"cpu": 32 * 2**20, "gpu": 1024 * 2**20}


def _rows(x: Encoded) -> torch.Tensor:
    """The tensor that has one row per item of a side: its fragments, else its pooled vectors."""
    return x.local.feats if x.local is not None else x.global_


def _takes_context(module: nn.Module) -> bool:
    return "context" in inspect.signature(module.forward).parameters


class ITMModel(nn.Module):
    """Two towers, weighted matching branches and a loss, as a recipe wires them."""

    def __init__(self, recipe: Recipe, wiring: Wiring, data: DataPorts):
        super().__init__()
        self.recipe = recipe
        self.wiring = wiring
        self.data_ports = data

        def module(w: Wire) -> nn.Module:
            return w.slot.spec.build(**w.inputs)

        def tower(wires: tuple[Wire, ...], has_pool: bool) -> Tower:
            mods = [module(w) for w in wires]
            pool = mods.pop() if has_pool else None
            return Tower(mods[0], mods[1:], pool)

        self.image = tower(wiring.image, wiring.image_global)
        self.text = tower(wiring.text, wiring.text_global)
        self.branches = nn.ModuleList(
            Branch([module(w) for w in wires], [w.sources for w in wires], m.weight,
                   [f"{w.slot.path} ({w.slot.spec.name})" for w in wires])
            for wires, m in zip(wiring.branches, recipe.match)
        )
        self.loss = module(wiring.loss)
        # Training-only terms: built here so their weights train and are saved with the model.
        self.objectives = nn.ModuleList(module(w) for w in wiring.objectives)
        self.objective_sources = [w.sources for w in wiring.objectives]
        self.objective_weights = [o.weight for o in recipe.objectives]

    def encode_images(self, x: Regions) -> Encoded:
        return self.image(x)

    def encode_texts(self, x: Tokens) -> Encoded:
        return self.text(x)

    def score(self, image: Encoded, text: Encoded, contexts: list[BlockContext] | None = None) -> torch.Tensor:
        """(Ni, Nt) model scores: the weighted sum of the branches.

        ``contexts`` (training only): one BlockContext per branch, handed to the stages that take one.
        """
        total = None
        for k, branch in enumerate(self.branches):
            s = branch.weight * branch(image, text, contexts[k] if contexts is not None else None)
            total = s if total is None else total + s
        return total

    def score_batch(self, image: Encoded, text: Encoded, contexts: list[BlockContext]) -> torch.Tensor:
        """The training step's (Ni, Nt) scores, in column blocks of captions when the whole block is large.

        A pair-wise model (SGRAF's similarity graphs, SCAN's attended vectors) builds tensors of every
        pair's fragments: at batch 128 hundreds of MB each, which every operation and its backward then
        streams from memory. Blocks of captions sized like the scoring engine's (``TRAIN_BLOCK_BYTES``)
        keep each operation's tensors near the cache, forward and backward; the scores are the same
        concatenated. A branch whose stages read the block's context (its positives, its diagonal) gets
        the whole block.
        """
        n_images, n_captions = _rows(image).shape[0], _rows(text).shape[0]
        if any(any(branch.takes_context) for branch in self.branches):
            return self.score(image, text, contexts)
        pair = self.pair_bytes(text_len=text.local.feats.shape[1] if text.local is not None else 1,
                               image_len=image.local.feats.shape[1] if image.local is not None else 1)
        budget = TRAIN_BLOCK_BYTES["cpu" if _rows(image).device.type == "cpu" else "gpu"]
        columns = max(1, budget // max(pair * n_images, 1))
        if columns >= n_captions:
            return self.score(image, text, contexts)
        return torch.cat([self.score(image, part) for part in text.split(columns)], dim=1)

    def forward(self, images: Regions, texts: Tokens, image_ids: torch.Tensor, epoch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Training step on a batch of B captions with their images: (loss, B x B scores).

        The loss is the [loss] stage's plus each objective's value times its weight.
        """
        return self.training_step(images, texts, image_ids, epoch).pair()

    def training_step(self, images: Regions, texts: Tokens, image_ids: torch.Tensor, epoch: int = 0,
                      caption_image_ids: torch.Tensor | None = None) -> Step:
        """The training step with each term of the loss kept apart (for logging).

        ``image_ids`` names each image row's image, ``caption_image_ids`` each caption row's (default: the
        same, one caption per image row). With extra negatives the first B rows and columns are the pairs.

        Under a process group (``itmkit.distributed``) the batch is this rank's slice of the global batch:
        the loss and the objectives are computed on the global batch, every image of every rank against
        every caption, as one process with the whole batch would (``_global_step``).
        """
        image, text = self.encode_images(images), self.encode_texts(texts)
        caption_image_ids = image_ids if caption_image_ids is None else caption_image_ids
        if distributed.current().distributed:
            return self._global_step(images, texts, image, text, image_ids, caption_image_ids, epoch)
        positives = image_ids[:, None] == caption_image_ids[None, :]
        contexts = [BlockContext(positives, epoch) for _ in self.branches]
        scores = float32(self.score_batch(image, text, contexts))  # the loss in float32 under mixed precision
        loss = self.loss(scores, positives=positives, epoch=epoch)
        terms = {"loss": loss}
        for k, context in enumerate(contexts):  # the terms branch stages added (already weighted)
            for name, value in context.terms.items():
                terms[f"match[{k}].{name}"] = value
                loss = loss + value
        return self._add_objectives(loss, terms, scores, positives, image, text, images, texts, epoch)

    def _global_step(self, images: Regions, texts: Tokens, image: Encoded, text: Encoded, image_ids: torch.Tensor,
                     caption_image_ids: torch.Tensor, epoch: int) -> Step:
        """The step of one rank: its captions against every rank's images, then the global batch's loss.

        The block's rows are this rank's images first, then the other ranks' (the layout of a block with
        extra images: its first rows and columns are its pairs, what stages reading the block's diagonal
        expect), and are put back in rank order before the columns of all ranks are gathered. Every rank
        then computes the loss, and each objective, from the global batch, identically.
        """
        if images.feats.shape[0] != texts.ids.shape[0]:
            raise ItmkitError("extra negatives ([train] extra_captions / extra_images) are not supported when"
                              " training on several processes: train this recipe in one process")
        rank, mine = distributed.current().rank, image_ids.shape[0]
        every_image = _gather_encoded(image)
        every_id = distributed.gather_rows(image_ids)
        first = rank * mine
        order = torch.cat([torch.arange(first, first + mine), torch.arange(0, first),
                           torch.arange(first + mine, every_id.shape[0])]).to(every_id.device)
        contexts = [BlockContext(every_id[order][:, None] == caption_image_ids[None, :], epoch) for _ in self.branches]
        block = float32(self.score_batch(every_image.select(order), text, contexts))
        for k, context in enumerate(contexts):
            if context.terms:
                raise ItmkitError(
                    f"match[{k}] adds the training term(s) {', '.join(sorted(context.terms))} from its block of"
                    " scores; on several processes each rank's block holds only its own captions, so the term would"
                    " not be the one a single process computes: train this recipe in one process")
        scores = distributed.gather_columns(block[torch.argsort(order)])
        positives = every_id[:, None] == distributed.gather_rows(caption_image_ids)[None, :]
        loss = self.loss(scores, positives=positives, epoch=epoch)
        if not self.objectives:
            return Step(loss, scores, {"loss": loss})
        every_region = Regions(*(None if t is None else distributed.gather_rows(t) for t in
                                 (images.feats, images.lengths, images.boxes, images.image_sizes)))
        every_token = Tokens(distributed.gather_rows(texts.ids), distributed.gather_rows(texts.lengths))
        return self._add_objectives(loss, {"loss": loss}, scores, positives, every_image, _gather_encoded(text),
                                    every_region, every_token, epoch)

    def _add_objectives(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], scores: torch.Tensor,
                        positives: torch.Tensor, image: Encoded, text: Encoded, images: Regions, texts: Tokens,
                        epoch: int) -> Step:
        """Each objective's value on the (global) batch, weighted into the loss."""
        values = {"[image] fragments": image.local, "[image] pool": image.global_,
                  "[text] fragments": text.local, "[text] pool": text.global_,
                  SCORES: scores, REGIONS: images, TOKENS: texts, PARAMETERS: self.trained_parameters()}
        for k, (objective, sources, weight) in enumerate(zip(self.objectives, self.objective_sources,
                                                             self.objective_weights)):
            value = objective(**{name: values[src] for name, src in sources.items()}, positives=positives,
                              epoch=epoch)
            if not isinstance(value, torch.Tensor) or value.dim() != 0:
                got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
                raise ItmkitError(f"objective[{k}] ({self.wiring.objectives[k].slot.spec.name}) returned {got};"
                                  " expected a scalar tensor (a bug in that stage's module)")
            terms[f"objective[{k}]"] = value
            loss = loss + weight * value
        return Step(loss, scores, terms)

    def trained_parameters(self) -> dict[str, nn.Parameter]:
        """The towers' and branches' trainable parameters by state-dict name (what a ParametersPort carries)."""
        return {name: p for name, p in self.named_parameters()
                if p.requires_grad and name.split(".", 1)[0] in ("image", "text", "branches")}

    def reads(self, side: str) -> tuple[bool, bool]:
        """Whether the branches read ``side``'s (fragments, pooled vectors): what scoring must keep."""
        sources = {src for b in self.wiring.branches for w in b for src in w.sources.values()}
        return f"[{side}] fragments" in sources, f"[{side}] pool" in sources

    def pair_bytes(self, text_len: int, image_len: int) -> int:
        """Working memory of one image x caption pair across all branches (for block sizing)."""
        return sum(
            wired_pair_bytes(w.slot.spec, text_len=text_len, image_len=image_len, ports=w.inputs)
            for b in self.wiring.branches for w in b
        )


def _gather_encoded(x: Encoded) -> Encoded:
    """Every rank's encodings of one side in rank order (fragments padded to the longest), with gradients."""
    local = None
    if x.local is not None:
        extras = {k: distributed.gather_rows(v) if torch.is_tensor(v) else v for k, v in x.local.extras.items()}
        local = Local(distributed.gather_rows(x.local.feats), distributed.gather_rows(x.local.mask), extras)
    return Encoded(local, None if x.global_ is None else distributed.gather_rows(x.global_))


def build_model(recipe: Recipe, data: DataPorts, seed: int | None = None) -> ITMModel:
    """Wire and build; with ``seed`` the initial weights are reproducible."""
    wiring = wire(recipe, data)
    if seed is not None:
        torch.manual_seed(seed)
    model = ITMModel(recipe, wiring, data)
    if recipe.phases:  # every path a [[train.phase]] names must name a part or switch of this model
        from itmkit.phases import resolve_schedule

        resolve_schedule(model)
    return model


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def stage_tree(model: ITMModel) -> list[dict[str, Any]]:
    """One row per stage: key path, registered name, consumes, produces, parameter count."""
    rows = []
    modules = [model.image.encoder, *model.image.reasoners] + ([model.image.pool] if model.image.pool is not None else [])
    modules += [model.text.encoder, *model.text.reasoners] + ([model.text.pool] if model.text.pool is not None else [])
    for branch in model.branches:
        modules += list(branch.stages)
    modules.append(model.loss)
    modules += list(model.objectives)
    for w, m in zip(model.wiring.all(), modules):
        rows.append({
            "path": w.slot.path,
            "stage": w.slot.spec.name,
            "consumes": ", ".join(f"{n}: {p.describe()}" for n, p in w.inputs.items()),
            "produces": w.output.describe(),
            "params": count_parameters(m),
        })
    return rows
