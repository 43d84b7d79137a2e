"""Tiny random BERT directories for tests: a 64-token WordPiece vocabulary and a 2-layer, 32-d model.

``write_tiny_bert(folder)`` writes config.json, vocab.txt and tokenizer_config.json, plus random
weights (model.safetensors, with the pooler, as a published BERT has one) unless
``weights=False``. ``itmkit_bert/tiny/`` is the weightless copy the conformance kit builds from.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "a", "an", "the", "man", "woman", "dog", "cat", "horse", "ball", "red", "blue", "green", "two", "three",
    "is", "are", "on", "in", "with", "of", "and", "grass", "street", "water", "riding", "play", "run", "sit",
    "jump", "small", "large", "shirt", "wearing", "next", "to", "un", "car", ".", ",", "-", "'", "!",
]
PIECES = ["##s", "##ing", "##ed", "##er", "##bel", "##ie", "##va", "##bly", "##ly", "##ball", "##y", "##es",
          "##ness", "##ful", "##al", "##ion", "##d"]
TOKENS = SPECIALS + WORDS + PIECES
CONFIG = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 37,
          "max_position_embeddings": 64, "type_vocab_size": 2}


def write_tiny_bert(folder: str | Path, *, weights: bool = True, seed: int = 0) -> Path:
    """A tiny BERT-family model directory at ``folder`` (created); returns its path."""
    import torch

    from itmkit_bert.vocab import quiet_transformers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in TOKENS))
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "tokenizer_class": "BertTokenizer",
                                                              "model_max_length": CONFIG["max_position_embeddings"]},
                                                             indent=2) + "\n")
    with quiet_transformers() as transformers:
        config = transformers.BertConfig(vocab_size=len(TOKENS), **CONFIG)
        if weights:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                transformers.BertModel(config, add_pooling_layer=True).save_pretrained(folder)
        else:
            config.save_pretrained(folder)
    return folder
