"""A BERT-family text encoder read from a local Hugging Face directory (Devlin et al., NAACL 2019).

    ids (B, L) WordPiece, [CLS] ... [SEP]  ->  BERT  ->  last hidden states (B, L, H)
                                           ->  Linear(H -> D)  ->  Local (B, L, D)

As the BERT text encoder of vse_infty (GPO's master branch): every token's last-layer state,
projected to the joint space, with no pooler. The directory (``path``) gives config.json, the
tokenizer (vocab.txt) and, unless ``pretrained = false``, the weights; nothing is downloaded.
The stage's ``vocabulary()`` hands that tokenizer to itmkit's data code, so the captions are
tokenised with it instead of the word vocabulary (see ``itmkit_bert.vocab``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import attrs
from torch import nn

from itmkit.errors import ItmkitError
from itmkit.ops import l2norm
from itmkit.stage import PortError, Stage, param
from itmkit.types import Local, LocalPort, Tokens, TokensPort
from itmkit_bert.vocab import WordPieceVocabulary, check_model_directory, model_directory_problem, quiet_transformers

# A tiny random BERT (config + 64-token vocabulary, no weights) that the conformance kit builds.
TINY = Path(__file__).resolve().parent / "tiny"


def load_bert(path: str, *, pretrained: bool = True) -> nn.Module:
    """The BERT of a local directory without its pooler: its weights, or a random init from config.json."""
    folder = check_model_directory(path)
    with quiet_transformers() as transformers:
        try:
            config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
            extra = {"add_pooling_layer": False} if config.model_type == "bert" else {}
            if not pretrained:
                return transformers.AutoModel.from_config(config, **extra)
            return transformers.AutoModel.from_pretrained(str(folder), local_files_only=True, **extra)
        except (OSError, ValueError) as exc:
            raise ItmkitError(f"cannot load the model in {folder}: {exc} (pretrained = false builds it from"
                              " config.json alone)") from None


class BertTextEncoder(nn.Module):
    """x_t = W h_t + b, h_t = BERT(ids)_t the last hidden state of token t: Tokens (B, L) -> Local (B, L, D)."""

    def __init__(self, *, bert: nn.Module, embed_dim: int, freeze: bool = False, lr_scale: float = 1.0,
                 normalize: bool = False):
        super().__init__()
        self.bert = bert
        self.linear = nn.Linear(bert.config.hidden_size, embed_dim)
        self.freeze = freeze
        self.normalize = normalize
        if freeze:
            self.bert.requires_grad_(False)
        self.bert.lr_scale = lr_scale  # read by itmkit.train: BERT trains at lr_scale x the learning rate

    def train(self, mode: bool = True) -> BertTextEncoder:
        super().train(mode)
        if self.freeze:
            self.bert.eval()  # a frozen BERT runs without dropout
        return self

    def forward(self, x: Tokens) -> Local:
        mask = x.mask
        hidden = self.bert(input_ids=x.ids, attention_mask=mask.long()).last_hidden_state  # (B, L, H)
        feats = self.linear(hidden)  # (B, L, D)
        return Local(l2norm(feats) if self.normalize else feats, mask)


class BertDirectory:
    """What every stage that reads a BERT from its ``path`` directory shares: the check that names the
    stage and says how to set the directory, and the directory's WordPiece tokenizer as the captions'
    vocabulary (``Stage.vocabulary``). Mixed into stage specs that have ``name`` and ``path``."""

    def _directory_problem(self) -> str | None:
        problem = model_directory_problem(self.path)
        return f"{self.name}: {problem}; set the directory with --set text.encoder.path=DIR" if problem else None

    def vocabulary(self, words: Any) -> WordPieceVocabulary:
        """The directory's WordPiece tokenizer; the data's word vocabulary is not used."""
        problem = self._directory_problem()
        if problem:
            raise ItmkitError(problem)
        return WordPieceVocabulary.load(self.path)


@attrs.frozen(kw_only=True)
class BertEncoder(BertDirectory, Stage):
    """BERT text encoder (Devlin et al. 2019) from a local directory: token states projected to the joint space."""

    name = "bert.encoder"
    kind = "encoder"
    paper = ("Devlin et al. 2019 (BERT), Sec. 3 (final hidden vectors T_i); used as the text encoder of"
             " Chen et al. 2021 (VSE-infinity / GPO), BERT branch")
    example: ClassVar[dict] = {"path": str(TINY), "pretrained": False}

    embed_dim: int | None = param(None, "joint embedding size (default: [recipe].embed_dim)", ge=1)
    path: str = param(help="local Hugging Face model directory (config.json, vocab.txt, weights); nothing is"
                           " downloaded")
    pretrained: bool = param(True, "load the directory's weights (false: random init from config.json)")
    freeze: bool = param(False, "keep the BERT weights fixed (and its dropout off); only the projection trains")
    lr_scale: float = param(1.0, "learning-rate multiplier of the BERT weights (GPO: 0.1)", gt=0.0)
    normalize: bool = param(False, "l2-normalise each token vector")

    def ports(self, x: TokensPort) -> LocalPort:
        problem = self._directory_problem()
        if problem:
            raise PortError(problem)
        return LocalPort(self.embed_dim or 1024)

    def build(self, x: TokensPort) -> nn.Module:
        return BertTextEncoder(bert=load_bert(self.path, pretrained=self.pretrained), embed_dim=self.embed_dim or 1024,
                               freeze=self.freeze, lr_scale=self.lr_scale, normalize=self.normalize)
