"""``itmkit explain``: one image-caption pair through a checkpoint: score, each word's share, attention picture."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.markup import escape
from rich.table import Table

from itmkit.errors import ItmkitError

CAPTION_INDEX = re.compile(r"-?[0-9]+")  # ASCII digits: "１２" is text
MAX_CAPTION_CHARS = 1000


def register(app: typer.Typer) -> None:
    app.command(name="explain")(explain)


def explain(
    checkpoint: Annotated[Path, typer.Argument(help="an itmkit checkpoint (.safetensors)")],
    image: Annotated[int, typer.Option("--image", help="the image: its row in the split (0-based)")],
    caption: Annotated[Optional[str], typer.Option("--caption", help="a caption's row in the split (0-based), or a"
                                                   " caption's text in quotes (default: the image's first caption)")] = None,
    data: Annotated[Optional[str], typer.Option(help="dataset folder (default: the recipe's \\[data].path)")] = None,
    split: Annotated[Optional[str], typer.Option(help="split (default: the recipe's test split)")] = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="picture to write (.png): heat maps over"
                                                   " the image's boxes when the data has pictures, else the word x"
                                                   " region matrix")] = None,
    attention: Annotated[Optional[int], typer.Option("--attention", help="which of the model's attention maps to"
                                                     " draw (listed in the output; default: the first with words"
                                                     " as queries)")] = None,
    device: Annotated[str, typer.Option(help="'auto' (cuda if available), 'cpu', 'cuda', ...")] = "auto",
) -> None:
    """Explain one image-caption pair: the score, each word's contribution, and the model's attention picture."""
    from itmkit.checkpoint import load_checkpoint
    from itmkit.cli import _device, err, out
    from itmkit.datasets import recorded_data_dir
    from itmkit.explain import explain_row, unknown_words
    from itmkit.data.split import split_image_ids
    from itmkit.outputs import check_output_file
    from itmkit.preflight import check_eval_data

    if output is not None:
        if output.suffix.lower() != ".png":
            raise ItmkitError(f"-o {output}: the picture is written as PNG; name a .png file (e.g. attention.png)")
        check_output_file(output, "-o", inputs=(checkpoint,), example="attention.png")
    dev = _device(device)
    loaded = load_checkpoint(checkpoint, dev)
    recipe = loaded.model.recipe
    folder = recorded_data_dir(data, recipe.data.path, checkpoint, log=err.print)
    if output is not None:
        check_output_file(output, "-o", inputs=(checkpoint, folder), example="attention.png")
    the_split = check_eval_data(folder, split or recipe.data.test_split, None, [(str(checkpoint), loaded.model)])
    if not 0 <= image < the_split.num_images:
        raise ItmkitError(f"--image {image}: split {the_split.name!r} of {folder} has images 0 to"
                          f" {the_split.num_images - 1}")
    text, about = _caption(caption, image, the_split)
    result = explain_row(loaded.model, loaded.vocab, the_split, image, text, device=dev)
    image_id = split_image_ids(folder, the_split, None)[image]
    out.print(escape(f"{checkpoint} ({recipe.info.name}), image {image} ({image_id}) of split {the_split.name!r},"
                     f" {about}: {text!r}"), soft_wrap=True)
    out.print(f"score {result.score:.4f}")
    unknown = unknown_words(loaded.vocab, text)
    if unknown:
        out.print(escape(f"note: {len(unknown)} word(s) of the caption are not in the model's vocabulary and read as"
                         f" its unknown token: {', '.join(unknown[:10])}"), soft_wrap=True)
    if attention is not None and not 0 <= attention < len(result.maps):
        raise ItmkitError(f"--attention {attention}: this model records {len(result.maps)} attention map(s)"
                          + (f" (0 to {len(result.maps) - 1})" if result.maps else ""))
    chosen = result.default_map() if attention is None else attention
    out.print(_word_table(result, chosen))
    for k, m in enumerate(result.maps):
        out.print(escape(f"attention {k}: {m.label}, {'words over regions' if m.query_side == 'text' else 'regions over words'}"
                         + (" (drawn)" if k == chosen and output is not None else "")))
    if not result.maps:
        message = (f"{checkpoint} ({recipe.info.name}) has no cross-attention to draw: none of its stages attends"
                   " from words to regions or back (a pooled-vector model such as VSE++ or GPO, or a stage that does not"
                   " report its attention); the score and each word's contribution are above")
        if output is not None:
            raise ItmkitError(message)
        out.print(escape(message))
        return
    if output is None:
        return
    from itmkit.pictures import MAX_PANELS, attention_figure, find_picture, split_pixel_boxes
    from itmkit.plots import save_figure

    picture = find_picture(folder, the_split.name, image, image_id)
    boxes = None if picture is None else split_pixel_boxes(the_split, image, picture)
    fig = attention_figure(result, chosen, picture=picture, boxes=boxes,
                           title=f"{image_id}: {text}  (score {result.score:.4f})")
    save_figure(fig, output, dpi=fig.dpi)
    words = len(result.words())
    how = ("heat maps over the image's boxes" + (f", the first {MAX_PANELS} of its {words} words" if words > MAX_PANELS
                                                 else "") if boxes is not None else
           f"the word x region matrix ({_why_no_picture(folder, the_split, image_id, picture)})")
    out.print(escape(f"wrote {output}: {how}"))


def _caption(caption: str | None, image: int, split) -> tuple[str, str]:
    """The caption's text and how to name it: a row of the split, or text given on the command line."""
    if caption is None:
        first = int(np.searchsorted(split.caption_images, image))
        return split.captions[first], f"caption {first} (its first)"
    if CAPTION_INDEX.fullmatch(caption.strip()):
        row = int(caption)
        if not 0 <= row < split.num_captions:
            raise ItmkitError(f"--caption {row}: split {split.name!r} has captions 0 to {split.num_captions - 1}"
                              " (or give a caption's text in quotes)")
        owner = split.image_of_caption(row)
        return split.captions[row], f"caption {row} ({'one of its own' if owner == image else f'of image {owner}'})"
    if not caption.strip():
        raise ItmkitError("--caption is empty: give a caption's row in the split, or its text in quotes")
    if len(caption) > MAX_CAPTION_CHARS:
        raise ItmkitError(f"--caption is {len(caption)} characters long; at most {MAX_CAPTION_CHARS}")
    return caption, "a caption given as text"


def _word_table(result, chosen: int | None) -> Table:
    table = Table(title="each word: the score without it, subtracted from the score (+ helps the match)")
    table.add_column("#", justify="right")
    table.add_column("token")
    table.add_column("contribution", justify="right")
    if chosen is not None:
        table.add_column(f"top region (attention {chosen})", justify="right")
        table.add_column("weight", justify="right")
    for w, token in enumerate(result.tokens):
        value = result.contributions[w]
        cells = [str(w), escape(token), "" if np.isnan(value) else f"{value:+.4f}"]
        if chosen is not None:
            row = result.maps[chosen].over_regions(w)
            cells += [str(int(np.argmax(row))), f"{float(np.max(row)):.3f}"]
        table.add_row(*cells)
    return table


def _why_no_picture(folder: Path, split, image_id: str, picture) -> str:
    if picture is None:
        where = f"beside {folder}, in {folder.parent}" if folder.is_file() else f"in {folder}"
        return (f"no picture of {image_id} {where}: put it at images/{split.name}/{image_id}.png (or .jpg),"
                " or write the built-in data with `itmkit data synth DIR --images`")
    return f"split {split.name!r} has no pixel boxes (x1, y1, x2, y2) to place the regions on the picture"
