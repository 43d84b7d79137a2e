"""Random weights in the official SGRAF layout, our stages loaded with them, and random encoded blocks."""

from __future__ import annotations

import collections

import attrs
import torch
from torch import nn

from itmkit.types import AlignedPort, GlobalPort, Local, LocalPort, PairSimsPort, lengths_to_mask
from itmkit_sgraf.importer import rename_similarity, similarity_layout
from itmkit_sgraf.stages import SAF, SGR, TextSelfAttention, TextToImage, Vector, VisualSelfAttention


def similarity_state(*, embed: int, sim_dim: int, regions: int, module: str, steps: int = 3, seed: int = 0,
                     tracked: bool = True) -> collections.OrderedDict:
    """A random official sim_enc state dict (EncoderSimilarity), with non-trivial BatchNorm statistics."""
    g = torch.Generator().manual_seed(seed)
    out = collections.OrderedDict()
    for key, shape in similarity_layout(embed, sim_dim, regions, module, steps, tracked).items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(17)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith("running_mean"):
            out[key] = torch.randn(shape, generator=g) * 0.1
        elif len(shape) == 1 and key.endswith("weight"):  # a BatchNorm gain
            out[key] = 1 + 0.3 * torch.randn(shape, generator=g)
        elif key.endswith("bias"):
            out[key] = torch.randn(shape, generator=g) * 0.1
        else:
            out[key] = torch.randn(shape, generator=g) * (1.5 / shape[1] ** 0.5)
    return out


@attrs.frozen
class Stages:
    """Our SGRAF stages as built modules: the two pools, the cross attention, the head and the aggregator."""

    image_pool: nn.Module
    text_pool: nn.Module
    cross: nn.Module
    vector: nn.Module
    aggregate: nn.Module

    def modules(self) -> list[nn.Module]:
        return [self.image_pool, self.text_pool, self.cross, self.vector, self.aggregate]

    def train(self, mode: bool = True) -> Stages:
        for m in self.modules():
            m.train(mode)
        return self

    def scores(self, image: Local, text: Local) -> torch.Tensor:
        """(Ni, Nt) as a [[match]] branch chains them, from the encoded fragments."""
        return self.aggregate(x=self.sims(image, text))

    def sims(self, image: Local, text: Local):
        image_global, text_global = self.image_pool(image), self.text_pool(text)
        return self.vector(x=self.cross(image=image, text=text), image=image_global, text=text_global)


def our_stages(sd: dict, *, embed: int, sim_dim: int, regions: int, module: str, steps: int = 3,
               dropout: float = 0.0, dtype: torch.dtype = torch.float64) -> Stages:
    """Build our stages and load the official weights into them (renamed as the importer does)."""
    full = {rename_similarity(k): v for k, v in sd.items()}

    def part(prefix: str) -> dict:
        return {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}

    local, aligned = LocalPort(embed), AlignedPort(embed)
    built = Stages(
        image_pool=VisualSelfAttention(num_regions=regions, dropout=dropout).build(x=local),
        text_pool=TextSelfAttention(dropout=dropout).build(x=local),
        cross=TextToImage().build(image=local, text=local),
        vector=Vector(sim_dim=sim_dim).build(x=aligned, image=GlobalPort(embed), text=GlobalPort(embed)),
        aggregate=(SGR(steps=steps) if module == "SGR" else SAF()).build(x=PairSimsPort(sim_dim)),
    )
    for name, prefix in (("image_pool", "image.pool."), ("text_pool", "text.pool."),
                         ("vector", "branches.0.stages.1."), ("aggregate", "branches.0.stages.2.")):
        m = getattr(built, name).to(dtype)
        m.load_state_dict(part(prefix), strict=True)
    return built.train(False)


def as_dtype(sd: dict, dtype: torch.dtype) -> dict:
    """A copy of a state dict with its floating tensors in ``dtype`` (the reference then updates its own copy)."""
    return {k: v.to(dtype) if v.is_floating_point() else v.clone() for k, v in sd.items()}


def block(seed: int, *, n_images=4, n_captions=5, regions=6, words=8, dim=16, pad_regions=False,
          dtype=torch.float64) -> tuple[Local, Local, torch.Tensor, torch.Tensor]:
    """l2-normalised region and word vectors as the encoders give them, with garbage in the padding."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n_images, regions, dim, generator=g, dtype=dtype)
    images = images / images.norm(dim=-1, keepdim=True)
    captions = torch.randn(n_captions, words, dim, generator=g, dtype=dtype)
    captions = captions / captions.norm(dim=-1, keepdim=True)
    image_lens = torch.full((n_images,), regions)
    if pad_regions:
        image_lens = torch.randint(2, regions + 1, (n_images,), generator=g)
    image_lens[0] = regions
    cap_lens = torch.randint(1, words + 1, (n_captions,), generator=g)
    cap_lens[0] = words
    for feats, lens in ((images, image_lens), (captions, cap_lens)):
        pad = ~lengths_to_mask(lens, feats.shape[1])
        feats[pad] = torch.randn(int(pad.sum()), dim, generator=g, dtype=dtype) * 5
    return (Local(images, lengths_to_mask(image_lens, regions)), Local(captions, lengths_to_mask(cap_lens, words)),
            image_lens, cap_lens)
