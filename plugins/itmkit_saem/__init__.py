"""itmkit-saem: SAEM (Wu et al., ACM MM 2019), fragment self-attention embeddings, and its importer."""

import itmkit

from itmkit_saem.importer import convert
from itmkit_saem.stages import SaemAngular, SaemBert, SaemCnn, SaemParamNorm, SaemTransformer


@itmkit.hookimpl
def register_stages():
    return [SaemBert, SaemTransformer, SaemCnn, SaemAngular, SaemParamNorm]


@itmkit.hookimpl
def register_importers():
    return {"saem": convert}
