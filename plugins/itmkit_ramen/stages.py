"""RAMEN (Shrestha, Kafle & Kanan, CVPR 2019), a VQA model, adapted to image-text matching.

A RAMEN matching model in a recipe:

    [image] encoder = core.raw                 v_k, the raw region features (no projection)
    [text]  encoder = ramen.question           embedding 300 -> bi-GRU, 512 per direction
            pool    = ramen.question_vector    q = [forward at the last word ; backward at the first]
    [[match]] similarity = ramen.fusion        BN([v_k ; q]) -> 4 residual Swish layers -> BN ->
                                               BN([x_k ; q]) -> bi-GRU over the regions -> readout

``ramen.fusion`` is one similarity stage, not a pair stage and an aggregator: the late fusion
reads q again after the MLP, and keeping both fusions in one stage lets each BatchNorm + linear
map split into an image (or pair) term and a caption term (fusion.py), where a hand-off between two
stages would carry q repeated for every region of every pair. Any tower's pooled vector can be q
(``core.bigru`` + ``core.mean``, say); after a cross-attention stage (``scan.i2t``) each region is
fused with the caption vector attended for it. No paper or code matches images and captions with
this block: every choice of the adaptation is a parameter, documented in docs/plugins/ramen.md.
"""

from __future__ import annotations

import attrs
from torch import nn

from itmkit.stage import PortError, Stage, param
from itmkit.types import AlignedPort, GlobalPort, LocalPort, ScorePort, TokensPort

from itmkit_ramen.fusion import NONLINEARITIES, RamenFusion
from itmkit_ramen.question import QuestionEncoder, QuestionVector

FLOAT = 4  # bytes of a float32
PAPER = "Shrestha, Kafle & Kanan 2019 (RAMEN, CVPR), Sec. 3"


@attrs.frozen(kw_only=True)
class Question(Stage):
    """RAMEN's question embedding as a caption encoder: embedding -> bi-GRU, each word's [forward ; backward] state."""

    name = "ramen.question"
    kind = "encoder"
    paper = PAPER + ".1 (question embedding); code: components/language_model.py QuestionEmbedding"

    embed_dim: int | None = param(None, "width of q, both directions together (RAMEN: q_emb_dim 1024, i.e. 512 per"
                                        " direction; default: [recipe].embed_dim); even", ge=2)
    word_dim: int = param(300, "word embedding size (RAMEN: 300, GloVe-initialised; here random, uniform +-0.1)",
                          ge=1)
    pad_to: int = param(0, "0: packed GRU over each caption's words (ASSUMPTION of the adaptation); N: the VQA"
                           " code's reading, captions cut to N words, zero-padded to N and the GRU run unpacked"
                           " through the padding (VQA: 14)", ge=0, le=512)
    dropout_before_rnn: float = param(0.0, "dropout on the word embeddings (the code's question_dropout_before_rnn;"
                                           " off by default)", ge=0.0, le=1.0)
    dropout_after_rnn: float = param(0.0, "dropout on the GRU states, hence on q (question_dropout_after_rnn; the"
                                          " VQA2 script sets 0.5)", ge=0.0, le=1.0)

    @property
    def width(self) -> int:
        return self.embed_dim or 1024

    def ports(self, x: TokensPort) -> LocalPort:
        if self.width % 2:
            raise PortError(f"{self.name}: embed_dim = {self.width} must be even (half per GRU direction)")
        return LocalPort(self.width)

    def build(self, x: TokensPort) -> nn.Module:
        return QuestionEncoder(vocab_size=x.dim, word_dim=self.word_dim, hidden=self.width // 2, pad_to=self.pad_to,
                               dropout_before_rnn=self.dropout_before_rnn, dropout_after_rnn=self.dropout_after_rnn)


@attrs.frozen(kw_only=True)
class QuestionVectorPool(Stage):
    """RAMEN's q: the forward half at the last valid word and the backward half at the first ([h-> ; h<-])."""

    name = "ramen.question_vector"
    kind = "aggregator"
    paper = PAPER + ".1; code: QuestionEmbedding.forward (forward state at the end, backward at t = 0)"

    def ports(self, x: LocalPort) -> GlobalPort:
        if x.dim % 2:
            raise PortError(f"{self.name} reads [forward ; backward] halves of bi-GRU states; width {x.dim} is odd"
                            " (use ramen.question, or core.last for a one-way GRU)")
        return GlobalPort(x.dim)

    def build(self, x: LocalPort) -> nn.Module:
        return QuestionVector()


@attrs.frozen(kw_only=True)
class Fusion(Stage):
    """RAMEN's early fusion, residual Swish MLP, late fusion and bi-GRU over the regions, with a matching readout."""

    name = "ramen.fusion"
    kind = "similarity"
    paper = (PAPER + ".2-3.3, Fig. 2 (early fusion F, late fusion, recurrent aggregation A); code:"
             " components/multi_modal_core.py MultiModalCore, models/rnn.py RNN, models/ramen.py classifier")

    mmc_sizes: list[int] = param(attrs.Factory(lambda: [1024, 1024, 1024, 1024]),
                                 "widths of the shared projection's linear layers (--mmc_sizes: 4 x 1024)")
    nonlinearity: str = param("swish", "activation of the projection (--mmc_nonlinearity: Swish; or the code's"
                                       " NormalizedSwish)", choices=tuple(NONLINEARITIES))
    connection: str = param("residual", "layers 2.. add their input before the activation (--mmc_connection"
                                        " residual) or not ('none')", choices=("residual", "none"))
    early_fusion: bool = param(True, "concatenate q to every region before the projection (off:"
                                     " --disable_early_fusion, the projection sees the regions alone)")
    late_fusion: bool = param(True, "concatenate q again before the bi-GRU (off: --disable_late_fusion; the"
                                    " code's forward then fails, here the bi-GRU reads the projection alone)")
    late_batch_norm: bool = param(True, "BatchNorm on the late fusion (off: --disable_batch_norm_for_late_fusion)")
    input_dropout: float = param(0.0, "dropout on [v_k ; q] before the first BatchNorm (--input_dropout 0)",
                                 ge=0.0, le=1.0)
    mmc_dropout: float = param(0.0, "dropout on each projection layer's linear output (--mmc_dropout 0)",
                               ge=0.0, le=1.0)
    aggregator_dim: int = param(1024, "hidden size per direction of the bi-GRU over the regions"
                                      " (--mmc_aggregator_dim 1024)", ge=1)
    aggregator_layers: int = param(1, "stacked bi-GRU layers (--mmc_aggregator_layers 1)", ge=1, le=8)
    readout: str = param("mlp", "matching score from the aggregate (ASSUMPTION): 'mlp' = the VQA classifier's"
                                " shape (Linear, activation, dropout per readout_sizes, then Linear -> 1 logit);"
                                " 'linear_sigmoid' = sigmoid(w . a + b) as SGRAF/MTFN", choices=("mlp", "linear_sigmoid"))
    readout_sizes: list[int] = param(attrs.Factory(lambda: [2048]), "hidden widths of the 'mlp' readout"
                                                                     " (--classifier_sizes 2048)")
    readout_nonlinearity: str = param("swish", "activation of the 'mlp' readout (--classifier_nonlinearity Swish)",
                                      choices=tuple(NONLINEARITIES))
    readout_dropout: float = param(0.5, "dropout after each hidden readout layer (--classifier_dropout 0.5)",
                                   ge=0.0, le=1.0)
    pre_readout_dropout: float = param(0.0, "dropout on the aggregate before the readout"
                                            " (--pre_classification_dropout 0)", ge=0.0, le=1.0)

    def _dims(self, x: AlignedPort | None, image: LocalPort | None, text: GlobalPort | None) -> tuple[int, int]:
        if x is not None:
            return x.dim, x.dim
        if image is None or text is None:
            raise PortError(f"{self.name} fuses every region with a caption vector: it needs the image fragments"
                            " and the text tower's pooled vector (add pool = ramen.question_vector, or core.mean, to"
                            " [text]), or a cross-attention stage before it (each region with its attended caption)")
        return image.dim, text.dim

    def ports(self, x: AlignedPort | None = None, image: LocalPort | None = None,
              text: GlobalPort | None = None) -> ScorePort:
        self._dims(x, image, text)
        sizes = self.mmc_sizes
        if not sizes or min(sizes) < 1:
            raise PortError(f"{self.name}: mmc_sizes must list one or more widths >= 1, got {sizes}")
        if self.connection == "residual" and len(set(sizes)) > 1:
            raise PortError(f"{self.name}: residual connections add each layer's input to its output, so mmc_sizes"
                            f" must be equal, got {sizes}; set connection = 'none' or equal sizes")
        if not self.early_fusion and not self.late_fusion:
            raise PortError(f"{self.name}: with early_fusion and late_fusion both off the score never reads the"
                            " caption; turn one of them on")
        if self.readout == "mlp" and (not self.readout_sizes or min(self.readout_sizes) < 1):
            raise PortError(f"{self.name}: readout_sizes must list one or more widths >= 1, got {self.readout_sizes}")
        return ScorePort()

    def build(self, x: AlignedPort | None = None, image: LocalPort | None = None,
              text: GlobalPort | None = None) -> nn.Module:
        v_dim, q_dim = self._dims(x, image, text)
        return RamenFusion(v_dim=v_dim, q_dim=q_dim, mmc_sizes=tuple(self.mmc_sizes), nonlinearity=self.nonlinearity,
                           connection=self.connection, early_fusion=self.early_fusion, late_fusion=self.late_fusion,
                           late_batch_norm=self.late_batch_norm, input_dropout=self.input_dropout,
                           mmc_dropout=self.mmc_dropout, aggregator_dim=self.aggregator_dim,
                           aggregator_layers=self.aggregator_layers, readout=self.readout,
                           readout_sizes=tuple(self.readout_sizes), readout_nonlinearity=self.readout_nonlinearity,
                           readout_dropout=self.readout_dropout, pre_readout_dropout=self.pre_readout_dropout)

    def pair_bytes(self, *, text_len: int, image_len: int, ports: dict | None = None) -> int:
        """float32 numbers per pair at the peak of a no-grad forward, N fused fragments per pair (the regions;
        an Aligned block's queries, which may be words): a projection layer holds its input, its linear
        output (the residual added in place) and a sigmoid (3 N H); with a per-region caption (Aligned)
        also the attended context and its normalised copy (2 N Dq); the bi-GRU steps keep a few (pair, 3 x
        hidden) rows (12 A), the readout its hidden widths. Measured as peak RSS growth over one block at
        the code's widths (256 and 512 pairs): 1.08 to 1.11 of those terms, hence the 10% on top."""
        ports = ports or {}
        aligned = ports.get("x") is not None
        n = max(image_len, text_len) if aligned else image_len
        q_dim = ports["x"].dim if aligned else (ports["text"].dim if "text" in ports else 1024)
        h, a = max(self.mmc_sizes), self.aggregator_dim
        readout = sum(self.readout_sizes) if self.readout == "mlp" else 0
        floats = 3 * n * h + (2 * n * q_dim if aligned else 0) + 12 * a + readout
        return FLOAT * floats * 11 // 10 + 64
