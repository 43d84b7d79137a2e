"""itmkit-saem: SAEM (Wu et al., ACM MM 2019), fragment self-attention embeddings, and its importer."""

import itmkit


@itmkit.hookimpl
def register_stages():
    return []
