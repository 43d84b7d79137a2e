"""itmkit-imram: IMRAM (Chen et al., CVPR 2020), iterative matching with a recurrent attention memory, and its importer."""

import itmkit

from itmkit_imram.importer import convert
from itmkit_imram.stages import ImageToText, Steps, TextToImage


@itmkit.hookimpl
def register_stages():
    return [TextToImage, ImageToText, Steps]


@itmkit.hookimpl
def register_importers():
    return {"imram": convert}
