"""SAEM (Wu, Wang, Song, Huang, ACM MM 2019): Learning Fragment Self-Attention Embeddings.

A SAEM model in a recipe (recipes/saem_*.toml):

    image  regions f_n -> core.precomp   v_n = W f_n + b                       (Local, no norm)
                       -> saem.transformer  one BERT layer of self-attention over the regions
                       -> core.mean (normalize)  v = l2norm(mean_n v_n)       (Global)
    text   caption     -> saem.bert      frozen BERT, the caption padded to 32 WordPieces (Local, hidden)
                       -> saem.cnn       1/2/3-gram convolutions, max over time, Linear, l2norm  (Global)
    score  = core.cosine <v, u>;  loss core.triplet (margin 0.2, hardest negative)
    objectives: saem.angular (angular loss on the global vectors, weight decaying with the epoch)
                saem.param_norm (sum of the image encoder's weight norms; the recipe weighs it 0.01)

Formulas follow the official code (yiling2018/saem; the paper's body was not available here, so the
specs cite the official modules rather than equation numbers): the image layer is its ``bert.BERTLayer`` with t_cfg.json (256-d, 16 heads,
2048 inner, GELU, dropout 0.1), the text head its ``BertMapping`` with ``txt_stru = 'cnn'``, the
losses ``loss.ContrastiveLoss`` / ``loss.AngularLoss`` and the L2 term of ``SAEM.forward_loss``.

The official code pads every caption to 32 WordPiece positions before BERT and max-pools the
CNN over all 32, the [PAD] positions' BERT states included. ``saem.bert`` does the same for any
batch (it pads or cuts to ``max_words`` itself and marks all of them valid fragments), so a
caption's vector never depends on the batch it is encoded in; ``pad_fragments = false`` marks
only the caption's own tokens, and ``saem.cnn`` then pools windows inside the caption only.
"""

from __future__ import annotations

import fnmatch
import json
from typing import Any, ClassVar

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from itmkit.errors import ItmkitError
from itmkit.ops import float32
from itmkit.stage import PortError, Stage, param
from itmkit.types import GlobalPort, Local, LocalPort, LossPort, ParametersPort, Tokens, TokensPort
from itmkit_bert.stages import TINY, BertDirectory, load_bert
from itmkit_bert.vocab import check_model_directory
from itmkit_saem.modules import NgramCNN, TransformerLayer

PAPER = "Wu et al. 2019 (SAEM, ACM MM)"

# ============================================================================ text encoder


class FixedLengthBert(nn.Module):
    """h = BERT([CLS] w_1 .. w_n [SEP] [PAD] ..): a caption's last hidden states at ``max_words`` positions.

    Tokens (B, L) -> Local (B, W, H), W = ``max_words`` (0: W = L, the batch's own width).
    As the official ``data.convert_to_feature``: a caption longer than W keeps [CLS], its first
    W - 2 pieces and its [SEP]; shorter ones are padded with the [PAD] id, which BERT's attention
    masks out. ``pad_fragments``: the [PAD] positions' states are valid fragments of the output
    (the official CNN pools over them); otherwise only the caption's own positions are valid.
    No projection: the output dim is BERT's hidden size. ``freeze`` keeps BERT's weights fixed;
    ``frozen_dropout`` keeps its dropout on in training all the same (the official
    ``freeze_layers`` only stops gradients, and ``train()`` leaves BERT's dropout active).
    """

    def __init__(self, *, bert: nn.Module, max_words: int = 32, pad_fragments: bool = True, freeze: bool = True,
                 frozen_dropout: bool = True, lr_scale: float = 1.0):
        super().__init__()
        self.bert = bert
        self.max_words = max_words
        self.pad_fragments = pad_fragments
        self.freeze = freeze
        self.frozen_dropout = frozen_dropout
        pad = getattr(bert.config, "pad_token_id", None)
        self.pad_id = 0 if pad is None else int(pad)
        if freeze:
            self.bert.requires_grad_(False)
        self.bert.lr_scale = lr_scale  # read by itmkit.train

    def train(self, mode: bool = True) -> FixedLengthBert:
        super().train(mode)
        if self.freeze and not self.frozen_dropout:
            self.bert.eval()
        return self

    def fixed_ids(self, x: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, W), lengths (B,)): each caption cut or [PAD]-padded to W positions, its [SEP] kept."""
        ids, lengths = x.ids, x.lengths.to(x.ids.device)
        width = self.max_words or ids.shape[1]
        if ids.shape[1] < width:
            ids = F.pad(ids, (0, width - ids.shape[1]), value=self.pad_id)
        ids = ids[:, :width]
        kept = lengths.clamp(max=width)
        valid = torch.arange(width, device=ids.device)[None, :] < kept[:, None]
        ids = torch.where(valid, ids, self.pad_id)  # whatever the batch held past a caption: [PAD]
        if self.max_words and x.ids.shape[1] > width:
            # a cut caption ends with its own [SEP], the last of its ids
            sep = x.ids.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
            ids[:, width - 1] = torch.where(lengths > width, sep, ids[:, width - 1])
        return ids, kept

    def forward(self, x: Tokens) -> Local:
        ids, kept = self.fixed_ids(x)
        attend = torch.arange(ids.shape[1], device=ids.device)[None, :] < kept[:, None]
        hidden = self.bert(input_ids=ids, attention_mask=attend.long(),
                           token_type_ids=torch.zeros_like(ids)).last_hidden_state  # (B, W, H)
        mask = torch.ones_like(attend) if self.max_words and self.pad_fragments else attend
        return Local(hidden, mask)


def bert_config(path: str) -> dict[str, Any]:
    """config.json of a model directory, read without loading the model."""
    folder = check_model_directory(path)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ItmkitError(f"cannot read {folder / 'config.json'}: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("hidden_size"), int):
        raise ItmkitError(f"{folder / 'config.json'} gives no integer hidden_size")
    return config


@attrs.frozen(kw_only=True)
class SaemBert(BertDirectory, Stage):
    """Frozen BERT over captions padded to a fixed 32 WordPieces: the last hidden states, unprojected (SAEM)."""

    name = "saem.bert"
    kind = "encoder"
    paper = (f"{PAPER}, text fragments from BERT; Devlin et al. 2019. Official text_net.BertMapping:"
             " frozen BERT, captions padded to max_words = 32 (data.convert_to_feature)")
    example: ClassVar[dict] = {"path": str(TINY), "pretrained": False}
    module: ClassVar[type[FixedLengthBert]] = FixedLengthBert  # a subclass may extend what the module returns

    path: str = param(help="local Hugging Face BERT directory (config.json, vocab.txt, weights); nothing is"
                           " downloaded")
    pretrained: bool = param(True, "load the directory's weights (false: random init from config.json)")
    max_words: int = param(32, "WordPiece positions per caption, [CLS] and [SEP] included: longer captions are cut,"
                               " shorter ones [PAD]-padded (SAEM: 32); 0: the batch's own width", ge=0, le=4096)
    pad_fragments: bool = param(True, "the [PAD] positions up to max_words are valid fragments of the output, so a"
                                      " pool reads their states (the official SAEM CNN does); false: only the"
                                      " caption's tokens")
    freeze: bool = param(True, "keep BERT's weights fixed (SAEM: frozen)")
    frozen_dropout: bool = param(True, "a frozen BERT still runs its dropout in training (official: yes)")
    lr_scale: float = param(1.0, "learning-rate multiplier of BERT's weights when not frozen", gt=0.0)

    def _config(self) -> dict[str, Any]:
        problem = self._directory_problem()
        if problem:
            raise PortError(problem)
        try:
            config = bert_config(self.path)
        except ItmkitError as exc:
            raise PortError(str(exc)) from None
        positions = config.get("max_position_embeddings", 512)
        if self.max_words > positions:
            raise PortError(f"max_words = {self.max_words} exceeds the {positions} positions of the BERT in"
                            f" {self.path}")
        if self.max_words == 1:
            raise PortError("max_words = 1 leaves no room for [CLS] and [SEP]; use at least 2 (SAEM: 32)")
        return config

    def ports(self, x: TokensPort) -> LocalPort:
        return LocalPort(self._config()["hidden_size"])

    def build(self, x: TokensPort) -> nn.Module:
        self._config()
        return self.module(bert=load_bert(self.path, pretrained=self.pretrained), max_words=self.max_words,
                           pad_fragments=self.pad_fragments, freeze=self.freeze,
                           frozen_dropout=self.frozen_dropout, lr_scale=self.lr_scale)


# ================================================================================ text head


class CnnPool(nn.Module):
    """u = l2norm(W Dropout([max_t ReLU(conv_K(x))_t]_K) + b): NgramCNN over the valid fragments. Local -> (B, D)."""

    def __init__(self, **kwargs):
        super().__init__()
        self.cnn = NgramCNN(**kwargs)

    def forward(self, x: Local) -> torch.Tensor:
        return self.cnn(x.feats, x.mask)


@attrs.frozen(kw_only=True)
class SaemCnn(Stage):
    """SAEM text head (Wu et al. 2019): 1/2/3-gram convolutions over word fragments, max over time, Linear, l2norm."""

    name = "saem.cnn"
    kind = "aggregator"
    paper = (f"{PAPER}, text embedding by a 1-D CNN over word fragments, max-pooled over time; the official"
             " BertMapping ('cnn': Conv2d(1, 512, (K, 768)), K = 1, 2, 3; dropout; Linear; l2norm)")

    embed_dim: int | None = param(None, "joint embedding size (default: [recipe].embed_dim; SAEM: final_dims 256)",
                                  ge=1)
    channels: int = param(512, "output channels of each n-gram convolution", ge=1)
    widths: list[int] = param(attrs.Factory(lambda: [1, 2, 3]), "n-gram widths, one convolution each")
    dropout: float = param(0.1, "dropout on the pooled features before the Linear (BERT's hidden_dropout_prob)",
                           ge=0.0, le=1.0)
    layer_norm: bool = param(False, "LayerNorm after the Linear (MMCA's text head; not SAEM)")
    normalize: bool = param(True, "l2-normalise the output")

    def ports(self, x: LocalPort) -> GlobalPort:
        if not self.widths or min(self.widths) < 1 or max(self.widths) > 64:
            raise PortError(f"widths must be n-gram sizes between 1 and 64, got {self.widths}")
        return GlobalPort(self.embed_dim or 1024)

    def build(self, x: LocalPort) -> nn.Module:
        return CnnPool(in_dim=x.dim, channels=self.channels, widths=tuple(self.widths), out_dim=self.embed_dim or 1024,
                       dropout=self.dropout, layer_norm=self.layer_norm, normalize=self.normalize)


# ============================================================================ image reasoner


class TransformerReasoner(nn.Module):
    """Local (B, N, D) -> Local (B, N, D): one BERT layer of self-attention over the valid fragments."""

    def __init__(self, **kwargs):
        super().__init__()
        self.layer = TransformerLayer(**kwargs)

    def forward(self, x: Local) -> Local:
        return Local(self.layer(x.feats, x.mask), x.mask, x.extras)


@attrs.frozen(kw_only=True)
class SaemTransformer(Stage):
    """SAEM fragment self-attention (Wu et al. 2019): one post-LN BERT layer over the regions (16 heads, GELU)."""

    name = "saem.transformer"
    kind = "reasoner"
    paper = (f"{PAPER}, image fragment self-attention (multi-head attention, feed-forward, residual + LayerNorm);"
             " official image_net.TransformerMapping with t_cfg.json")

    heads: int = param(16, "attention heads (t_cfg.json: 16); must divide the fragment dim", ge=1)
    intermediate: int = param(2048, "feed-forward inner size (t_cfg.json: 2048)", ge=1)
    activation: str = param("gelu", "feed-forward activation: BERT's erf GELU, or ReLU", choices=("gelu", "relu"))
    dropout: float = param(0.1, "dropout on the attention weights and after both projections (t_cfg.json: 0.1)",
                           ge=0.0, le=1.0)
    ln_eps: float = param(1e-12, "LayerNorm epsilon (BERT: 1e-12)", gt=0.0)

    def ports(self, x: LocalPort) -> LocalPort:
        if x.dim % self.heads:
            raise PortError(f"{self.heads} heads do not divide the fragment dim {x.dim}: set heads to a divisor"
                            " of it (SAEM: 256-d fragments, 16 heads)")
        return LocalPort(x.dim)

    def build(self, x: LocalPort) -> nn.Module:
        return TransformerReasoner(dim=x.dim, heads=self.heads, intermediate=self.intermediate,
                                   activation=self.activation, dropout=self.dropout, ln_eps=self.ln_eps)


# ============================================================================== objectives


def angular_schedule(epoch: int, *, start: float, decay: float, every: int, last: int) -> float:
    """alpha(epoch) = start * decay ** (epoch // every) up to epoch ``last`` (0-based), 0 after (SAEM.forward_loss)."""
    return 0.0 if epoch > last else start * decay ** (epoch // every)


class AngularLoss(nn.Module):
    """alpha(epoch) x [L_ang(v -> u) + L_ang(u -> v)], the N-pair angular loss of Wang et al. 2017.

    For anchors a_i with positives p_i and every other item's positive p_j as negatives:
        f_ij = 4 tan^2(alpha) (a_i + p_i) . p_j - 2 (1 + tan^2(alpha)) a_i . p_i
        max violation:  L = sum_i log(1 + exp(max_j f_ij))        (official default)
        otherwise:      L = mean_i log(1 + sum_j exp(f_ij))
    once with images as anchors and captions as positives, once the other way round. As the
    official ``AngularLoss``, every other item of the batch is a negative, another caption of
    the same image included (``mask_same_image`` leaves those out). ``image``, ``text``: (B, D).
    """

    def __init__(self, *, tan2: float = 1.0, max_violation: bool = True, start: float = 0.5, decay: float = 0.1,
                 every: int = 5, last: int = 20, mask_same_image: bool = False):
        super().__init__()
        self.tan2, self.max_violation, self.mask_same_image = tan2, max_violation, mask_same_image
        self.schedule = dict(start=start, decay=decay, every=every, last=last)

    def one_way(self, anchors: torch.Tensor, pos: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
        f = (4.0 * self.tan2 * (anchors + pos) @ pos.T
             - 2.0 * (1.0 + self.tan2) * (anchors * pos).sum(dim=1, keepdim=True))  # (B, B): f[i, j]
        f = float32(f).masked_fill(excluded, float("-inf"))  # the loss (softplus / LogSumExp) in float32
        if self.max_violation:
            worst = f.max(dim=1).values
            return F.softplus(worst[torch.isfinite(worst)]).sum()  # an anchor with no negative adds nothing
        return torch.logaddexp(torch.zeros_like(f[:, 0]), torch.logsumexp(f, dim=1)).mean()

    def forward(self, *, image: torch.Tensor, text: torch.Tensor, positives: torch.Tensor,
                epoch: int = 0) -> torch.Tensor:
        alpha = angular_schedule(epoch, **self.schedule)
        excluded = torch.eye(image.shape[0], dtype=torch.bool, device=image.device)
        if self.mask_same_image:
            excluded = excluded | positives | positives.T
        loss = self.one_way(image, text, excluded) + self.one_way(text, image, excluded)
        return alpha * loss


@attrs.frozen(kw_only=True)
class SaemAngular(Stage):
    """SAEM angular loss (Wu et al. 2019, after Wang et al. 2017) on the global vectors, weighted alpha(epoch)."""

    name = "saem.angular"
    kind = "objective"
    paper = (f"{PAPER}, angular loss term; Wang et al. 2017 (Deep Metric Learning with Angular Loss), N-pair"
             " form; official loss.AngularLoss and the alpha schedule of model.SAEM.forward_loss")

    tan2: float = param(1.0, "tan^2 of the angle bound (official angle_bound: 1, i.e. 45 degrees)", gt=0.0)
    max_violation: bool = param(True, "hardest negative per anchor (official); false: log-sum-exp over all")
    start: float = param(0.5, "alpha at epoch 0 (official: 0.5)", ge=0.0)
    decay: float = param(0.1, "alpha's factor every `every` epochs (official: 0.1)", ge=0.0)
    every: int = param(5, "epochs between alpha decays (official: 5)", ge=1)
    last: int = param(20, "last epoch (0-based) with a non-zero alpha (official: 20)", ge=0)
    mask_same_image: bool = param(False, "never treat another caption of the same image as a negative (the"
                                         " official code does)")

    def ports(self, image: GlobalPort, text: GlobalPort) -> LossPort:
        if image.dim != text.dim:
            raise PortError(f"image global dim {image.dim} differs from text global dim {text.dim}")
        return LossPort()

    def build(self, image: GlobalPort, text: GlobalPort) -> nn.Module:
        return AngularLoss(tan2=self.tan2, max_violation=self.max_violation, start=self.start, decay=self.decay,
                           every=self.every, last=self.last, mask_same_image=self.mask_same_image)


class ParamNorm(nn.Module):
    """sum_k ||theta_k||_2 over the selected parameters: unsquared L2 norms (SAEM.forward_loss's l2_reg).

    A parameter is selected when its name matches one of ``include`` and none of ``exclude``
    (fnmatch patterns). The official code sums over every ``img_enc`` parameter whose last name
    is not bias, gamma or beta (the LayerNorms' weight and bias).
    """

    def __init__(self, *, include: tuple[str, ...], exclude: tuple[str, ...]):
        super().__init__()
        self.include, self.exclude = include, exclude
        self._chosen: dict[tuple[str, ...], list[str]] = {}

    def selected(self, names: list[str]) -> list[str]:
        key = tuple(names)
        if key not in self._chosen:
            self._chosen[key] = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in self.include)
                                 and not any(fnmatch.fnmatchcase(n, p) for p in self.exclude)]
        return self._chosen[key]

    def forward(self, *, parameters: dict[str, torch.Tensor], positives: torch.Tensor | None = None,
                epoch: int = 0) -> torch.Tensor:
        names = self.selected(list(parameters))
        if not names:  # a misspelt pattern would otherwise train without the penalty, silently
            raise ItmkitError(f"saem.param_norm: include = {self.include} (exclude = {self.exclude}) selects none of"
                              f" the model's {len(parameters)} trainable parameters (e.g. {', '.join(list(parameters)[:3])});"
                              " `itmkit build` lists the stages whose parameters are named image.encoder.*,"
                              " image.reasoners.N.*, image.pool.*, text.*, branches.N.*")
        return torch.stack([parameters[n].norm() for n in names]).sum()


@attrs.frozen(kw_only=True)
class SaemParamNorm(Stage):
    """SAEM's weight penalty: the sum of the unsquared L2 norms of the image encoder's weights (recipe weight 0.01)."""

    name = "saem.param_norm"
    kind = "objective"
    paper = (f"{PAPER}, L2 regularisation term; official model.SAEM.forward_loss: 0.01 x sum of torch.norm"
             " of every img_enc parameter but biases and LayerNorm gamma/beta")

    include: list[str] = param(attrs.Factory(lambda: ["image.*"]),
                               "fnmatch patterns of the parameters to penalise (official: the whole image tower)")
    exclude: list[str] = param(attrs.Factory(lambda: ["*.bias", "*norm.weight"]),
                               "patterns left out (official: biases and LayerNorm weights, 'gamma'/'beta')")

    def ports(self, parameters: ParametersPort) -> LossPort:
        return LossPort()

    def build(self, parameters: ParametersPort) -> nn.Module:
        return ParamNorm(include=tuple(self.include), exclude=tuple(self.exclude))
