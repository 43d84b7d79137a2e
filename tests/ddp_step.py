"""One training step of a recipe on a fixed batch, in one process or as a rank of torchrun; writes the loss,
the B x B scores and every gradient (after DDP's averaging) to OUT/rank{RANK}.safetensors.

    python tests/ddp_step.py RECIPE OUT                                   # one process, the whole batch
    torchrun --standalone --nproc_per_node 2 tests/ddp_step.py RECIPE OUT  # each rank its half

Used by tests/test_distributed.py: the two must agree to 1e-5.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from itmkit import distributed
from itmkit.build import DataPorts, build_model
from itmkit.recipe import load_recipe
from itmkit.train import _training_stepper
from itmkit.types import Regions, Tokens

BATCH, REGIONS, FEATURES, VOCAB = 8, 6, 24, 40
SMALL = ["recipe.embed_dim=32", "text.encoder.word_dim=16"]


def fixed_batch() -> tuple[Regions, Tokens, torch.Tensor]:
    """Eight pairs, two of them captions of the same image (a negative that is no negative), varied lengths."""
    g = torch.Generator().manual_seed(0)
    image_ids = torch.tensor([0, 1, 2, 3, 4, 2, 5, 6])
    features = torch.rand((7, REGIONS, FEATURES), generator=g)[image_ids]
    lengths = torch.tensor([5, 9, 3, 7, 9, 4, 6, 8])
    tokens = torch.randint(1, VOCAB, (BATCH, 9), generator=g) * (torch.arange(9)[None, :] < lengths[:, None])
    return Regions(features, torch.full((BATCH,), REGIONS)), Tokens(tokens, lengths), image_ids


def step(ranks: distributed.Ranks, recipe_path: str, out: str) -> None:
    """The step and its record; its DDP model dies with this frame, inside the process group (as in train)."""
    recipe = load_recipe(recipe_path, SMALL)
    model = build_model(recipe, DataPorts(FEATURES, VOCAB, REGIONS), seed=0)
    model.train()
    regions, tokens, image_ids = fixed_batch()
    share = BATCH // ranks.world
    mine = slice(ranks.rank * share, (ranks.rank + 1) * share)
    stepper = _training_stepper(model, ranks, torch.device("cpu"))
    loss, scores, _ = stepper(Regions(regions.feats[mine], regions.lengths[mine]),
                              Tokens(tokens.ids[mine], tokens.lengths[mine]), image_ids[mine], epoch=1)
    loss.backward()
    tensors = {"loss": loss.detach()[None], "scores": scores.detach().contiguous()}
    tensors.update({f"grad.{name}": p.grad.contiguous() for name, p in model.named_parameters() if p.grad is not None})
    Path(out).mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(Path(out) / f"rank{ranks.rank}.safetensors"))


def main(recipe_path: str, out: str) -> None:
    with distributed.process_group(torch.device("cpu")) as (ranks, _):
        step(ranks, recipe_path, out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
