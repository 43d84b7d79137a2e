"""itmkit-sgraf: SGRAF (Diao et al., AAAI 2021) similarity reasoning and attention filtration, and its importer."""

import itmkit

from itmkit_sgraf.importer import convert
from itmkit_sgraf.stages import SAF, SGR, TextSelfAttention, TextToImage, Vector, VisualSelfAttention


@itmkit.hookimpl
def register_stages():
    return [VisualSelfAttention, TextSelfAttention, TextToImage, Vector, SGR, SAF]


@itmkit.hookimpl
def register_importers():
    return {"sgraf": convert}
