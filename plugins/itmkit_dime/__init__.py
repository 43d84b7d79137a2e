"""itmkit-dime: DIME (Qu et al., SIGIR 2021), dynamic modality interaction modeling, and its importer."""

import itmkit

from itmkit_dime.importer import convert
from itmkit_dime.stages import DimeBert, DimeImagePool, DimeInteraction, DimeRefineStage


@itmkit.hookimpl
def register_stages():
    return [DimeBert, DimeImagePool, DimeInteraction, DimeRefineStage]


@itmkit.hookimpl
def register_importers():
    return {"dime": convert}
