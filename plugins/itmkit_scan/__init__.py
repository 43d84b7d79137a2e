"""itmkit-scan: SCAN (Lee et al., ECCV 2018) stacked cross attention, its aggregations and its checkpoint importer."""

import itmkit

from itmkit_scan.importer import convert
from itmkit_scan.stages import ImageToText, LogSumExp, Sum, TextToImage


@itmkit.hookimpl
def register_stages():
    return [TextToImage, ImageToText, LogSumExp, Sum]


@itmkit.hookimpl
def register_importers():
    return {"scan": convert}
