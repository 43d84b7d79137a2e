"""The training loop: a readable loop over the assembled model.

Each epoch: shuffled caption batches (order fixed by seed and epoch), loss, gradient clipping,
an optimiser step; then validation on the dev split, ``metrics.jsonl`` lines, the best
checkpoint by dev rSum, and ``last.safetensors`` holding everything ``--resume`` needs. At the
end the best checkpoint is evaluated on the test split by the recipe's protocol.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import attrs
import torch

from itmkit import distributed
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
from itmkit.errors import CheckpointError, DataError, ItmkitError
from itmkit.evaluate import evaluate
from itmkit.evaluation import METRIC_KEYS
from itmkit.phases import resolve_schedule
from itmkit.precision import autocast, check_precision, grad_scaler
from itmkit.preflight import check_model_fits, check_training_data
from itmkit.progress import task
from itmkit.recipe import Recipe
from itmkit.runs import check_run_folder, own_run_folder
from itmkit.types import Regions, Tokens

BEST, LAST = "model_best.safetensors", "last.safetensors"
TENSORBOARD_DIR = "tensorboard"  # --tensorboard: the event files, inside the run folder


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


def summary_writer_class():
    """torch's SummaryWriter; an ItmkitError saying how to install TensorBoard (an optional dependency) if it
    cannot be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ItmkitError(f"--tensorboard needs the tensorboard package, which cannot be imported here ({exc}):"
                          " pip install 'itmkit[tensorboard]'") from None
    return SummaryWriter


def tensorboard_scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record's numbers as TensorBoard tags: a step's under ``step/`` (``step/loss``), an
    epoch's retrieval metrics under its split (``dev/rsum``) and its training figures under ``train/``, a
    ``train_`` prefix dropped (``train/loss``, ``train/terms/NAME``). ``epoch`` and ``iteration`` are not
    scalars: the iteration is the step every scalar of the record is written at; a null is left out."""
    split = record.get("split")
    tags: dict[str, float] = {}
    for key, value in record.items():
        if key in ("epoch", "iteration", "split"):
            continue
        group = "step" if split is None else split if key in METRIC_KEYS else "train"
        name = f"{group}/{key.removeprefix('train_') if group == 'train' else key}"
        items = value.items() if isinstance(value, dict) else [("", value)]
        for sub, number in items:
            if isinstance(number, (int, float)) and not isinstance(number, bool):
                tags[f"{name}/{sub}" if sub else name] = float(number)
    return tags


class TensorBoardLog:
    """TensorBoard event files in ``RUN/tensorboard/`` beside metrics.jsonl (``--tensorboard``): each record's
    scalars (``tensorboard_scalars``) at its iteration, flushed as its line is, so a killed run keeps them.

    Opened once the run knows where it starts: a resumed run adds an event file beside the earlier ones, with a
    ``purge_step`` that hides what they hold after the step it resumes from, as metrics.jsonl's lines after it
    are dropped. Closed by whoever made it (``train``), however the run ends.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self.writer = None

    def open(self, purge_step: int | None) -> None:
        self.writer = summary_writer_class()(log_dir=str(self.folder), purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        for tag, value in tensorboard_scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=record["iteration"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _log_record(path: Path, board: TensorBoardLog | None, record: dict[str, Any]) -> None:
    _append_jsonl(path, record)
    if board is not None:
        board.write(record)


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


def _keep_metrics_before(path: Path, epoch: int, iteration: int | None) -> None:
    """On resume, drop the metric lines that will be written again (and a torn last line): those of epochs
    from ``epoch`` on, or, resuming within ``epoch`` after step ``iteration``, its lines after that step."""
    if not path.exists():
        return
    kept = [r for r in read_metrics(path) if r.get("epoch", -1) < epoch or (
        iteration is not None and r.get("epoch") == epoch and "split" not in r and r.get("iteration", 0) <= iteration)]
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


@attrs.define
class EpochProgress:
    """How far an epoch has got: what its dev record and a step checkpoint within it need."""

    batches: int = 0  # batches done (global batches)
    iteration: int = 0  # the run's step count after the last of them
    loss_sum: float = 0.0
    term_sums: dict[str, float] = attrs.field(factory=dict)
    captions: int = 0
    seconds: float = 0.0  # training time only (no evaluation, no saving)

    def add(self, loss: float, terms: dict[str, float], iteration: int, *, captions: int, seconds: float) -> None:
        self.batches += 1
        self.iteration = iteration
        self.loss_sum += loss
        for name, value in terms.items():
            self.term_sums[name] = self.term_sums.get(name, 0.0) + value
        self.captions += captions
        self.seconds += seconds

    def captions_per_s(self) -> float:
        return self.captions / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self))  # floats as repr: read back exactly

    @classmethod
    def from_json(cls, text: str, source: Path) -> EpochProgress:
        try:
            fields = json.loads(text)
            progress = cls(**fields)
            numbers = [progress.batches, progress.iteration, progress.captions]
            if not all(type(n) is int and n >= 0 for n in numbers) or not isinstance(progress.term_sums, dict):
                raise ValueError("counts must be whole numbers >= 0")
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{source}: metadata 'partial' is not the progress of an epoch ({exc}); the file"
                                  " was edited or damaged: resume from an intact last.safetensors or start afresh"
                                  ) from None
        return progress


class _Stepper(torch.nn.Module):
    """The model's training step as a module's forward, which DistributedDataParallel needs to wrap."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        step = self.model.training_step(*args, **kwargs)
        return step.loss, step.scores, step.terms


def _training_stepper(model: torch.nn.Module, ranks: distributed.Ranks, device: torch.device) -> torch.nn.Module:
    """The step, wrapped in DistributedDataParallel under torchrun (gradients averaged over the ranks).

    Built each epoch, after the phase has set what trains: DDP synchronises the parameters that require
    gradients when it is built. ``find_unused_parameters``: a pool no branch reads gets no gradient.
    """
    stepper = _Stepper(model)
    if not ranks.distributed:
        return stepper
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(stepper, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


def _restore_rank_rng(state, ranks: distributed.Ranks, seed: int, log) -> None:
    """Each rank's RNG as the stopped run left it (rank 0's is restored with the checkpoint)."""
    if not ranks.distributed or ranks.main:
        return
    saved = state.rank_rngs
    if saved is not None and saved.shape[0] == ranks.world:
        torch.set_rng_state(saved[ranks.rank])
        return
    torch.manual_seed(seed + ranks.rank + 7919 * (state.epoch + 2))
    if ranks.rank == 1:
        print(f"rank 1: the checkpoint holds no RNG state for a run of {ranks.world} processes (it was written by"
              " another number of them): ranks other than 0 draw new dropout masks from here", flush=True)


def train(
    recipe: Recipe,
    *,
    out_dir: str | Path,
    device: str | torch.device = "cpu",
    resume: bool = False,
    save_every: int = 0,
    precision: str = "fp32",
    tensorboard: bool = False,
    progress=None,
    log=print,
) -> TrainResult:
    """Train ``recipe`` into ``out_dir``; returns the test metrics of the best dev checkpoint.

    The run folder is held for the whole run (a second run into it is refused); temporaries that
    a killed run left there are removed first (``itmkit.runs``). A folder of other files than a
    run's is refused, and ``resume`` continues only with the recipe the run was started with.
    ``precision`` bf16 or fp16 trains and evaluates under autocast (``itmkit.precision``).
    ``save_every`` N > 0 also writes ``last.safetensors`` every N steps, so that a run killed mid-epoch
    resumes at its last such step and ends as an uninterrupted run would. ``tensorboard`` also writes the
    metrics as TensorBoard event files into ``out_dir/tensorboard`` (``TensorBoardLog``).

    Started by torchrun (``WORLD_SIZE`` > 1), each process trains on its share of every global batch
    of ``train.batch_size`` (``itmkit.distributed``); rank 0 alone holds the folder, writes checkpoints
    and metrics, logs and shows progress.
    """
    if tensorboard:
        summary_writer_class()  # a missing TensorBoard is said before anything starts
    with distributed.process_group(torch.device(device)) as (ranks, device):
        if not ranks.main:
            progress, log = None, _quiet
            return _train(recipe, Path(out_dir), device=device, resume=resume, save_every=save_every, precision=precision,
                          progress=progress, log=log, ranks=ranks, board=None)
        earlier = check_run_folder(out_dir, resume=resume)  # refuses a folder of the user's files
        with own_run_folder(out_dir) as out, contextlib.closing(TensorBoardLog(out / TENSORBOARD_DIR)) as board:
            if resume and (out / LAST).exists():
                check_resumed_recipe(out / LAST, recipe)  # before any data is read: only train.epochs may change
            elif earlier and not resume:
                log(f"{out} holds an earlier run ({', '.join(earlier)}): starting afresh replaces its checkpoints"
                    " and metrics; --resume continues that run instead")
            if ranks.distributed:
                log(f"{ranks.world} processes, {recipe.train.batch_size // ranks.world} pairs each of every global"
                    f" batch of {recipe.train.batch_size}, on {device} ({torch.distributed.get_backend()})")
            return _train(recipe, out, device=device, resume=resume, save_every=save_every, precision=precision,
                          progress=progress, log=log, ranks=ranks, board=board if tensorboard else None)


def _quiet(*args: Any, **kwargs: Any) -> None:
    """The log of a rank other than 0: rank 0 says it once."""


def _train(recipe: Recipe, out: Path, *, device: str | torch.device, resume: bool, save_every: int, precision: str,
           progress, log, ranks: distributed.Ranks, board: TensorBoardLog | None) -> TrainResult:
    start_time = time.perf_counter()
    reuse_freed_memory()
    t = recipe.train
    device = torch.device(device)
    check_precision(precision, device)

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
    scaler = grad_scaler(device, precision)  # fp16 only; passes through otherwise
    metrics_path = out / "metrics.jsonl"
    first_epoch, best_rsum, best_epoch = 0, -math.inf, -1
    partial = EpochProgress()  # of the epoch a step checkpoint stopped in
    extras_state = None

    if resume and (out / LAST).exists():
        state = resume_training(out / LAST, model, optimizer, device)  # checks the trainer state first
        first_epoch = state.epoch + 1
        best_rsum, best_epoch = state.best_rsum, state.best_epoch
        partial = EpochProgress.from_json(state.partial, out / LAST) if state.partial else partial
        extras_state = state.extras_rng
        if scaler.is_enabled() and state.scaler:
            scaler.load_state_dict(json.loads(state.scaler))
        _restore_rank_rng(state, ranks, t.seed, log)
        if ranks.main:
            _keep_metrics_before(metrics_path, first_epoch, partial.iteration if partial.batches else None)
        where = (f"at batch {partial.batches} of epoch {first_epoch + 1}" if partial.batches
                 else f"after epoch {first_epoch}")
        log(f"resuming {out / LAST} {where} (best dev rsum {best_rsum:.2f})")
    else:
        if ranks.main:
            metrics_path.unlink(missing_ok=True)
            for events in (out / TENSORBOARD_DIR).glob("events.out.tfevents.*"):  # an earlier run's, as its metrics
                events.unlink()
        torch.manual_seed(t.seed + ranks.rank)  # rank 0 draws what one process draws; the others their own
    if ranks.main:
        atomic_write_text(out / "recipe.toml", recipe.to_toml())

    meta = {"seed": t.seed, "protocol": recipe.data.protocol, "data": str(data_dir), "precision": precision}
    batches_per_epoch = train_split.num_captions // t.batch_size
    iteration = first_epoch * batches_per_epoch + partial.batches
    if board is not None:
        board.open(purge_step=iteration + 1 if iteration else None)  # resumed: what follows `iteration` is redone

    def save_last(epoch_done: int, rsum: float, progress_: EpochProgress | None = None, extras=None) -> None:
        """last.safetensors: after an epoch (``progress_`` None) or within one; a collective under torchrun."""
        rngs = distributed.gather_rows(torch.get_rng_state()[None]) if ranks.distributed else None
        if not ranks.main:
            return
        optimizer_tensors, optimizer_blob = optimizer_to_tensors(optimizer)
        trainer = {**optimizer_tensors, "rng.torch": torch.get_rng_state()}
        if rngs is not None:
            trainer["rng.torch.ranks"] = rngs
        if extras is not None:
            trainer["rng.extras"] = extras.get_state()
        step = {"partial": progress_.to_json()} if progress_ is not None else {}
        if scaler.is_enabled():
            step["scaler"] = json.dumps(scaler.state_dict())
        save_checkpoint(out / LAST, model, vocab, trainer=trainer, epoch=str(epoch_done), rsum=str(rsum),
                        best_rsum=str(best_rsum), best_epoch=str(best_epoch), optimizer=optimizer_blob,
                        world_size=str(ranks.world), **step, **meta)

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
        run = partial if epoch == first_epoch else EpochProgress(iteration=iteration)
        loader = train_loader(train_split, vocab, batch_size=t.batch_size, seed=t.seed, epoch=epoch,
                              rank=ranks.rank, world=ranks.world, start=run.batches)
        extras = extra_negatives_generator(t.seed, epoch)
        if run.batches and extras_state is not None:
            extras.set_state(extras_state)  # where the stopped run's draws of this epoch had got to
        stepper = _training_stepper(model, ranks, device)  # after schedule.apply: DDP syncs what trains now
        started = time.perf_counter()
        with task(progress, f"epoch {epoch + 1}/{t.epochs}", batches_per_epoch) as update:
            update(run.batches)
            for batch in loader:
                if t.extra_captions or t.extra_images:
                    batch = add_extra_negatives(batch, loader.dataset, extras, captions=t.extra_captions,
                                                images=t.extra_images)
                batch = batch.to(device)
                regions = Regions(batch.images, batch.image_lengths, batch.boxes, batch.image_sizes)
                with autocast(device, precision):
                    loss, scores, terms = stepper(regions, Tokens(batch.tokens, batch.lengths), batch.image_ids,
                                                  epoch=epoch, caption_image_ids=batch.caption_image_ids)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)  # clipping sees the true gradients
                # The gradient norm is wanted even unclipped (max_norm inf scales by exactly 1): a finite loss
                # with a NaN gradient is a backward through 0 x inf, and it would turn every weight to NaN.
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                           t.grad_clip if t.grad_clip > 0 else math.inf)
                scaler.step(optimizer)  # fp16: skipped when the scaled gradients overflowed
                scaler.update()
                value, norm = loss.item(), float(grad_norm)  # after the step: no extra sync on a GPU
                if scaler.is_enabled():
                    norm = 0.0  # an overflow is the scaler's to handle: it skipped the step and lowered the scale
                if not (math.isfinite(value) and math.isfinite(norm)):
                    what = (f"the loss is {value}" if not math.isfinite(value)
                            else f"the gradient norm is {norm} (loss {value:.4g})")
                    raise _stop(f"training stopped at epoch {epoch + 1}, batch {run.batches + 1} of"
                                f" {batches_per_epoch}: {what} (images {batch.image_ids[:8].tolist()}, captions"
                                f" {batch.caption_ids[:8].tolist()} of split {train_split.name!r})", out, data_dir)
                iteration += 1
                run.add(value, {name: term.item() for name, term in terms.items()} if len(terms) > 1 else {},
                        iteration, captions=t.batch_size, seconds=time.perf_counter() - started)
                update(run.batches, info=f"loss {run.loss_sum / run.batches:.3f}  {run.captions_per_s():,.0f} captions/s")
                if ranks.main and iteration % t.log_every == 0:
                    _log_record(metrics_path, board, {"epoch": epoch, "iteration": iteration, "loss": value, "lr": lr})
                if save_every and iteration % save_every == 0 and run.batches < batches_per_epoch:
                    save_last(epoch - 1, best_rsum, run, extras)
                started = time.perf_counter()  # the next step's clock: logging and saving are not training time

        bad = _nonfinite_parameter(model)
        if bad:
            raise _stop(f"training stopped after epoch {epoch + 1}: parameter {bad} holds NaN or inf", out, data_dir)
        with autocast(device, precision):
            dev = evaluate(model, vocab, dev_split, "f30k-1k", device=device, batch_size=t.eval_batch_size,
                           progress=progress)
        record = {"epoch": epoch, "iteration": iteration, "split": "dev", "train_loss": run.loss_sum / max(run.batches, 1),
                  "lr": lr, "captions_per_s": round(run.captions_per_s(), 1), **dev}
        if run.term_sums:  # the [loss] stage's and each objective's mean, unweighted
            record["train_terms"] = {name: total / max(run.batches, 1) for name, total in run.term_sums.items()}
        if ranks.main:
            _log_record(metrics_path, board, record)
        log(f"epoch {epoch + 1}/{t.epochs}: loss {record['train_loss']:.3f}  dev rsum {dev['rsum']:.2f}"
            f"  (i2t R@1 {dev['i2t_r1']:.1f}, t2i R@1 {dev['t2i_r1']:.1f})  {run.captions_per_s():,.0f} captions/s")
        if dev["rsum"] > best_rsum:
            best_rsum, best_epoch = dev["rsum"], epoch
            if ranks.main:
                save_checkpoint(out / BEST, model, vocab, epoch=str(epoch), rsum=str(dev["rsum"]), **meta)
        save_last(epoch, dev["rsum"])

    if ranks.distributed:
        torch.distributed.barrier()  # rank 0 has written the best checkpoint the others read next
    best = load_checkpoint(out / BEST, device)
    with autocast(device, precision):
        test = evaluate(best.model, vocab, test_split, recipe.data.protocol, device=device,
                        batch_size=t.eval_batch_size, progress=progress)
    summary = {"split": recipe.data.test_split, "protocol": recipe.data.protocol, "best_epoch": best_epoch,
               "best_dev_rsum": best_rsum, **test}
    if ranks.main:
        atomic_write_text(out / "test_metrics.json", strict_json(summary, indent=2) + "\n")
    return TrainResult(out, best_epoch, best_rsum, test, time.perf_counter() - start_time)
