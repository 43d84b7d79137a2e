"""The stage spec: a small frozen attrs class that names, validates, wires and builds a module.

A stage has two halves. The ``nn.Module`` takes plain keyword arguments and knows nothing of
itmkit. The spec (a subclass of ``Stage``) is what recipes, the registry and the CLI see: its
registered ``name``, its ``kind``, the ``paper`` it implements, validated fields with help
text, ``ports()`` whose annotations say what it consumes and whose result says what it
produces, and ``build()`` returning the module sized from its input ports.
"""

from __future__ import annotations

import abc
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar

import attrs
from torch import nn

from itmkit.types import Port

KINDS = ("encoder", "reasoner", "aggregator", "pair", "cross", "similarity", "loss", "objective", "rerank")

# Names a ports() parameter may take, and what the builder feeds it.
#   x      the previous stage's output in the same slot chain (raw input for an encoder;
#          for an objective, like the loss, the batch's B x B summed branch scores)
#   image  the image tower's output of the annotated kind (Local or Global)
#   text   the text tower's output of the annotated kind
#   image_global, text_global
#          that tower's pooled vectors (GlobalPort) for a stage that reads them besides the
#          fragments it takes as image / text (SHAN's global-to-local step, say)
PORT_PARAMS = ("x", "image", "text", "image_global", "text_global")
# What only an objective (a training-only term added to the loss) may also read:
#   regions     the batch's raw region features (Regions)
#   tokens      the batch's raw caption token ids (Tokens), e.g. as targets of caption generation
#   parameters  the model's trainable parameters (ParametersPort), e.g. for a weight-norm penalty
OBJECTIVE_PARAMS = ("regions", "tokens", "parameters")


class PortError(Exception):
    """Raised by ``Stage.ports()`` when its inputs do not fit (a dim mismatch, say)."""


@attrs.frozen
class BoxLayout:
    """One layout of the region boxes (``{split}_boxes.npy``) a stage can read: ``columns`` numbers per region.

    ``needs_sizes``: the stage also needs each image's width and height (``{split}_sizes.npy``).
    ``index_columns`` > 0: the first that many columns hold whole indices, each at most ``index_max``
    (PFAN's grid blocks); negative ones are refused for every layout by the data checks.
    """

    columns: int
    meaning: str  # what the columns hold, for messages: "x1, y1, x2, y2 in pixels"
    needs_sizes: bool = False
    index_columns: int = 0
    index_max: int = 0


@attrs.frozen
class DataNeeds:
    """What a stage needs from the data beyond features, checked on every split before the work starts.

    ``boxes``: region boxes in one of these layouts (empty: boxes are not read). ``max_regions``: at
    most this many real regions per image (a module with one parameter per region slot).
    """

    boxes: tuple[BoxLayout, ...] = ()
    max_regions: int | None = None


def param(
    default: Any = attrs.NOTHING,
    help: str = "",
    *,
    choices: tuple[Any, ...] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
) -> Any:
    """An attrs field of a stage spec with help text and optional choices / range checks."""
    metadata = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le}
    return attrs.field(default=default, metadata=metadata, kw_only=True)


class Stage(abc.ABC):
    """Base of every stage spec. Subclasses are ``@attrs.frozen`` classes of ``param()`` fields."""

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    paper: ClassVar[str] = ""

    @abc.abstractmethod
    def ports(self, *args: Port, **kwargs: Port) -> Port:
        """The port this stage produces from its input ports (annotations: what it consumes)."""

    @abc.abstractmethod
    def build(self, **inputs: Port) -> nn.Module:
        """The module, sized from the input ports ``ports()`` accepted."""

    def pair_bytes(self, *, text_len: int, image_len: int) -> int:
        """Bytes of working memory this stage needs per image x caption pair (scoring blocks).

        An override may also take a keyword ``ports``: the input ports as wired (name -> Port), for a
        stage whose per-pair memory grows with its inputs' width (see ``wired_pair_bytes``).
        """
        return 64

    def data_needs(self) -> DataNeeds:
        """What this stage reads from the data besides features (boxes, image sizes, a region bound).

        ``itmkit train``, ``eval`` and ``data check --recipe`` check every split they use against it
        before the work starts (``itmkit.preflight``). The default: nothing.
        """
        return DataNeeds()

    def vocabulary(self, words: Callable[[], Any]) -> Any:
        """What captions are tokenised with when this stage is the text encoder.

        ``words()`` gives the data's word vocabulary (``itmkit.data.vocab.Vocabulary``); it is
        only read when called. The default is that vocabulary unchanged. A text encoder may extend
        it (GPO appends ``<mask>``) or bring its own tokenizer instead (BERT's WordPiece): any
        object with ``encode(caption) -> ids``, ``len()``, ``to_json()``, ``sha256()`` and
        ``mask_id`` will do.
        """
        return words()


def wired_pair_bytes(spec: Stage, *, text_len: int, image_len: int, ports: dict[str, Port]) -> int:
    """``spec.pair_bytes``, given the wired input ``ports`` too when its signature takes them."""
    if "ports" in inspect.signature(spec.pair_bytes).parameters:
        return spec.pair_bytes(text_len=text_len, image_len=image_len, ports=ports)
    return spec.pair_bytes(text_len=text_len, image_len=image_len)


@attrs.frozen
class ParamInfo:
    """One documented parameter of a stage, for listings, docs and validation."""

    name: str
    type: Any
    default: Any
    help: str
    choices: tuple[Any, ...] | None
    ge: float | None
    gt: float | None
    le: float | None

    @property
    def required(self) -> bool:
        return self.default is attrs.NOTHING

    def type_name(self) -> str:
        return type_name(self.type)

    def constraint(self) -> str:
        parts = []
        if self.choices:
            parts.append("one of " + ", ".join(repr(c) for c in self.choices))
        for symbol, bound in ((">=", self.ge), (">", self.gt), ("<=", self.le)):
            if bound is not None:
                parts.append(f"{symbol} {bound}")
        return "; ".join(parts)


def stage_params(cls: type) -> list[ParamInfo]:
    """The documented parameters of an attrs spec class, in declaration order."""
    attrs.resolve_types(cls)
    out = []
    for f in attrs.fields(cls):
        meta = f.metadata
        default = f.default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory()
        out.append(
            ParamInfo(
                name=f.name,
                type=f.type,
                default=default,
                help=meta.get("help", ""),
                choices=meta.get("choices"),
                ge=meta.get("ge"),
                gt=meta.get("gt"),
                le=meta.get("le"),
            )
        )
    return out


@attrs.frozen
class InputSpec:
    """One input of ``ports()``: its name, the port classes it accepts, and whether it may be absent."""

    name: str
    accepts: tuple[type[Port], ...]
    optional: bool

    def describe(self) -> str:
        kinds = " | ".join(p.__name__ for p in self.accepts)
        return f"{self.name}: {kinds}{' (optional)' if self.optional else ''}"


def stage_inputs(cls: type[Stage]) -> list[InputSpec]:
    """Read the inputs a stage consumes from the annotations of its ``ports()`` method."""
    hints = typing.get_type_hints(cls.ports)
    signature = inspect.signature(cls.ports)
    out = []
    for name, parameter in signature.parameters.items():
        if name == "self":
            continue
        members = _union_members(hints.get(name))
        accepts = tuple(m for m in members if isinstance(m, type) and issubclass(m, Port))
        optional = type(None) in members or parameter.default is not inspect.Parameter.empty
        out.append(InputSpec(name, accepts, optional))
    return out


def stage_outputs(cls: type[Stage]) -> tuple[type[Port], ...]:
    """The port classes ``ports()`` may return, from its return annotation."""
    hints = typing.get_type_hints(cls.ports)
    return tuple(m for m in _union_members(hints.get("return")) if isinstance(m, type))


def check_stage_class(cls: type) -> list[str]:
    """Problems that make a class unusable as a stage spec (for the registry's checks)."""
    problems = []
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        return [f"{cls!r} is not a subclass of itmkit.Stage"]
    if not attrs.has(cls):
        problems.append(f"{cls.__name__} is not an attrs class (decorate it with @attrs.frozen)")
    if not cls.name or "." not in cls.name:
        problems.append(f"{cls.__name__}.name must be a dotted 'plugin.stage' name, got {cls.name!r}")
    if cls.kind not in KINDS:
        problems.append(f"{cls.__name__}.kind must be one of {', '.join(KINDS)}, got {cls.kind!r}")
    if problems:
        return problems
    try:
        inputs = stage_inputs(cls)
    except Exception as exc:  # a broken annotation must not break the registry
        return [f"{cls.__name__}.ports() annotations cannot be read: {exc}"]
    allowed = PORT_PARAMS + OBJECTIVE_PARAMS if cls.kind == "objective" else PORT_PARAMS
    for spec in inputs:
        if spec.name not in allowed:
            problems.append(f"{cls.__name__}.ports() parameter {spec.name!r} must be one of {allowed}"
                            + (" (regions, tokens and parameters are for objectives)"
                               if spec.name in OBJECTIVE_PARAMS else ""))
        if not spec.accepts:
            problems.append(f"{cls.__name__}.ports() parameter {spec.name!r} has no port annotation")
    return problems


def type_name(tp: Any) -> str:
    """A short readable name of a parameter type annotation."""
    if tp is type(None):
        return "None"
    if isinstance(tp, type):
        return tp.__name__
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = ", ".join(type_name(a) for a in typing.get_args(tp) if a is not Ellipsis)
        return f"{origin.__name__}[{args}]"
    return str(tp)


def _union_members(tp: Any) -> tuple[Any, ...]:
    if tp is None:
        return ()
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)
