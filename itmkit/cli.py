"""The ``itmkit`` command line (typer). Errors print one clear message and exit 1."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from itmkit.errors import ItmkitError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Image-text matching models as typed stages declared in TOML recipes.")
data_app = typer.Typer(no_args_is_help=True, help="Write, convert and check datasets.")
app.add_typer(data_app, name="data")

# Logs and pipes get wide tables rather than rich's 80-column default.
out = Console(width=None if Console().is_terminal else 160)
err = Console(stderr=True, width=None if Console(stderr=True).is_terminal else 160)
F30K_WORDS = 8481  # the SCAN Flickr30K vocabulary, four specials included: `build`'s guess without data
_state = {"debug": False}

SetOption = Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe key, e.g. train.epochs=2 (repeatable)")]
DeviceOption = Annotated[str, typer.Option(help="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ...")]


# Flags take no value; their empty metavar keeps typer's help from showing `<bool>` as if they did.
@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", metavar="", help="show tracebacks")] = False,
    stages: Annotated[Optional[list[Path]], typer.Option("--stages", help="import a local stage file (a plugin module) for this run")] = None,
) -> None:
    _state["debug"] = debug
    if stages:
        from itmkit.plugins import load_registry, load_stage_file, reset_registry

        reset_registry(load_registry([load_stage_file(str(p)) for p in stages]))


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ItmkitError(f"--device {name!r}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ItmkitError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def metrics_table(metrics: dict[str, float], title: str) -> Table:
    table = Table(title=title)
    for column in ("direction", "R@1", "R@5", "R@10", "medr", "meanr"):
        table.add_column(column, justify="right")
    for direction, name in (("i2t", "image→text"), ("t2i", "text→image")):
        table.add_row(name, *(f"{metrics[f'{direction}_{k}']:.1f}" for k in ("r1", "r5", "r10", "medr", "meanr")))
    table.caption = f"rSum {metrics['rsum']:.1f}"
    return table


# ------------------------------------------------------------------------------------ build


@app.command()
def build(
    recipe: Annotated[Path, typer.Argument(help="recipe TOML file")],
    set_: SetOption = None,
    data: Annotated[Optional[str], typer.Option(help="dataset folder (default: the recipe's \\[data].path)")] = None,
) -> None:
    """Validate a recipe, build its model and print the stage tree."""
    from itmkit.build import build_model, count_parameters, stage_tree
    from itmkit.recipe import load_recipe

    r = load_recipe(recipe, set_ or [])
    ports, note = _build_ports(r, data or r.data.path)
    model = build_model(r, ports, seed=r.train.seed)
    table = Table(title=f"{r.info.name}  ({recipe})")
    for column in ("slot", "stage", "consumes", "produces", "params"):
        table.add_column(column, justify="right" if column == "params" else "left")
    for row in stage_tree(model):
        table.add_row(escape(row["path"]), row["stage"], row["consumes"], row["produces"], f"{row['params']:,}")
    out.print(table)
    out.print(escape(f"total parameters: {count_parameters(model):,}   data: {note}"), soft_wrap=True)
    if r.phases:
        from itmkit.phases import resolve_schedule, schedule_rows

        phases = Table(title=f"training phases ({r.train.epochs} epochs)")
        columns = {"phase": "phase", "epochs": "epochs", "lr": "lr", "trains": "trains", "frozen": "frozen",
                   "off": "switches off"}
        for title in columns.values():
            phases.add_column(title)
        for row in schedule_rows(resolve_schedule(model), model, r.train.epochs):
            phases.add_row(*(escape(row[key]) for key in columns))
        out.print(phases)


def _build_ports(recipe, path: str):
    """Data dims for ``build``: from the data when it is there, else the SCAN defaults."""
    from itmkit.build import DataPorts
    from itmkit.data.shapes import SHAPES_FEATURE_DIM, SHAPES_REGIONS
    from itmkit.data.vocab import Vocabulary
    from itmkit.datasets import (BUILTIN, builtin_folder, builtin_words, data_ports, is_dataset_path, open_named_split,
                                 resolve_data_dir, text_vocabulary)

    if path == BUILTIN and not (builtin_folder() / "shapes.json").exists():
        # Printing a stage tree is no reason to render 6,500 images: the built-in dims are constants
        # and its words follow from the captions alone. `itmkit train` generates the data.
        words = Vocabulary.load(recipe.data.vocab) if recipe.data.vocab else builtin_words()
        vocab = recipe.text.encoder.spec.vocabulary(lambda: words)
        ports = DataPorts(SHAPES_FEATURE_DIM, len(vocab), SHAPES_REGIONS, mask_id=getattr(vocab, "mask_id", None))
        return ports, (f"built-in 'shapes', not generated yet ({SHAPES_REGIONS} x {SHAPES_FEATURE_DIM}-d regions,"
                       f" {len(vocab)} words; `itmkit train` generates it)")
    if path == BUILTIN or is_dataset_path(path):
        folder = resolve_data_dir(path, log=err.print)
        train = open_named_split(folder, "train")
        vocab = text_vocabulary(recipe, folder, train)
        ports = data_ports(train, vocab)
        return ports, f"{folder} ({ports.feature_dim}-d regions, {ports.vocab_size} words)"
    if recipe.data.vocab:
        words = Vocabulary.load(recipe.data.vocab)
    else:  # stand-ins for Flickr30K's 8481 words, so that an encoder's vocabulary hook still applies
        words = Vocabulary([*Vocabulary.SPECIALS, *(f"word{i}" for i in range(F30K_WORDS - 4))])
    vocab = recipe.text.encoder.spec.vocabulary(lambda: words)
    ports = DataPorts(2048, len(vocab), 36, mask_id=getattr(vocab, "mask_id", None))
    return ports, f"{path} not found: assuming 36 x 2048-d regions and {len(vocab)} words"


# ------------------------------------------------------------------------------------ train


@app.command()
def train(
    recipe: Annotated[Path, typer.Argument(help="recipe TOML file")],
    data: Annotated[Optional[str], typer.Option(help="dataset folder (overrides \\[data].path)")] = None,
    out_dir: Annotated[Optional[Path], typer.Option("--out", help="run folder (default: runs/<recipe name>)")] = None,
    set_: SetOption = None,
    resume: Annotated[bool, typer.Option("--resume", metavar="", help="continue from OUT/last.safetensors")] = False,
    save_every: Annotated[int, typer.Option("--save-every", min=0, help="also write OUT/last.safetensors every N"
                                            " steps, so a run killed mid-epoch resumes there (0: after each epoch"
                                            " only)")] = 0,
    precision: Annotated[str, typer.Option(help="fp32 | bf16 | fp16: mixed precision for the matrix products"
                                           " (norms, softmax, LogSumExp and the loss stay float32; fp16 scales"
                                           " the loss); docs/training.md")] = "fp32",
    tensorboard: Annotated[bool, typer.Option("--tensorboard", metavar="", help="also write the metrics as"
                                              " TensorBoard event files into OUT/tensorboard (needs pip install"
                                              " 'itmkit\\[tensorboard]')")] = False,
    device: DeviceOption = "auto",
) -> None:
    """Train a recipe, validate each epoch, keep the best checkpoint, print the test R@K table.

    Under torchrun (`torchrun --nproc_per_node N -m itmkit train ...`) the N processes share every batch
    of train.batch_size; rank 0 writes and prints.
    """
    from itmkit.progress import make_progress
    from itmkit.recipe import load_recipe
    from itmkit.outputs import check_output_folder
    from itmkit.runs import default_run_folder
    from itmkit.train import summary_writer_class, train as run_training

    if tensorboard:
        summary_writer_class()  # not installed: say so now, not after the data is checked
    overrides = list(set_ or [])
    if data:
        overrides.append(f"data.path={json.dumps(data)}")
    r = load_recipe(recipe, overrides)
    folder = out_dir or default_run_folder(r.info.name)
    if out_dir:
        check_output_folder(out_dir, "--out", create_parents=True)
    dev = _device(device)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 speaks
    if main_rank:
        err.print(f"training {r.info.name} on {r.data.path} ({dev}), run folder {folder}")
    with make_progress() as progress:
        result = run_training(r, out_dir=folder, device=dev, resume=resume, save_every=save_every,
                              precision=precision, tensorboard=tensorboard, progress=progress, log=err.print)
    if not main_rank:
        return
    out.print(metrics_table(result.test, f"{r.info.name}: {r.data.test_split} split, {r.data.protocol}"
                                        f" (best dev epoch {result.best_epoch + 1})"))
    out.print(f"checkpoint: {folder / 'model_best.safetensors'}   metrics: {folder / 'metrics.jsonl'}"
              f"   time: {result.seconds / 60:.1f} min")


# ------------------------------------------------------------------------------------- eval


@app.command(name="eval")
def eval_(
    checkpoints: Annotated[Optional[list[Path]], typer.Argument(help="one checkpoint, or several for an ensemble")] = None,
    data: Annotated[Optional[str], typer.Option(help="dataset folder (default: the recipe's \\[data].path)")] = None,
    split: Annotated[Optional[str], typer.Option(help="split to score (default: the recipe's test split)")] = None,
    protocol: Annotated[Optional[str], typer.Option(help="f30k-1k | coco-1k-5fold | coco-5k | eccv-caption (default:"
                                                    " the recipe's; with --sims, f30k-1k: the whole matrix)."
                                                    " eccv-caption: ECCV Caption mAP@R, R-Precision, R@1 and CxC R@K"
                                                    " on the COCO 5K test split, from its COCO ids")] = None,
    sims_file: Annotated[Optional[Path], typer.Option("--sims", help="evaluate a saved (images x captions) .npy matrix"
                                                      " from any source instead of checkpoints; captions k*i..k*i+k-1"
                                                      " describe image i")] = None,
    rerank: Annotated[Optional[str], typer.Option(help="re-rank before the metrics: mtfn-rr (MTFN's cross-modal"
                                                  " re-ranking; its t2i step reads the test set's caption grouping)")] = None,
    rerank_k_i2t: Annotated[Optional[int], typer.Option("--rerank-k-i2t", help="mtfn-rr: re-sort each image's top K"
                                                        " captions (default 15, the official value)")] = None,
    rerank_k_t2i: Annotated[Optional[int], typer.Option("--rerank-k-t2i", help="mtfn-rr: re-sort each caption's top K"
                                                        " images (default 20, the official value)")] = None,
    save_sims: Annotated[Optional[Path], typer.Option("--save-sims", help="write the (images x captions) matrix as .npy")] = None,
    ids_file: Annotated[Optional[Path], typer.Option("--ids", help="eccv-caption: the COCO image id of each image row,"
                                                     " one per line (5000 lines, or 25000: one per caption); default"
                                                     " with checkpoints: the split's {split}_ids.txt")] = None,
    caption_ids_file: Annotated[Optional[Path], typer.Option("--caption-ids", help="eccv-caption: the COCO caption id"
                                                             " of each caption column, one per line (default: the"
                                                             " split's {split}_capids.txt if present, else the"
                                                             " eccv-caption package's order)")] = None,
    shortlist: Annotated[Optional[int], typer.Option(help="two-stage retrieval: a first stage shortlists K items per"
                                                     " query, the checkpoint re-scores only those (docs/retrieval.md)")] = None,
    first_stage: Annotated[Optional[Path], typer.Option("--first-stage", help="--shortlist: the checkpoint whose pooled"
                                                        " vectors shortlist (VSE++, GPO; default: the evaluated"
                                                        " checkpoint's own pools)")] = None,
    compare_full: Annotated[bool, typer.Option("--compare-full", metavar="", help="--shortlist: also score every pair"
                                               " with the checkpoint, and show both results and times")] = False,
    index_type: Annotated[Optional[str], typer.Option("--index-type", help="--shortlist: the first stage's faiss index"
                                                      " (factory string; default Flat = exact; HNSW32, IVF1024,Flat,"
                                                      " ...)")] = None,
    search_params: Annotated[Optional[str], typer.Option("--search-params", help="--shortlist: faiss search parameters,"
                                                         " e.g. nprobe=16 or efSearch=128")] = None,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="print one JSON object of metrics (with --rerank:"
                                          " the re-ranked ones, the plain ones under before_rerank)")] = False,
    device: Annotated[Optional[str], typer.Option(help="'auto' (cuda if available; the default), 'cpu', 'cuda',"
                                                  " 'cuda:1', ...")] = None,
    precision: Annotated[str, typer.Option(help="fp32 | bf16 | fp16: score checkpoints with mixed-precision"
                                           " matrix products (docs/training.md)")] = "fp32",
) -> None:
    """Evaluate checkpoint(s), several as an ensemble (similarities averaged), or a saved matrix (--sims)."""
    from itmkit.evaluation import ID_PROTOCOLS, PROTOCOLS
    from itmkit.errors import did_you_mean
    from itmkit.rerank import RERANKERS

    if protocol is not None and protocol not in PROTOCOLS:
        raise ItmkitError(f"--protocol {protocol!r} is not known" + did_you_mean(protocol, PROTOCOLS))
    if rerank is not None and rerank not in RERANKERS:
        raise ItmkitError(f"--rerank {rerank!r} is not known" + did_you_mean(rerank, RERANKERS))
    for flag, k in (("--rerank-k-i2t", rerank_k_i2t), ("--rerank-k-t2i", rerank_k_t2i)):
        if k is not None and k < 1:
            raise ItmkitError(f"{flag} must be at least 1, got {k}")
        if k is not None and rerank is None:
            raise ItmkitError(f"{flag} sets the depth of a re-ranking: give --rerank mtfn-rr with it")
    k_i2t, k_t2i = rerank_k_i2t or 15, rerank_k_t2i or 20
    eccv = protocol in ID_PROTOCOLS
    two_stage = {"--first-stage": first_stage, "--compare-full": compare_full, "--index-type": index_type,
                 "--search-params": search_params}
    if shortlist is None:
        given = [flag for flag, value in two_stage.items() if value]
        if given:
            raise ItmkitError(f"{', '.join(given)} set(s) two-stage retrieval: give --shortlist K with it")
    else:
        clashes = [flag for flag, value in (("--sims", sims_file), ("--rerank", rerank), ("--save-sims", save_sims),
                                            ("--protocol eccv-caption", eccv), ("--precision", precision != "fp32"))
                   if value]
        if clashes:
            raise ItmkitError(f"--shortlist evaluates a checkpoint by two-stage retrieval; {', '.join(clashes)} cannot"
                              " go with it")
        if not checkpoints or len(checkpoints) != 1:
            raise ItmkitError("--shortlist re-scores with one checkpoint: give exactly one (the first stage is"
                              " --first-stage)")
        if shortlist < 1:
            raise ItmkitError(f"--shortlist must be at least 1, got {shortlist}")
        _eval_two_stage(checkpoints[0], first_stage, shortlist, data, split, protocol, index_type, search_params,
                        compare_full, as_json, device or "auto")
        return
    for flag, value in (("--ids", ids_file), ("--caption-ids", caption_ids_file)):
        if value is not None and not eccv:
            raise ItmkitError(f"{flag} gives the COCO ids of the eccv-caption protocol: give --protocol eccv-caption"
                              " with it")
    if eccv and rerank:
        raise ItmkitError("--rerank cannot go with --protocol eccv-caption: re-ranking yields ranks of the true"
                          " matches, the ECCV Caption metrics read ranked lists")
    if eccv and sims_file is not None and ids_file is None:
        raise ItmkitError("--protocol eccv-caption with --sims needs --ids FILE: a saved matrix carries no ids; give"
                          " the COCO image id of each row, one per line (SCAN's COCO testall_ids.txt)")
    coco_ids = None
    if sims_file is not None:
        given = [flag for flag, value in (("checkpoints", checkpoints), ("--data", data), ("--split", split),
                                          ("--save-sims", save_sims), ("--device", device)) if value]
        if precision != "fp32":
            given.append("--precision")
        if given:
            raise ItmkitError(f"--sims evaluates a saved matrix on its own; {', '.join(given)} cannot go with it")
        from itmkit.evaluate import read_similarity_matrix

        sims = read_similarity_matrix(sims_file)
        caption_images = _captions_per_image(sims.shape, sims_file)  # a saved matrix: the official layout
        if eccv:
            from itmkit.eccv import layout_problem, read_caption_ids, read_image_ids

            problem = layout_problem(sims.shape, caption_images)
            if problem:
                raise ItmkitError(f"similarity matrix {sims_file}: {problem}")
            coco_ids = (read_image_ids(ids_file), caption_ids_file and read_caption_ids(caption_ids_file), str(ids_file))
        protocol, title = protocol or "f30k-1k", f"{sims_file}: {sims.shape[0]} images x {sims.shape[1]} captions"
    elif not checkpoints:
        raise ItmkitError("nothing to evaluate: give checkpoint(s), or a saved matrix with --sims SIMS.npy")
    else:
        for path in checkpoints:
            if path.suffix == ".npy":
                raise ItmkitError(f"{path} is a .npy file, not a checkpoint; to evaluate a saved similarity matrix"
                                  f" use --sims {path}")
        sims, caption_images, protocol, title, coco_ids = _score_checkpoints(
            checkpoints, data, split, protocol, save_sims, device or "auto", (ids_file, caption_ids_file), precision)
    if eccv:
        from itmkit.eccv import eccv_caption_metrics

        image_ids, caption_ids, where = coco_ids
        metrics = eccv_caption_metrics(sims, image_ids, caption_ids, caption_images, where=where)
    else:
        metrics = _metrics(sims, protocol, caption_images, rerank, k_i2t, k_t2i)
    if as_json:
        print(json.dumps(metrics))
    elif eccv:
        out.print(eccv_table(metrics, f"{title}, {protocol}"))
    elif rerank:
        out.print(metrics_table(metrics["before_rerank"], f"{title}, {protocol}"))
        out.print(metrics_table(metrics, f"{title}, {protocol}, re-ranked by {rerank}"
                                         f" (k {min(k_i2t, sims.shape[1])} i2t, {min(k_t2i, sims.shape[0])} t2i)"))
    else:
        out.print(metrics_table(metrics, f"{title}, {protocol}"))


def _score_checkpoints(checkpoints: list[Path], data: str | None, split: str | None, protocol: str | None,
                       save_sims: Path | None, device: str, id_files: tuple[Path | None, Path | None] = (None, None),
                       precision: str = "fp32") -> tuple[np.ndarray, np.ndarray, str, str, tuple | None]:
    """Score the split with the checkpoint(s): the matrix, its caption images, the protocol, a title, and for
    the eccv-caption protocol the split's COCO ids (image ids, caption ids or None, where they came from)."""
    from itmkit.checkpoint import atomic_write_bytes, load_checkpoint
    from itmkit.datasets import recorded_data_dir
    from itmkit.evaluation import ID_PROTOCOLS
    from itmkit.evaluate import ensemble_similarity
    from itmkit.outputs import check_output_file
    from itmkit.preflight import check_eval_data
    from itmkit.progress import make_progress

    from itmkit.precision import autocast, check_precision

    if save_sims:
        check_output_file(save_sims, "--save-sims", inputs=tuple(checkpoints), example="sims.npy")
    dev = _device(device)
    check_precision(precision, dev)
    loaded = [load_checkpoint(path, dev) for path in checkpoints]
    first = loaded[0].model.recipe
    protocol = protocol or first.data.protocol
    folder = recorded_data_dir(data, first.data.path, checkpoints[0], log=err.print)
    split_name = split or first.data.test_split
    if save_sims:  # again with the dataset, now known: never onto a file of the data being scored
        check_output_file(save_sims, "--save-sims", inputs=(*checkpoints, folder), example="sims.npy")
    # The split against the protocol and every checkpoint's input width, before anything is scored.
    the_split = check_eval_data(folder, split_name, protocol, [(str(p), x.model) for p, x in zip(checkpoints, loaded)])
    coco_ids = None
    if protocol in ID_PROTOCOLS:  # the ids and the layout, checked before the long part
        from itmkit.eccv import data_ids, layout_problem, split_ids

        problem = layout_problem((the_split.num_images, the_split.num_captions), the_split.caption_images)
        if problem:
            raise ItmkitError(f"{problem} (split {split_name!r} of {folder})")
        coco_ids = data_ids(folder, split_name, *id_files)
        split_ids(coco_ids[0], coco_ids[1], coco_ids[2])
    with make_progress() as progress, autocast(dev, precision):
        sims, stats = ensemble_similarity([(x.model, x.vocab) for x in loaded], the_split, device=dev,
                                          batch_size=first.train.eval_batch_size, progress=progress)
    if save_sims:
        import io

        buffer = io.BytesIO()
        np.save(buffer, sims)
        atomic_write_bytes(save_sims, buffer.getvalue())
    pairs = sum(s.pairs for s in stats) / max(sum(s.seconds for s in stats), 1e-9)
    err.print(f"scored {the_split.num_images} images x {the_split.num_captions} captions"
              f" x {len(loaded)} model(s): {pairs:,.0f} pairs/s")
    names = " + ".join(str(p) for p in checkpoints)
    return sims, the_split.caption_images, protocol, f"{names}: {split_name} split", coco_ids


def _eval_two_stage(checkpoint: Path, first_stage: Path | None, k: int, data: str | None, split: str | None,
                    protocol: str | None, index_type: str | None, search_params: str | None, compare_full: bool,
                    as_json: bool, device: str) -> None:
    """``eval --shortlist``: two-stage metrics, the shortlist's recall, each stage's time, and full scoring's."""
    import time

    from itmkit.checkpoint import load_checkpoint
    from itmkit.datasets import recorded_data_dir
    from itmkit.evaluate import similarity_matrix
    from itmkit.evaluation import protocol_metrics
    from itmkit.preflight import check_eval_data
    from itmkit.progress import make_progress
    from itmkit.twostage import DEFAULT_INDEX, evaluate_two_stage, first_stage_problem

    dev = _device(device)
    second = load_checkpoint(checkpoint, dev)
    first = load_checkpoint(first_stage, dev) if first_stage else second
    problem = first_stage_problem(first.model, str(first_stage or checkpoint))
    if problem:
        raise ItmkitError(problem)
    recipe = second.model.recipe
    protocol = protocol or recipe.data.protocol
    folder = recorded_data_dir(data, recipe.data.path, checkpoint, log=err.print)
    split_name = split or recipe.data.test_split
    models = [(str(checkpoint), second.model)] + ([(str(first_stage), first.model)] if first_stage else [])
    the_split = check_eval_data(folder, split_name, protocol, models)
    index_type = index_type or DEFAULT_INDEX
    batch = recipe.train.eval_batch_size
    with make_progress() as progress:
        result = evaluate_two_stage((second.model, second.vocab), (first.model, first.vocab), the_split, protocol, k,
                                    index_spec=index_type, search_params=search_params, device=dev,
                                    batch_size=batch, progress=progress)
        full = None
        if compare_full:
            start = time.perf_counter()
            sims, _ = similarity_matrix(second.model, second.vocab, the_split, device=dev, batch_size=batch,
                                        progress=progress)
            full = {**protocol_metrics(sims, protocol, the_split.caption_images),
                    "seconds": time.perf_counter() - start}
            del sims
    metrics = {**result.metrics, "seconds": result.seconds, **({"full": full} if full else {})}
    if as_json:
        print(json.dumps(metrics))
        return
    first_name = first_stage or f"{checkpoint}'s pools"
    title = f"{checkpoint}: {split_name} split, {protocol}"
    out.print(metrics_table(result.metrics, f"{title}, two-stage: top {k} of {first_name} ({index_type}) re-scored"))
    out.print(f"first stage recall@{k} (a true match in the shortlist): image→text"
              f" {result.metrics['i2t_shortlist_recall']:.2f}%, text→image {result.metrics['t2i_shortlist_recall']:.2f}%")
    seconds = result.seconds
    out.print(f"time: {seconds['total']:.1f} s (encode {seconds['encode']:.1f} s, shortlist {seconds['shortlist']:.1f} s,"
              f" re-score {seconds['rescore']:.1f} s, ranks {seconds['rank']:.1f} s)")
    if full:
        out.print(metrics_table(full, f"{title}, full scoring"))
        gaps = ", ".join(f"{d} R@1 {result.metrics[f'{d}_r1'] - full[f'{d}_r1']:+.2f}" for d in ("i2t", "t2i"))
        out.print(f"full scoring {full['seconds']:.1f} s: two-stage is {full['seconds'] / seconds['total']:.1f}x"
                  f" faster; two-stage minus full: {gaps}")


def eccv_table(metrics: dict[str, float], title: str) -> Table:
    """The eccv-caption protocol's metrics (percent), one row per direction."""
    table = Table(title=title)
    columns = {"ECCV mAP@R": "eccv_map_at_r", "ECCV R-P": "eccv_rprecision", "ECCV R@1": "eccv_r1",
               "CxC R@1": "cxc_r1", "CxC R@5": "cxc_r5", "CxC R@10": "cxc_r10"}
    table.add_column("direction", justify="right")
    for column in columns:
        table.add_column(column, justify="right")
    for direction, name in (("i2t", "image→text"), ("t2i", "text→image")):
        table.add_row(name, *(f"{metrics[f'{direction}_{key}']:.1f}" for key in columns.values()))
    return table


def _metrics(sims: np.ndarray, protocol: str, layout: int | np.ndarray, rerank: str | None,
             k_i2t: int, k_t2i: int) -> dict:
    """The protocol's metrics; re-ranked ones with the plain ones under ``before_rerank``."""
    from itmkit.evaluation import protocol_metrics
    from itmkit.progress import make_progress, task
    from itmkit.rerank import GROUPING_NOTICE, reranked_ranks

    before = protocol_metrics(sims, protocol, layout)
    if not rerank:
        return before
    err.print(f"note: {GROUPING_NOTICE}")
    tied = []
    with make_progress() as progress, task(progress, f"re-rank ({rerank})", None) as update:
        ranks = reranked_ranks(rerank, k_i2t=k_i2t, k_t2i=k_t2i, progress=lambda d, t: update(d, t),
                               seen=lambda r: tied.append(r.tied_lists))
        after = protocol_metrics(sims, protocol, layout, ranks=ranks)
    if sum(tied):
        err.print(f"note: {sum(tied)} ranked lists hold tied scores near their top; re-ranking orders ties as the"
                  " official rerank.py does (argsort of -sims), the plain metrics as VSE++ does (the reverse), so"
                  " part of the difference between the two tables is tie order")
    return {**after, "before_rerank": before}


def _captions_per_image(shape: tuple[int, ...], path: Path) -> int:
    """k of a saved matrix, which carries no caption images: the official layout, k consecutive captions per image."""
    n_images, n_captions = shape
    if n_captions % n_images:
        flipped = " (captions x images? save its transpose)" if n_images > n_captions else ""
        raise ItmkitError(f"similarity matrix {path}: shape {shape} has no whole number of captions per image;"
                          f" expected (images, k x images), the captions of image i at columns k*i .. k*i+k-1{flipped}")
    return n_captions // n_images


# -------------------------------------------------------------------------- index / search

from itmkit.retrieval_cli import register as _register_retrieval  # noqa: E402  (its own module: issue 14)

_register_retrieval(app)

from itmkit.plot_cli import register as _register_plot  # noqa: E402  (its own module: issue 16)

_register_plot(app)

from itmkit.explain_cli import register as _register_explain  # noqa: E402  (its own module: issue 16)

_register_explain(app)

from itmkit.serve import register as _register_serve  # noqa: E402  (its own module: issue 16)

_register_serve(app)


# ----------------------------------------------------------------------------------- import


@app.command(name="import")
def import_(
    name: Annotated[str, typer.Argument(help="which paper's format: scan, bfan, pfan, ... (see `itmkit plugins`)")],
    checkpoint: Annotated[Path, typer.Argument(help="the official model_best.pth.tar")],
    vocab: Annotated[Path, typer.Option("--vocab", help="the official vocabulary it was trained with: JSON, or VSE++'s"
                                        " pickled .pkl (read safely); a BERT text encoder: its local model directory")],
    output: Annotated[Path, typer.Option("-o", "--output", help="itmkit checkpoint to write (.safetensors)")],
) -> None:
    """Convert an official checkpoint into an itmkit checkpoint that `itmkit eval` uses directly."""
    from itmkit.importing import get_importers, import_checkpoint
    from itmkit.outputs import check_output_file

    check_output_file(output, "-o", inputs=(checkpoint, vocab), example="model.safetensors")
    written = import_checkpoint(name, checkpoint, vocab, output, get_importers(),
                                note=lambda line: err.print(f"note: {escape(line)}"))
    out.print(f"wrote {written}")


# ------------------------------------------------------------------------- plugins / stages


@app.command()
def plugins() -> None:
    """List installed plugins: name, version, where from, stages contributed, or the import error."""
    from itmkit.plugins import get_registry

    table = Table(title="itmkit plugins")
    for column in ("plugin", "version", "from", "stages"):
        table.add_column(column)
    for info in get_registry().plugins:
        stages = escape(", ".join(info.stages)) if not info.error else f"[red]failed: {escape(info.error)}[/red]"
        table.add_row(info.name, info.version, escape(info.source), stages)
    out.print(table)


@app.command()
def stages(
    kind: Annotated[Optional[str], typer.Option(help="only stages of this kind")] = None,
    describe: Annotated[Optional[str], typer.Option(help="show one stage in full")] = None,
    markdown: Annotated[bool, typer.Option("--markdown", metavar="", help="print the stage reference as Markdown (docs/recipes.md)")] = False,
) -> None:
    """List every stage with its ports, parameters and paper."""
    from itmkit.docs import stage_reference_markdown
    from itmkit.errors import did_you_mean
    from itmkit.plugins import get_registry
    from itmkit.stage import KINDS, stage_inputs, stage_outputs, stage_params

    registry = get_registry()
    if markdown:
        print(stage_reference_markdown(registry), end="")
        return
    if kind is not None and kind not in KINDS:
        raise ItmkitError(f"--kind {kind!r} is not a stage kind" + did_you_mean(kind, KINDS))
    classes = registry.by_kind(kind)
    if describe is not None:
        if describe not in registry.stages:
            raise ItmkitError(f"unknown stage {describe!r}" + did_you_mean(describe, registry.stages))
        described = registry.stages[describe]
        if kind is not None and described.kind != kind:
            raise ItmkitError(f"--describe {describe} is a stage of kind {described.kind!r}, not {kind!r} (--kind);"
                              f" leave out --kind, or use --kind {described.kind}")
        classes = [described]
    for cls in classes:
        inputs = ", ".join(s.describe() for s in stage_inputs(cls))
        outputs = " | ".join(p.__name__ for p in stage_outputs(cls))
        table = Table(title=escape(f"{cls.name}  [{cls.kind}]  ({registry.owners[cls.name]})"), title_justify="left",
                      caption=escape(f"{(cls.__doc__ or '').strip()}\npaper: {cls.paper}\nconsumes: {inputs}\nproduces: {outputs}"),
                      caption_justify="left")
        for column in ("parameter", "type", "default", "help"):
            table.add_column(column)
        for p in stage_params(cls):
            default = "required" if p.required else repr(p.default)
            constraint = p.constraint()
            table.add_row(p.name, escape(p.type_name()), escape(default), escape(p.help + (f" ({constraint})" if constraint else "")))
        out.print(table)


# ------------------------------------------------------------------------------------- data


@data_app.command("synth")
def data_synth(
    out_dir: Annotated[Path, typer.Argument(help="folder to write the dataset into")],
    seed: Annotated[int, typer.Option(help="generator seed")] = 0,
    sizes: Annotated[Optional[str], typer.Option(help="images per split, e.g. train=5000,dev=500,test=1000")] = None,
    images: Annotated[bool, typer.Option("--images", metavar="", help="also write the rendered PNGs")] = False,
) -> None:
    """Write the built-in 'shapes' dataset in the SCAN precomp layout."""
    from itmkit.data.shapes import DEFAULT_SIZES, write_shapes
    from itmkit.progress import make_progress, task

    chosen = dict(DEFAULT_SIZES) if sizes is None else _synth_sizes(sizes)
    with make_progress() as progress, task(progress, "render and extract", None) as update:
        write_shapes(out_dir, seed=seed, sizes=chosen, images=images,
                     progress=lambda name, done, total: update(done, total, info=name))
    out.print(f"wrote {', '.join(f'{k} ({v} images)' for k, v in chosen.items())} to {out_dir}")


# Images per generated split: the default train split is 5,000; a million is about 40 GB of features.
MAX_SYNTH_IMAGES = 1_000_000


def _synth_sizes(text: str) -> dict[str, int]:
    """``--sizes train=5000,test=1000`` as {split: images}: plain split names, each once, 1 to MAX_SYNTH_IMAGES."""
    from itmkit.runs import name_problem

    usage = "--sizes expects NAME=COUNT pairs like train=5000,test=1000"
    if not text.strip():
        raise ItmkitError(f"{usage}, got an empty value (leave out --sizes for the default sizes)")
    chosen: dict[str, int] = {}
    for item in text.split(","):
        name, equals, count = (part.strip() for part in item.partition("="))
        problem = name_problem(name, "--sizes split name")
        if not equals or problem or not (count.isascii() and count.isdigit()):
            raise ItmkitError(f"{usage}, got {item!r}" + (f": {problem}" if equals and problem else ""))
        if name in chosen:
            raise ItmkitError(f"--sizes names split {name!r} twice")
        if not 1 <= int(count) <= MAX_SYNTH_IMAGES:
            raise ItmkitError(f"--sizes {name}={count}: the image count must be a whole number from 1 to"
                              f" {MAX_SYNTH_IMAGES:,}")
        chosen[name] = int(count)
    return chosen


@data_app.command("check")
def data_check(
    data_dir: Annotated[Path, typer.Argument(help="dataset folder")],
    recipe: Annotated[Optional[Path], typer.Option(help="check the splits, batch size and protocol this recipe uses,"
                                                    " as `itmkit train` does before epoch 1")] = None,
    set_: SetOption = None,
) -> None:
    """Validate a dataset: shapes, dtypes, captions per image, splits present, NaNs, what a run needs."""
    from itmkit.data.check import check_dataset, summarize_dataset
    from itmkit.preflight import DataUse

    use = None
    if recipe is not None:
        from itmkit.recipe import load_recipe

        use = DataUse.of_recipe(load_recipe(recipe, set_ or []))
    from itmkit.datasets import resolve_data_dir

    data_dir = resolve_data_dir(str(data_dir))  # a folder, or an HDF5 file itself
    table = Table(title=str(data_dir))
    for column in ("split", "layout", "images", "captions", "regions", "feature dim", "boxes"):
        table.add_column(column)
    for row in summarize_dataset(data_dir):
        table.add_row(*(str(row.get(k, "")) for k in ("name", "layout", "images", "captions", "regions", "feature_dim", "boxes")))
    out.print(table)
    problems = check_dataset(data_dir, use)
    if problems:
        for p in problems:
            err.print("[red]problem:[/red]", escape(p), highlight=False)
        raise ItmkitError(f"{data_dir}: {len(problems)} problem{'s' if len(problems) != 1 else ''} found")
    out.print("[green]no problems found[/green]")


@data_app.command("convert")
def data_convert(
    src: Annotated[Path, typer.Argument(help="a precomp folder, a bottom-up-attention generate_tsv TSV, or a folder"
                                        " of per-image .npz/.npy files")],
    dst: Annotated[Path, typer.Argument(help="HDF5 file (e.g. DIR/data.h5) or precomp folder to write")],
    split: Annotated[Optional[str], typer.Option(help="the split a TSV or .npz/.npy source becomes"
                                                 " (e.g. train)")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="precomp | hdf5 (default: hdf5 from a precomp folder,"
                                               " else precomp)")] = None,
    regions: Annotated[Optional[int], typer.Option(help="regions per image: zero-pad to N, keep the first N boxes"
                                                   " (default: the most any image has)")] = None,
    ids: Annotated[Optional[Path], typer.Option(help="image ids, one per line: which images, in which order"
                                                " (default: all, in the source's order)")] = None,
    captions: Annotated[Optional[Path], typer.Option(help="IMAGE_ID<TAB>caption lines to join to the images"
                                                     " (needed for --format hdf5)")] = None,
    splits: Annotated[Optional[str], typer.Option(help="precomp source: comma list of splits (default: all)")] = None,
) -> None:
    """Convert features into the precomp or HDF5 layout, streaming: precomp -> HDF5, or bottom-up TSV / .npz files."""
    from itmkit.data import bottomup, precomp
    from itmkit.data.hdf5 import convert_precomp_to_hdf5
    from itmkit.data.split import read_text, text_lines
    from itmkit.outputs import check_output_file, check_output_folder
    from itmkit.progress import make_progress, task

    precomp_source = src.is_dir() and bool(precomp.split_names(src))
    # DST is an HDF5 file, else a precomp folder: a new dataset's folders may be made, as a run's are.
    if precomp_source or fmt == "hdf5":
        check_output_file(dst, "DST", inputs=(src,), example="data.h5", create_parents=True)
    else:
        check_output_folder(dst, "DST", inputs=tuple(p for p in (src, ids, captions) if p), create_parents=True,
                            writes=tuple(precomp.file_names(split).values()) if split else ())
    if precomp_source:
        if fmt not in (None, "hdf5"):
            raise ItmkitError(f"{src} is already in the precomp layout; --format hdf5 converts it")
        done = convert_precomp_to_hdf5(src, dst, splits.split(",") if splits else None)
        out.print(f"wrote {', '.join(done)} to {dst}")
        return
    if not split:
        raise ItmkitError(f"--split NAME is needed: which split the images of {src} become (e.g. train, test)")
    chosen = text_lines(read_text(ids, "image id list")) if ids else None
    with make_progress() as progress, task(progress, f"convert {split}", None) as update:
        done = bottomup.convert(src, dst, split=split, fmt=fmt or "precomp", regions=regions, ids=chosen,
                                captions=captions, progress=update)
    cut = f", {done.truncated} cut to their first {done.regions} boxes" if done.truncated else ""
    out.print(escape(f"wrote {split}: {done.images} images x {done.regions} regions x {done.dim}-d{cut},"
                     f" {done.captions} captions -> {dst}"))
    if not done.captions:
        out.print(escape(f"captions: write {split}_caps.txt in the order of {split}_ids.txt, or pass --captions"))


@data_app.command("vocab")
def data_vocab(
    data_dir: Annotated[Path, typer.Argument(help="dataset folder")],
    output: Annotated[Path, typer.Option("-o", "--output", help="vocabulary JSON to write")],
    splits: Annotated[str, typer.Option(help="comma list of splits whose captions count")] = "train,dev",
    threshold: Annotated[int, typer.Option(help="keep words seen at least this often (official: 4)")] = 4,
) -> None:
    """Build a vocabulary in the official JSON format from a dataset's captions."""
    from itmkit.data.split import open_split
    from itmkit.data.vocab import Vocabulary
    from itmkit.outputs import check_output_file

    check_output_file(output, "-o", inputs=(data_dir,), example="vocab.json")
    captions = [c for name in splits.split(",") for c in open_split(data_dir, name.strip()).captions]
    vocab = Vocabulary.build(captions, threshold=threshold)
    vocab.save(output)
    out.print(f"wrote {len(vocab)} words to {output}")


# Exit codes: 0 done; 1 a problem with the input, one `error:` line saying what and where; 2 a usage
# error (typer's own message); 70 (sysexits' EX_SOFTWARE) an unexpected exception, that is a bug in
# itmkit, also one line, the traceback only under --debug or ITMKIT_DEBUG=1; 130 interrupted.
EXIT_INPUT, EXIT_BUG, EXIT_INTERRUPTED = 1, 70, 130


def run() -> None:
    """Console entry point: run the app; every failure ends in one `error:` line and its exit code."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:
        if _state["debug"] or os.environ.get("ITMKIT_DEBUG"):
            raise
        message, code = _one_line(exc)
        err.print("[bold red]error:[/bold red]", escape(message), highlight=False, soft_wrap=True)
        sys.exit(code)


def _one_line(exc: Exception) -> tuple[str, int]:
    """What ``run`` prints for an exception, and the exit code."""
    if isinstance(exc, ItmkitError):
        return str(exc), EXIT_INPUT
    text = " ".join(str(exc).split())
    text = text if len(text) <= 400 else text[:400] + " …"
    # Running out of memory is the machine's limit, not a bug: a recipe's sizes or batch ask for more.
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "can't allocate memory" in text:
        return (f"out of memory: {text or type(exc).__name__} (the recipe's sizes, batch size or the data ask for"
                " more memory than this machine has)"), EXIT_INPUT
    return (f"internal error: {type(exc).__name__}: {text} — this is a bug in itmkit; rerun with --debug"
            " (or ITMKIT_DEBUG=1) for the traceback and report it"), EXIT_BUG
