"""The training loop: a readable loop over the assembled model.

Each epoch: shuffled caption batches (order fixed by seed and epoch), loss, gradient clipping,
an optimiser step; then validation on the dev split, ``metrics.jsonl`` lines, the best
checkpoint by dev rSum, and ``last.safetensors`` holding everything ``--resume`` needs. At the
end the best checkpoint is evaluated on the test split by the recipe's protocol.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import attrs
import torch

from itmkit.allocator import reuse_freed_memory
from itmkit.build import build_model
from itmkit.checkpoint import (
    atomic_write_text,
    load_checkpoint,
    optimizer_to_tensors,
    check_resumed_recipe,
    resume_training,
    save_checkpoint,
)
from itmkit.data.loader import add_extra_negatives, extra_negatives_generator, train_loader
from itmkit.datasets import data_ports, resolve_data_dir, text_vocabulary
from itmkit.errors import DataError, ItmkitError
from itmkit.evaluate import evaluate
from itmkit.phases import resolve_schedule
from itmkit.preflight import check_model_fits, check_training_data
from itmkit.progress import task
from itmkit.recipe import Recipe
from itmkit.runs import check_run_folder, own_run_folder
from itmkit.types import Regions, Tokens

BEST, LAST = "model_best.safetensors", "last.safetensors"


@attrs.frozen
class TrainResult:
    out_dir: Path
    best_epoch: int
    best_dev_rsum: float
    test: dict[str, float]
    seconds: float


def parameter_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Trainable parameters, grouped by learning-rate scale.

    A submodule with a float attribute ``lr_scale`` trains its parameters at that multiple of
    the learning rate (GPO trains BERT at 0.1x); the innermost such module wins. One group
    when nothing sets a scale.
    """
    scales: dict[int, float] = {}
    for module in model.modules():  # parents before children, so the innermost scale is set last
        scale = getattr(module, "lr_scale", None)
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            scales.update({id(p): float(scale) for p in module.parameters()})
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault(scales.get(id(p), 1.0), []).append(p)
    return [{"params": params, "lr_scale": scale} for scale, params in groups.items()]


def make_optimizer(recipe: Recipe, model: torch.nn.Module) -> torch.optim.Optimizer:
    t = recipe.train
    groups = parameter_groups(model)
    for group in groups:
        group["lr"] = t.lr * group["lr_scale"]
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "adamax":
        return torch.optim.Adamax(groups, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.Adam(groups, lr=t.lr, weight_decay=t.weight_decay)


class TrainingStopped(ItmkitError):
    """Training cannot go on: a loss or a weight is no longer a finite number."""


def strict_json(record: dict[str, Any], **kwargs: Any) -> str:
    """JSON that strict readers accept: a non-finite float (which the guards below should never let
    through) is written as null, never as the bare NaN / Infinity tokens json.dumps writes by default."""
    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        return None if isinstance(value, float) and not math.isfinite(value) else value

    return json.dumps(clean(record), allow_nan=False, **kwargs)


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(strict_json(record) + "\n")
        f.flush()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; a torn last line (a run killed mid-write) is dropped.

    Only the last line can be torn, since lines are appended whole; a bad line before it means the
    file was edited or damaged, which is an error naming the line.
    """
    lines = path.read_bytes().split(b"\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            record, problem = None, str(exc)
        else:
            problem = "" if isinstance(record, dict) else f"a JSON {type(record).__name__}, not an object"
        if problem:
            if not any(rest.strip() for rest in lines[number:]):
                break  # the torn last line
            raise DataError(f"{path}, line {number}: not a metrics record ({problem}); only a torn last line is"
                            " dropped on --resume: fix or delete that line, or start the run afresh")
        records.append(record)
    return records


def _keep_epochs_up_to(path: Path, last_epoch: int) -> None:
    """On resume, drop metric lines of epochs that will be run again (and a torn last line)."""
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if r.get("epoch", -1) <= last_epoch]
    atomic_write_text(path, "".join(strict_json(r) + "\n" for r in kept))


def _nonfinite_parameter(model: torch.nn.Module) -> str | None:
    """The name of the first parameter holding NaN or inf, or None."""
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            return name
    return None


def _stop(message: str, out: Path, data_dir: Path) -> TrainingStopped:
    return TrainingStopped(
        f"{message}; NaN or inf in the features (run `itmkit data check {data_dir}`), a learning rate"
        f" too high (train.lr), or, with clean data, a bug in a stage's backward (rerun with --debug and report it)?"
        f" Nothing of this epoch was saved: the checkpoints in {out}, if any, are earlier epochs'"
    )


def train(
    recipe: Recipe,
    *,
    out_dir: str | Path,
    device: str | torch.device = "cpu",
    resume: bool = False,
    progress=None,
    log=print,
) -> TrainResult:
    """Train ``recipe`` into ``out_dir``; returns the test metrics of the best dev checkpoint.

    The run folder is held for the whole run (a second run into it is refused); temporaries that
    a killed run left there are removed first (``itmkit.runs``). A folder of other files than a
    run's is refused, and ``resume`` continues only with the recipe the run was started with.
    """
    earlier = check_run_folder(out_dir, resume=resume)  # refuses a folder of the user's files
    with own_run_folder(out_dir) as out:
        if resume and (out / LAST).exists():
            check_resumed_recipe(out / LAST, recipe)  # before any data is read: only train.epochs may change
        elif earlier and not resume:
            log(f"{out} holds an earlier run ({', '.join(earlier)}): starting afresh replaces its checkpoints and"
                " metrics; --resume continues that run instead")
        return _train(recipe, out, device=device, resume=resume, progress=progress, log=log)


def _train(recipe: Recipe, out: Path, *, device: str | torch.device, resume: bool, progress, log) -> TrainResult:
    start_time = time.perf_counter()
    reuse_freed_memory()
    t = recipe.train
    device = torch.device(device)

    with task(progress, "generate built-in data", None) as update:
        data_dir = resolve_data_dir(recipe.data.path, progress=lambda name, done, total: update(done, total, info=name),
                                    log=log)
    # Every split the run reads, checked against the recipe and the protocol before epoch 1.
    with task(progress, "check data", None):
        splits = check_training_data(recipe, data_dir, resume_from=out / LAST if resume else None)
    train_split, test_split = splits.train, splits.test
    dev_split = splits.dev.truncate(recipe.data.dev_images)
    vocab = text_vocabulary(recipe, data_dir, train_split)
    ports = data_ports(train_split, vocab)

    model = build_model(recipe, ports, seed=t.seed).to(device)
    check_model_fits(model, {"train": train_split, "dev": dev_split, "test": test_split}, f"the model of {recipe.info.name}")
    schedule = resolve_schedule(model)  # before the optimizer: it holds every part that trains in some phase
    optimizer = make_optimizer(recipe, model)
    metrics_path = out / "metrics.jsonl"
    first_epoch, best_rsum, best_epoch = 0, -math.inf, -1

    if resume and (out / LAST).exists():
        state = resume_training(out / LAST, model, optimizer, device)  # checks the trainer state first
        first_epoch = state.epoch + 1
        best_rsum, best_epoch = state.best_rsum, state.best_epoch
        _keep_epochs_up_to(metrics_path, first_epoch - 1)
        log(f"resuming {out / LAST} after epoch {first_epoch - 1} (best dev rsum {best_rsum:.2f})")
    else:
        metrics_path.unlink(missing_ok=True)
        torch.manual_seed(t.seed)
    atomic_write_text(out / "recipe.toml", recipe.to_toml())

    meta = {"seed": t.seed, "protocol": recipe.data.protocol, "data": str(data_dir)}
    iteration = first_epoch * (train_split.num_captions // t.batch_size)
    for epoch in range(first_epoch, t.epochs):
        lr = schedule.lr(recipe, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        schedule.apply(model, epoch)  # model.train(), with this epoch's phase: what trains, its switches
        phase = schedule.at(epoch)
        if phase is not None and epoch == max(phase.first, first_epoch):
            log(f"{phase.label()} (epochs {phase.epochs(t.epochs)}): trains"
                f" {', '.join(phase.spec.train) if phase.spec.train is not None else 'everything'}"
                + (f"; off: {', '.join(phase.spec.off)}" if phase.spec.off else ""))
        loader = train_loader(train_split, vocab, batch_size=t.batch_size, seed=t.seed, epoch=epoch)
        extras = extra_negatives_generator(t.seed, epoch)
        loss_sum, batches, term_sums = 0.0, 0, {}
        with task(progress, f"epoch {epoch + 1}/{t.epochs}", len(loader)) as update:
            for batch in loader:
                if t.extra_captions or t.extra_images:
                    batch = add_extra_negatives(batch, loader.dataset, extras, captions=t.extra_captions,
                                                images=t.extra_images)
                batch = batch.to(device)
                regions = Regions(batch.images, batch.image_lengths, batch.boxes, batch.image_sizes)
                step = model.training_step(regions, Tokens(batch.tokens, batch.lengths), batch.image_ids, epoch=epoch,
                                           caption_image_ids=batch.caption_image_ids)
                loss = step.loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # The gradient norm is wanted even unclipped (max_norm inf scales by exactly 1): a finite loss
                # with a NaN gradient is a backward through 0 x inf, and it would turn every weight to NaN.
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                           t.grad_clip if t.grad_clip > 0 else math.inf)
                optimizer.step()
                value, norm = loss.item(), float(grad_norm)  # after the step: no extra sync on a GPU
                if not (math.isfinite(value) and math.isfinite(norm)):
                    what = (f"the loss is {value}" if not math.isfinite(value)
                            else f"the gradient norm is {norm} (loss {value:.4g})")
                    raise _stop(f"training stopped at epoch {epoch + 1}, batch {batches + 1} of {len(loader)}:"
                                f" {what} (images {batch.image_ids[:8].tolist()}, captions"
                                f" {batch.caption_ids[:8].tolist()} of split {train_split.name!r})", out, data_dir)
                loss_sum += value
                if len(step.terms) > 1:  # with objectives, each term's sum too (unweighted)
                    for name, term in step.terms.items():
                        term_sums[name] = term_sums.get(name, 0.0) + term.item()
                batches += 1
                iteration += 1
                update(batches, info=f"loss {loss_sum / batches:.3f}")
                if iteration % t.log_every == 0:
                    _append_jsonl(metrics_path, {"epoch": epoch, "iteration": iteration, "loss": value, "lr": lr})

        bad = _nonfinite_parameter(model)
        if bad:
            raise _stop(f"training stopped after epoch {epoch + 1}: parameter {bad} holds NaN or inf", out, data_dir)
        dev = evaluate(model, vocab, dev_split, "f30k-1k", device=device, batch_size=t.eval_batch_size, progress=progress)
        record = {"epoch": epoch, "iteration": iteration, "split": "dev", "train_loss": loss_sum / max(batches, 1),
                  "lr": lr, **dev}
        if term_sums:  # the [loss] stage's and each objective's mean, unweighted
            record["train_terms"] = {name: total / max(batches, 1) for name, total in term_sums.items()}
        _append_jsonl(metrics_path, record)
        log(f"epoch {epoch + 1}/{t.epochs}: loss {record['train_loss']:.3f}  dev rsum {dev['rsum']:.2f}"
            f"  (i2t R@1 {dev['i2t_r1']:.1f}, t2i R@1 {dev['t2i_r1']:.1f})")
        if dev["rsum"] > best_rsum:
            best_rsum, best_epoch = dev["rsum"], epoch
            save_checkpoint(out / BEST, model, vocab, epoch=str(epoch), rsum=str(dev["rsum"]), **meta)
        optimizer_tensors, optimizer_blob = optimizer_to_tensors(optimizer)
        trainer = {**optimizer_tensors, "rng.torch": torch.get_rng_state()}
        save_checkpoint(out / LAST, model, vocab, trainer=trainer, epoch=str(epoch), rsum=str(dev["rsum"]),
                        best_rsum=str(best_rsum), best_epoch=str(best_epoch), optimizer=optimizer_blob, **meta)

    best = load_checkpoint(out / BEST, device)
    test = evaluate(best.model, vocab, test_split, recipe.data.protocol, device=device,
                    batch_size=t.eval_batch_size, progress=progress)
    summary = {"split": recipe.data.test_split, "protocol": recipe.data.protocol, "best_epoch": best_epoch,
               "best_dev_rsum": best_rsum, **test}
    atomic_write_text(out / "test_metrics.json", strict_json(summary, indent=2) + "\n")
    return TrainResult(out, best_epoch, best_rsum, test, time.perf_counter() - start_time)
