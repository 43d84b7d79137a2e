"""itmkit-bert: a BERT-family text encoder from a local Hugging Face directory, with its WordPiece tokenizer."""

import itmkit

from itmkit_bert.stages import BertEncoder


@itmkit.hookimpl
def register_stages():
    return [BertEncoder]
