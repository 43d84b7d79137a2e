"""itmkit-bfan: BFAN (Liu et al., ACM MM 2019), bidirectional focal attention, and its checkpoint importer."""

import itmkit

from itmkit_bfan.importer import convert
from itmkit_bfan.stages import ImageToText, TextToImage


@itmkit.hookimpl
def register_stages():
    return [TextToImage, ImageToText]


@itmkit.hookimpl
def register_importers():
    return {"bfan": convert}
