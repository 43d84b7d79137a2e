"""Staged training: which parts of the model train in which epochs, at which rate, with which switches.

A recipe's ``[[train.phase]]`` tables (``itmkit.recipe.PhaseSpec``) cut the epochs into phases. DP-RNN
trains its cross matching first, then its object RNN alone, then everything (Chen & Luo, AAAI 2020,
§3.4); nothing in here knows that. The trainer asks ``Schedule.at(epoch)`` at the start of every epoch,
so a resumed run re-enters the phase its epoch belongs to.

A *part* is named as the recipe names it (``image``, ``text.encoder``, ``image.reasoners[0]``,
``match[0]``, ``match[0].similarity``, ``loss``, ``objective[0]``), optionally followed by a submodule
of that stage (``match[0].similarity.object_rnn``). A *switch* is a stage's bool buffer (registered
with ``register_buffer``): a buffer, so it is saved in checkpoints and a model saved with a switch off
scores that way later. A part that does not train in a phase gets no gradient and runs in eval mode
(no dropout, BatchNorm statistics kept), so its parameters and buffers do not change.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import attrs
import torch
from torch import nn

from itmkit.errors import did_you_mean
from itmkit.recipe import PhaseSpec, Recipe, RecipeError
from itmkit.structure import Problem

if TYPE_CHECKING:
    from itmkit.build import ITMModel


def model_parts(model: ITMModel) -> dict[str, nn.Module]:
    """The model's parts by the recipe's key paths: towers, their stages, branches, their stages, loss, objectives."""
    r = model.recipe
    parts: dict[str, nn.Module] = {"image": model.image, "text": model.text, "loss": model.loss}
    for side, tower in (("image", model.image), ("text", model.text)):
        spec = getattr(r, side)
        parts[spec.encoder.path] = tower.encoder
        parts.update({slot.path: module for slot, module in zip(spec.reasoners, tower.reasoners)})
        if spec.pool is not None:
            parts[spec.pool.path] = tower.pool
    for match, branch in zip(r.match, model.branches):
        parts[match.path] = branch
        parts.update({slot.path: module for slot, module in zip(match.slots(), branch.stages)})
    for k, module in enumerate(model.objectives):
        parts[f"objective[{k}]"] = module
    return parts


def _find(parts: dict[str, nn.Module], path: str) -> tuple[nn.Module | None, str]:
    """(the module or owner a path names, the rest of the path below the longest part that prefixes it)."""
    for part in sorted(parts, key=len, reverse=True):
        if path == part:
            return parts[part], ""
        if path.startswith(part + "."):
            return parts[part], path[len(part) + 1:]
    return None, path


def _module_names(module: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}.{name}" if name else prefix for name, _ in module.named_modules()]


def switches(model: ITMModel) -> dict[str, tuple[nn.Module, str]]:
    """Every switch of the model: path -> (the module holding the bool buffer, the buffer's name)."""
    found: dict[str, tuple[nn.Module, str]] = {}
    for part, module in model_parts(model).items():
        if part in ("image", "text") or part.startswith("match[") and "." not in part:
            continue  # the stages below these are listed on their own
        for name, buffer in module.named_buffers():
            if buffer.dtype == torch.bool and buffer.dim() == 0:
                owner, _, attr = name.rpartition(".")
                found[f"{part}.{name}"] = (module.get_submodule(owner) if owner else module, attr)
    return found


@attrs.frozen
class Phase:
    """One phase as resolved against a model: its epochs, learning rate, trained parameters, switches off."""

    index: int
    spec: PhaseSpec
    first: int  # first epoch (0-based)
    stop: int | None  # epoch after the last; None for the last phase (until train.epochs)
    trained: frozenset[str]  # parameter names (model.named_parameters) that may train in this phase
    off: frozenset[str]  # switch paths turned off

    def label(self) -> str:
        return self.spec.name or f"phase {self.index + 1}"

    def epochs(self, total: int) -> str:
        """Its epochs, 1-based as logs count them: '1', '2-29', or 'not reached'."""
        last = total if self.stop is None else min(self.stop, total)
        if self.first >= last:
            return "not reached"
        return f"{self.first + 1}" if last == self.first + 1 else f"{self.first + 1}-{last}"


@attrs.frozen
class Schedule:
    """The phases of a recipe resolved against its model, and the parameters trainable at all."""

    phases: tuple[Phase, ...]
    trainable: frozenset[str]  # parameters with requires_grad when built (a frozen BERT stays frozen)
    switches: frozenset[str]

    def at(self, epoch: int) -> Phase | None:
        """The phase of ``epoch`` (0-based); None when the recipe has no phases."""
        for phase in self.phases:
            if phase.stop is None or epoch < phase.stop:
                return phase
        return None

    def lr(self, recipe: Recipe, epoch: int) -> float:
        """Step decay from the phase's rate (or train.lr): lr * lr_decay ** (epoch // lr_update)."""
        t = recipe.train
        phase = self.at(epoch)
        base = phase.spec.lr if phase is not None and phase.spec.lr is not None else t.lr
        return base * t.lr_decay ** (epoch // t.lr_update)

    def apply(self, model: ITMModel, epoch: int) -> None:
        """Set which parameters train and every switch for ``epoch``'s phase, and put the model in train mode
        with the parts that do not train in eval mode."""
        phase = self.at(epoch)
        trained = self.trainable if phase is None else phase.trained
        for name, p in model.named_parameters():
            p.requires_grad_(name in trained)
        owners = switches(model)
        for path in self.switches:
            module, attr = owners[path]
            getattr(module, attr).fill_(phase is None or path not in phase.off)
        model.train()
        if phase is not None:
            _eval_frozen(model, trained)


def _eval_frozen(module: nn.Module, trained: frozenset[str], prefix: str = "") -> None:
    """Eval mode for every largest submodule that has parameters and trains none of them."""
    names = [f"{prefix}{n}" for n, _ in module.named_parameters()]
    if names and not any(n in trained for n in names):
        module.eval()
        return
    for child_name, child in module.named_children():
        _eval_frozen(child, trained, f"{prefix}{child_name}.")


def resolve_schedule(model: ITMModel) -> Schedule:
    """The recipe's phases against ``model``; a RecipeError lists every path that names nothing."""
    recipe = model.recipe
    parts = model_parts(model)
    owners = switches(model)
    trainable = frozenset(n for n, p in model.named_parameters() if p.requires_grad)
    prefixes = {id(m): name for name, m in model.named_modules()}
    problems: list[Problem] = []
    phases: list[Phase] = []
    first = 0
    known = sorted({name for part, m in parts.items() for name in _module_names(m, part)})
    for i, spec in enumerate(recipe.phases):
        trained: set[str] = set()
        for j, path in enumerate(spec.train if spec.train is not None else ()):
            module, rest = _find(parts, path)
            target = None
            if module is not None:
                try:
                    target = module.get_submodule(rest) if rest else module
                except AttributeError:
                    target = None
            if target is None:
                problems.append(Problem(f"train.phase[{i}].train[{j}]", f"{path!r} names no part of the model"
                                        + did_you_mean(path, known)))
                continue
            prefix = prefixes[id(target)]
            found = {n for n in trainable if n.startswith(prefix + ".")}
            if not found:
                problems.append(Problem(f"train.phase[{i}].train[{j}]", f"{path!r} has no trainable parameters"
                                        " (none, or all frozen when built): training it would change nothing"))
            trained |= found
        for j, path in enumerate(spec.off):
            if path not in owners:
                choices = sorted(owners)
                listed = f" (the switches: {', '.join(choices)})" if choices else " (this model has no switches)"
                problems.append(Problem(f"train.phase[{i}].off[{j}]", f"{path!r} is not a switch" + listed
                                        + did_you_mean(path, choices)))
        last = i == len(recipe.phases) - 1
        phases.append(Phase(i, spec, first, None if last else first + spec.epochs,
                            trainable if spec.train is None else frozenset(trained), frozenset(spec.off)))
        first += spec.epochs
    if problems:
        raise RecipeError(recipe.source, problems)
    used = frozenset(path for p in phases for path in p.off)
    return Schedule(tuple(phases), trainable, used)


def schedule_rows(schedule: Schedule, model: ITMModel, total_epochs: int) -> list[dict[str, str]]:
    """One row per phase for ``itmkit build``: epochs, learning rate, what trains, what is frozen, switches off."""
    names = {id(m): name for name, m in model.named_modules()}
    tops = {"image": model.image, "text": model.text, "loss": model.loss,
            **{m.path: b for m, b in zip(model.recipe.match, model.branches)},
            **{f"objective[{k}]": o for k, o in enumerate(model.objectives)}}
    rows = []
    for phase in schedule.phases:
        frozen = []
        for path, module in tops.items():  # the top-level parts with trainable parameters, none trained here
            params = {f"{names[id(module)]}.{n}" for n, _ in module.named_parameters()} & schedule.trainable
            if params and not params & phase.trained:
                frozen.append(path)
        rows.append({"phase": phase.label(), "epochs": phase.epochs(total_epochs),
                     "lr": "train.lr" if phase.spec.lr is None else f"{phase.spec.lr:g}",
                     "trains": ", ".join(phase.spec.train) if phase.spec.train is not None else "everything",
                     "frozen": ", ".join(frozen) or "-", "off": ", ".join(phase.spec.off) or "-"})
    return rows
