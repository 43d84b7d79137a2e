"""The conformance kit: checks every stage must pass, for itmkit's own tests and third-party plugins.

A plugin tests its stages with one line::

    from itmkit.testing import check_stage

    def test_gated_mean():
        check_stage(GatedMean)

or parametrises over ``CHECKS`` to see each failing check on its own. The checks build the stage
from its defaults (plus ``example``, a ``ClassVar[dict]`` of parameters for required fields),
feed its ``ports()`` sample ports of every kind its annotations accept, build the module, run it
on random inputs of those shapes and check what comes out: kind and shape, finite values,
gradients, padding that changes nothing (new values in padded positions, or images stored with
extra padded rows past their region count), a safetensors round trip and a recipe round trip.
"""

from __future__ import annotations

import itertools
import pickle
import tomllib
import types
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import tomli_w
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from itmkit.stage import (PortError, Stage, check_stage_class, stage_inputs, stage_outputs, stage_params,
                          wired_pair_bytes)
from itmkit.structure import structure, unstructure
from itmkit.types import (
    Aligned,
    AlignedPort,
    GlobalPort,
    Local,
    LocalPort,
    LossPort,
    PairLocal,
    PairLocalPort,
    PairSims,
    PairSimsPort,
    ParametersPort,
    Port,
    Regions,
    RegionsPort,
    ScorePort,
    Tokens,
    TokensPort,
    lengths_to_mask,
)

# Sizes of the random inputs; distinct numbers so a swapped axis shows up as a wrong shape.
DIM = 32  # dim of Local / Global / Aligned ports, and embed_dim of encoders (as a recipe sets it)
FEATURE_DIM = 48  # region feature size of RegionsPort
VOCAB = 50  # vocabulary size of TokensPort
PAIR_DIM = 16  # a vector-valued PairSims (S > 1), beside the scalar one
BATCH = 4  # items of an encoder / reasoner / pool batch, and the B of a loss's B x B scores
NI, NT = 3, 5  # images x captions of a scoring block
REGIONS, WORDS = 6, 7  # fragments per image / per caption
SEED = 0

# The sample ports offered to ports() for each port class it may accept.
SAMPLE_PORTS: dict[type[Port], tuple[Port, ...]] = {
    RegionsPort: (RegionsPort(FEATURE_DIM),),
    TokensPort: (TokensPort(VOCAB, mask_id=VOCAB - 1),),  # a vocabulary whose last word is a mask token
    LocalPort: (LocalPort(DIM),),
    GlobalPort: (GlobalPort(DIM),),
    AlignedPort: (AlignedPort(DIM),),
    PairLocalPort: (PairLocalPort(DIM, "image"), PairLocalPort(DIM, "text")),
    PairSimsPort: (PairSimsPort(1), PairSimsPort(PAIR_DIM)),
    ScorePort: (ScorePort(),),
    ParametersPort: (ParametersPort(),),
}

TRAINING_KINDS = ("loss", "objective")  # stages that see a training batch (B x B scores, B items a side)

# --------------------------------------------------------------------------- random inputs


class Python2Pickler(pickle._Pickler):  # the pure-Python pickler, whose dispatch table can be extended
    """Writes every ``str`` as Python 2 wrote its byte strings: SHORT_BINSTRING of raw latin-1 bytes.

    Python 2's ``str`` was a byte string, so official checkpoints saved by Python 2.7 (SCAN's,
    PyTorch 0.3) hold keys, option names and values such as ``logger_name`` as undecoded bytes.
    A latin-1 'é' in them is not valid UTF-8, which is what makes the default ``torch.load`` fail
    and ``encoding='latin1'`` necessary: importer tests write such files with ``save_like_python2``.
    """

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: str) -> None:
        raw = obj.encode("latin1")
        assert len(raw) < 256, "SHORT_BINSTRING holds at most 255 bytes"
        self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        self.memoize(obj)

    dispatch[str] = save_py2_str


PYTHON2_PICKLE = types.ModuleType("python2_pickle")  # what torch.save accepts as pickle_module
PYTHON2_PICKLE.Pickler, PYTHON2_PICKLE.dump = Python2Pickler, pickle.dump


def save_like_python2(obj: Any, path) -> None:
    """torch.save in the legacy format, protocol 2, with Python 2 byte strings throughout."""
    torch.save(obj, path, pickle_module=PYTHON2_PICKLE, pickle_protocol=2, _use_new_zipfile_serialization=False)


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor storage any operator creates (views share their base's storage).

    For memory tests of scoring: ``with torch.no_grad(), LargestAllocation() as r: ...; r.largest``.
    """

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def recipe_plugins(path) -> set[str]:
    """The plugins whose stages a recipe file names (``scan`` for ``scan.t2i``), built-ins left out.

    A plugin's tests use it to pick their own recipes from ``recipes/``, where cross-paper
    recipes share a file-name prefix with them (``gpo_sgraf.toml``).
    """
    def stages(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            if isinstance(node.get("stage"), str):
                yield node["stage"]
            for value in node.values():
                yield from stages(value)
        elif isinstance(node, list):
            for value in node:
                yield from stages(value)

    with open(path, "rb") as f:
        return {name.split(".")[0] for name in stages(tomllib.load(f))} - {"core"}


def _lengths(batch: int, width: int, g: torch.Generator) -> torch.Tensor:
    """Varied valid lengths in [1, width]: the first row full, every other row padded."""
    if width <= 1:
        return torch.ones(batch, dtype=torch.long)
    lengths = torch.randint(1, width, (batch,), generator=g)
    lengths[0] = width
    return lengths


def _local(batch: int, length: int, dim: int, g: torch.Generator, boxes: bool) -> Local:
    feats = torch.randn(batch, length, dim, generator=g)
    mask = lengths_to_mask(_lengths(batch, length, g), length)
    extras = {"boxes": _boxes(batch, length, g)} if boxes else {}
    return Local(feats, mask, extras)


def _boxes(batch: int, count: int, g: torch.Generator) -> torch.Tensor:
    """(batch, count, 4) boxes x1, y1, x2, y2 inside a 100 x 100 image."""
    corner = torch.rand(batch, count, 2, generator=g) * 80
    size = torch.rand(batch, count, 2, generator=g) * 20 + 1
    return torch.cat([corner, corner + size], dim=-1)


def random_input(
    port: Port,
    *,
    batch: int = BATCH,
    ni: int = NI,
    nt: int = NT,
    generator: torch.Generator | None = None,
    side: str = "image",
    query_side: str = "text",
) -> Any:
    """A random run-time value of ``port``'s kind, with padding wherever the kind has a mask.

    Regions / Tokens / Local / Global hold ``batch`` items (``side`` decides the fragment count
    of a Local: REGIONS for "image", WORDS for "text"); Aligned and PairSims cover ``ni`` images
    x ``nt`` captions with ``query_side`` fragments as queries; a ScorePort is (ni, nt).
    """
    g = generator if generator is not None else torch.Generator().manual_seed(SEED)
    if isinstance(port, RegionsPort):
        lengths = _lengths(batch, REGIONS, g)
        sizes = torch.full((batch, 2), 100.0)
        return Regions(torch.rand(batch, REGIONS, port.dim, generator=g), lengths, _boxes(batch, REGIONS, g), sizes)
    if isinstance(port, TokensPort):
        if port.dim <= 4:
            raise ValueError(f"a TokensPort needs a vocabulary above the 4 special tokens, got dim {port.dim}")
        lengths = _lengths(batch, WORDS, g)
        ids = torch.randint(4, port.dim, (batch, WORDS), generator=g)
        return Tokens(ids.masked_fill(~lengths_to_mask(lengths, WORDS), 0), lengths)
    if isinstance(port, LocalPort):
        return _local(batch, REGIONS if side == "image" else WORDS, port.dim, g, boxes=side == "image")
    if isinstance(port, GlobalPort):
        return torch.randn(batch, port.dim, generator=g)
    if isinstance(port, AlignedPort):
        return _aligned(port.dim, ni, nt, g, query_side)
    if isinstance(port, PairLocalPort):
        return _pair_local(port, ni, nt, g)
    if isinstance(port, PairSimsPort):
        # The mask follows the query side (here the caption's words), the same for every image.
        mask = lengths_to_mask(_lengths(nt, WORDS, g), WORDS)[None].expand(ni, nt, WORDS)
        return PairSims(torch.randn(ni, nt, WORDS, port.dim, generator=g), mask)
    if isinstance(port, ScorePort):
        return torch.rand(ni, nt, generator=g) * 2 - 1  # cosine-like scores in [-1, 1)
    if isinstance(port, ParametersPort):
        return random_parameters(g)
    raise ValueError(f"no random input for {type(port).__name__}: it is an output, not an input")


def random_parameters(g: torch.Generator) -> dict[str, nn.Parameter]:
    """A model's trainable parameters as a ParametersPort carries them: weights, biases and a LayerNorm per tower."""
    shapes = {
        "image.encoder.fc.weight": (DIM, FEATURE_DIM), "image.encoder.fc.bias": (DIM,),
        "image.reasoners.0.norm.weight": (DIM,), "image.reasoners.0.norm.bias": (DIM,),
        "image.pool.linear.weight": (DIM, DIM),
        "text.encoder.embed.weight": (VOCAB, DIM), "text.encoder.rnn.weight_ih_l0": (3 * DIM, DIM),
        "branches.0.stages.0.linear.weight": (1, DIM),
    }
    return {name: nn.Parameter(torch.randn(*shape, generator=g)) for name, shape in shapes.items()}


def _aligned(dim: int, ni: int, nt: int, g: torch.Generator, query_side: str) -> Aligned:
    """Random attention of one side's fragments over the other's, with masked padding on both."""
    image = _local(ni, REGIONS, dim, g, boxes=False)
    text = _local(nt, WORDS, dim, g, boxes=False)
    if query_side == "text":
        query, query_mask = text.feats[None], text.mask[None]  # (1, Nt, Lq, D), (1, Nt, Lq)
        context, context_mask = image.feats[:, None], image.mask[:, None]  # (Ni, 1, Lc, D)
    elif query_side == "image":
        query, query_mask = image.feats[:, None], image.mask[:, None]
        context, context_mask = text.feats[None], text.mask[None]
    else:
        raise ValueError(f"query_side must be 'text' or 'image', got {query_side!r}")
    logits = torch.randn(ni, nt, query.shape[-2], context.shape[-2], generator=g)
    weights = logits.masked_fill(~context_mask[..., None, :], float("-inf")).softmax(dim=-1)
    return Aligned(query.contiguous(), weights, context.contiguous(), query_mask, query_side)


def _pair_local(port: PairLocalPort, ni: int, nt: int, g: torch.Generator) -> PairLocal:
    """Random fragments of ``port.side`` for every pair; each item's padding is the same in all its pairs."""
    if port.side == "image":
        mask = lengths_to_mask(_lengths(ni, REGIONS, g), REGIONS)[:, None].expand(ni, nt, REGIONS)
    else:
        mask = lengths_to_mask(_lengths(nt, WORDS, g), WORDS)[None].expand(ni, nt, WORDS)
    feats = torch.randn(ni, nt, mask.shape[-1], port.dim, generator=g)
    return PairLocal(feats * mask[..., None], mask, port.side)


def random_positives(batch: int = BATCH) -> torch.Tensor:
    """(B, B) bool: captions i and j describe the same image; pairs of captions share an image."""
    image_ids = torch.arange(batch) // 2
    return image_ids[:, None] == image_ids[None, :]


# ------------------------------------------------------------------------------- the cases


@attrs.frozen
class Case:
    """One way to feed a stage: sample ports per ports() parameter, and what ports() promises."""

    inputs: dict[str, Port]
    output: Port
    query_side: str = "text"  # for Aligned inputs: which side's fragments are the queries

    def describe(self) -> str:
        args = ", ".join(f"{name}={port.describe()}" for name, port in self.inputs.items())
        side = f", {self.query_side} queries" if any(isinstance(p, AlignedPort) for p in self.inputs.values()) else ""
        return f"ports({args}) -> {self.output.describe()}{side}"


def example_params(cls: type[Stage]) -> dict[str, Any]:
    """The parameters the kit builds a stage with: ``embed_dim`` as a recipe sets it, then ``cls.example``."""
    fields = {f.name for f in attrs.fields(cls)}
    params: dict[str, Any] = {"embed_dim": DIM} if "embed_dim" in fields else {}
    params.update(getattr(cls, "example", {}) or {})
    return params


def make_spec(cls: type[Stage]) -> Stage:
    """An instance of the spec from its defaults plus ``example_params``."""
    return cls(**example_params(cls))


def cases(cls: type[Stage]) -> list[Case]:
    """Every combination of sample ports that the stage's ports() accepts (PortError = not accepted)."""
    spec = make_spec(cls)
    options = []
    for inp in stage_inputs(cls):
        ports: list[Port | None] = [p for kind in inp.accepts for p in SAMPLE_PORTS.get(kind, ())]
        if inp.optional:
            ports.append(None)
        options.append([(inp.name, p) for p in ports])
    out = []
    for combo in itertools.product(*options):
        inputs = {name: port for name, port in combo if port is not None}
        try:
            promised = spec.ports(**inputs)
        except PortError:
            continue
        except Exception as exc:
            args = ", ".join(f"{n}={p.describe()}" for n, p in inputs.items())
            raise AssertionError(f"{cls.name}: ports({args}) raised {type(exc).__name__}: {exc}"
                                 " (only PortError may reject inputs)") from exc
        aligned = any(isinstance(p, AlignedPort) for p in inputs.values())
        for side in ("text", "image") if aligned else ("text",):
            out.append(Case(inputs, promised, side))
    return out


def _inputs(cls: type[Stage], case: Case, g: torch.Generator) -> dict[str, Any]:
    """Random run-time values for a case: image inputs hold NI items, text inputs NT, x BATCH."""
    values = {}
    for name, port in case.inputs.items():
        if cls.kind in TRAINING_KINDS:  # one training batch: B images, B captions, B x B scores
            side = "image" if name in ("image", "image_global", "regions") else "text"
            values[name] = random_input(port, batch=BATCH, ni=BATCH, nt=BATCH, generator=g, side=side)
        elif name in ("image", "image_global"):
            values[name] = random_input(port, batch=NI, generator=g, side="image")
        elif name in ("text", "text_global"):
            values[name] = random_input(port, batch=NT, generator=g, side="text")
        else:
            side = "text" if isinstance(port, TokensPort) else "image"
            values[name] = random_input(port, generator=g, side=side, query_side=case.query_side)
    return values


def call(module: nn.Module, cls: type[Stage], values: dict[str, Any]) -> Any:
    """Call a built module the way the model does: keywords as in ports(); a loss gets scores positionally,
    an objective its ports by name; both get the batch's positives and the epoch."""
    if cls.kind == "loss":
        return module(values["x"], positives=random_positives(values["x"].shape[0]), epoch=0)
    if cls.kind == "objective":
        return module(**values, positives=random_positives(BATCH), epoch=0)
    return module(**values)


def _built(cls: type[Stage], case: Case, seed: int = SEED) -> nn.Module:
    """The module for a case, initialised from ``seed`` without touching the caller's RNG."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = make_spec(cls).build(**case.inputs)
    if not isinstance(module, nn.Module):
        raise AssertionError(f"{cls.name}: build({case.describe()}) returned {type(module).__name__}, not an nn.Module")
    return module


def _run(module: nn.Module, cls: type[Stage], case: Case, values: dict[str, Any]) -> Any:
    """Forward with the RNG fixed (dropout), turning a crash into a message naming the case."""
    try:
        with torch.random.fork_rng():
            torch.manual_seed(SEED)
            return call(module, cls, values)
    except Exception as exc:
        raise AssertionError(f"{cls.name}: forward on {case.describe()} raised {type(exc).__name__}: {exc}") from exc


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside a run-time value (attrs containers, dicts, lists)."""
    if torch.is_tensor(value):
        yield value
    elif attrs.has(type(value)):
        for f in attrs.fields(type(value)):
            yield from _tensors(getattr(value, f.name))
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _float_leaves(values: dict[str, Any]) -> list[torch.Tensor]:
    return [t for t in _tensors(values) if t.is_floating_point() and t.grad_fn is None]


def _objective(out: Any) -> torch.Tensor:
    """A scalar that depends on everything the stage produced."""
    if isinstance(out, Aligned):
        return out.attended().sum() + out.query.sum()
    return sum((t.sum() for t in _tensors(out) if t.is_floating_point()), torch.zeros(()))


# --------------------------------------------------------------------------------- checks


def _error(cls: type[Stage], message: str) -> AssertionError:
    return AssertionError(f"{cls.name or cls.__name__}: {message}")


def _fail(cls: type[Stage], problems: list[str]) -> None:
    """Raise one AssertionError listing every problem found, if there are any."""
    if problems:
        raise _error(cls, "; ".join(problems))


def check_definition(cls: type[Stage]) -> None:
    """The class is a usable spec: attrs, dotted name, known kind, readable ports() annotations."""
    problems = check_stage_class(cls)
    _fail(cls, problems)
    fields = {f.name for f in attrs.fields(cls)}
    if "stage" in fields:
        problems.append("a parameter may not be called 'stage': a recipe table uses that key for the stage name")
    unknown = sorted(set(getattr(cls, "example", {}) or {}) - fields)
    if unknown:
        problems.append(f"example names unknown parameters {unknown}; parameters are {sorted(fields)}")
    if not stage_outputs(cls):
        problems.append("ports() has no return annotation naming the port classes it produces")
    _fail(cls, problems)


def check_defaults(cls: type[Stage]) -> None:
    """Every parameter has a default, or ``example`` gives it; the spec then constructs."""
    given = example_params(cls)
    missing = [p.name for p in stage_params(cls) if p.required and p.name not in given]
    if missing:
        raise _error(cls, f"required parameters {missing} have no default: give them in a class attribute"
                          f" example: ClassVar[dict] = {{{', '.join(repr(m) + ': ...' for m in missing)}}}")
    try:
        spec = make_spec(cls)
    except Exception as exc:
        raise _error(cls, f"{cls.__name__}(**{given!r}) raised {type(exc).__name__}: {exc}") from exc
    if spec != make_spec(cls):
        raise _error(cls, "two specs built from the same parameters are not equal (a field with eq=False?)")


def check_documentation(cls: type[Stage]) -> None:
    """A one-line docstring summary, a paper reference, and help text on every parameter."""
    problems = []
    doc = (cls.__doc__ or "").strip()
    if not doc or not doc.splitlines()[0].strip():
        problems.append("the class needs a docstring whose first line says what the stage computes")
    elif doc == (Stage.__doc__ or "").strip():
        problems.append("the class needs its own docstring (it shows Stage's)")
    if not (cls.paper or "").strip():
        problems.append("paper is empty: cite the paper and equation (or say 'example stage; no paper')")
    undocumented = [p.name for p in stage_params(cls) if not (p.help or "").strip()]
    if undocumented:
        problems.append(f"parameters without help text: {undocumented} (use param(default, 'help'))")
    _fail(cls, problems)


def check_ports(cls: type[Stage]) -> None:
    """ports() accepts at least one combination of sample inputs and returns an annotated port."""
    found = cases(cls)
    if not found:
        accepted = "; ".join(i.describe() for i in stage_inputs(cls))
        raise _error(cls, f"ports() accepted no combination of the kit's sample ports ({accepted});"
                          " an input of a port class the kit cannot make, or PortError on every sample")
    allowed = stage_outputs(cls)
    problems = []
    for case in found:
        if not isinstance(case.output, allowed):
            names = " | ".join(p.__name__ for p in allowed)
            problems.append(f"{case.describe()} returns a {type(case.output).__name__}, the annotation says {names}")
        elif case.output.dim < 1:
            problems.append(f"{case.describe()} returns a port of dim {case.output.dim}")
    _fail(cls, problems)


def _items(x: Any) -> int | None:
    """How many items a batch input holds (None for pair-block inputs and absent x)."""
    if isinstance(x, (Regions, Local)):
        return x.feats.shape[0]
    if isinstance(x, Tokens):
        return x.ids.shape[0]
    return x.shape[0] if torch.is_tensor(x) else None


def _described(value: Any) -> str:
    """'Tensor (4, 33)' or 'Local' for messages."""
    shape = getattr(value, "shape", None)
    return f"{type(value).__name__} {tuple(shape)}" if shape is not None else type(value).__name__


def _output_problem(out: Any, port: Port, x: Any, kind: str) -> str | None:
    """What is wrong with ``out`` against the port ``ports()`` promised, or None."""
    batch = None if kind in TRAINING_KINDS else _items(x)
    promised = f"promised {port.describe()} but forward returned {_described(out)}"
    if isinstance(port, LocalPort):
        return _local_problem(out, port, batch, promised)
    if isinstance(port, GlobalPort):
        ok = torch.is_tensor(out) and out.dim() == 2 and out.shape[1] == port.dim and batch in (None, out.shape[0])
        return None if ok else f"{promised}, expected a tensor ({batch}, {port.dim})"
    if isinstance(port, ScorePort):
        ok = torch.is_tensor(out) and tuple(out.shape) == (NI, NT)
        return None if ok else f"{promised}, expected a ({NI}, {NT}) tensor"
    if isinstance(port, PairSimsPort):
        return _pair_sims_problem(out, port, x, promised)
    if isinstance(port, AlignedPort):
        return _aligned_problem(out, port, promised)
    if isinstance(port, PairLocalPort):
        return _pair_local_problem(out, port, promised)
    if isinstance(port, LossPort):
        return None if torch.is_tensor(out) and out.dim() == 0 else f"{promised}, expected a scalar tensor"
    return None  # a port class the kit does not know: only finiteness and gradients are checked


def _local_problem(out: Any, port: LocalPort, batch: int | None, promised: str) -> str | None:
    if not isinstance(out, Local):
        return f"{promised}, not a Local"
    feats, mask = out.feats, out.mask
    if feats.dim() != 3 or feats.shape[2] != port.dim or batch not in (None, feats.shape[0]):
        return f"Local feats have shape {tuple(feats.shape)}, expected ({batch}, N, {port.dim})"
    if mask.dtype != torch.bool or mask.shape != feats.shape[:2]:
        return f"Local mask is {mask.dtype} {tuple(mask.shape)}, expected bool {tuple(feats.shape[:2])}"
    return None


def _pair_sims_problem(out: Any, port: PairSimsPort, x: Any, promised: str) -> str | None:
    if not isinstance(out, PairSims):
        return f"{promised}, not PairSims"
    shape = out.sims.shape
    if out.sims.dim() != 4 or shape[:2] != (NI, NT) or shape[3] != port.dim:
        return f"PairSims sims have shape {tuple(shape)}, expected ({NI}, {NT}, N, {port.dim})"
    # One node per query fragment, or one more when a head puts a pair-level node first (SGRAF's global node).
    if isinstance(x, Aligned) and shape[2] not in (x.query.shape[-2], x.query.shape[-2] + 1):
        return (f"PairSims has {shape[2]} fragments per pair, the Aligned input has {x.query.shape[-2]} queries"
                " (expected one per query, plus at most one pair-level node first)")
    if out.mask.dtype != torch.bool or out.mask.shape != shape[:3]:
        return f"PairSims mask is {out.mask.dtype} {tuple(out.mask.shape)}, expected bool {tuple(shape[:3])}"
    return None


def _pair_local_problem(out: Any, port: PairLocalPort, promised: str) -> str | None:
    if not isinstance(out, PairLocal):
        return f"{promised}, not PairLocal"
    if out.side != port.side:
        return f"PairLocal.side is {out.side!r}, ports() promised {port.side!r}"
    shape = out.feats.shape
    if out.feats.dim() != 4 or shape[:2] != (NI, NT) or shape[3] != port.dim:
        return f"PairLocal feats have shape {tuple(shape)}, expected ({NI}, {NT}, N, {port.dim})"
    try:
        mask = torch.broadcast_shapes(out.mask.shape, shape[:3])
    except RuntimeError:
        mask = None
    if out.mask.dtype != torch.bool or mask != shape[:3]:
        return f"PairLocal mask is {out.mask.dtype} {tuple(out.mask.shape)}, expected bool broadcastable to {tuple(shape[:3])}"
    return None


def _aligned_problem(out: Any, port: AlignedPort, promised: str) -> str | None:
    if not isinstance(out, Aligned):
        return f"{promised}, not Aligned"
    if out.query_side not in ("text", "image"):
        return f"Aligned.query_side is {out.query_side!r}, expected 'text' or 'image'"
    expected = (NI, NT, WORDS if out.query_side == "text" else REGIONS, port.dim)
    try:
        attended = tuple(out.attended().shape)
        query = tuple(torch.broadcast_shapes(out.query.shape, expected))
        mask = tuple(torch.broadcast_shapes(out.query_mask.shape, expected[:3]))
    except RuntimeError as exc:
        return f"Aligned parts do not broadcast to {expected}: {exc}"
    if attended != expected or query != expected or mask != expected[:3] or out.query_mask.dtype != torch.bool:
        return (f"Aligned attended {attended}, query {tuple(out.query.shape)}, mask {tuple(out.query_mask.shape)};"
                f" expected attended {expected} with query and bool mask broadcastable to it")
    return None


def check_forward(cls: type[Stage]) -> None:
    """The built module gives the promised kind and shape, finite values and finite gradients."""
    for case in cases(cls):
        module = _built(cls, case)
        module.train()
        g = torch.Generator().manual_seed(SEED)
        values = _inputs(cls, case, g)
        leaves = _float_leaves(values)
        for leaf in leaves:
            leaf.requires_grad_(True)
        before = [t.detach().clone() for t in _tensors(values)]
        out = _run(module, cls, case, values)
        where = f"on {case.describe()}"
        problem = _output_problem(out, case.output, values.get("x"), cls.kind)
        if problem:
            raise _error(cls, f"{problem} {where}")
        if any(not torch.equal(a, b.detach()) for a, b in zip(before, _tensors(values))):
            raise _error(cls, f"forward modified its input tensors in place {where}")
        bad = [tuple(t.shape) for t in _tensors(out) if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise _error(cls, f"non-finite values in outputs of shape {bad} {where}")
        _check_gradients(cls, module, case, out, leaves)


def _check_gradients(cls: type[Stage], module: nn.Module, case: Case, out: Any, leaves: list[torch.Tensor]) -> None:
    """Backward of the summed outputs reaches every trainable parameter, finitely."""
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    objective = _objective(out)
    if not objective.requires_grad:
        if trainable or (leaves and cls.kind != "rerank"):
            raise _error(cls, f"the outputs on {case.describe()} carry no gradient (detached?)")
        return
    objective.backward()
    where = f"on {case.describe()}"
    missing = [n for n, p in trainable if p.grad is None]
    if missing:
        raise _error(cls, f"no gradient reaches parameters {missing} {where}; a parameter that is not"
                          " trained must have requires_grad=False")
    bad = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    if bad:
        raise _error(cls, f"non-finite gradients of parameters {bad} {where}")
    if any(t.grad is not None and not torch.isfinite(t.grad).all() for t in leaves):
        raise _error(cls, f"non-finite gradients reach the inputs {where}")
    if leaves and cls.kind not in ("encoder", "rerank") and all(t.grad is None for t in leaves):
        raise _error(cls, f"no gradient flows back to any input {where}")


def _repad(value: Any, g: torch.Generator) -> Any:
    """The same value with fresh random numbers in every padded position."""
    if isinstance(value, Regions):
        noise = torch.rand(value.feats.shape, generator=g) * 10
        return attrs.evolve(value, feats=torch.where(value.mask[..., None], value.feats, noise))
    if isinstance(value, Tokens):
        noise = torch.randint(4, max(int(value.ids.max()) + 1, 5), value.ids.shape, generator=g)
        return attrs.evolve(value, ids=torch.where(value.mask, value.ids, noise))
    if isinstance(value, Local):
        noise = torch.randn(value.feats.shape, generator=g) * 10
        return attrs.evolve(value, feats=torch.where(value.mask[..., None], value.feats, noise))
    if isinstance(value, PairSims):
        noise = torch.randn(value.sims.shape, generator=g) * 10
        return attrs.evolve(value, sims=torch.where(value.mask[..., None], value.sims, noise))
    if isinstance(value, Aligned):
        noise = torch.randn(value.query.shape, generator=g) * 10
        return attrs.evolve(value, query=torch.where(value.query_mask[..., None], value.query, noise))
    if isinstance(value, PairLocal):
        noise = torch.randn(value.feats.shape, generator=g) * 10
        return attrs.evolve(value, feats=torch.where(value.mask[..., None], value.feats, noise))
    return value


def _valid_part(out: Any) -> list[torch.Tensor]:
    """The parts of an output that padding must not change."""
    if isinstance(out, Local):
        return [out.mask, out.feats[out.mask]]
    if isinstance(out, PairSims):
        return [out.mask, out.sims[out.mask]]
    if isinstance(out, Aligned):
        mask = out.query_mask.expand(out.weights.shape[:-1])
        return [mask, out.attended()[mask]]
    if isinstance(out, PairLocal):
        mask = out.mask.expand(out.feats.shape[:3])
        return [mask, out.feats[mask]]
    return [t for t in _tensors(out) if t.is_floating_point()]


def check_padding(cls: type[Stage]) -> None:
    """Changing padded positions of the inputs (masked fragments, padding tokens) changes no valid output."""
    for case in cases(cls):
        module = _built(cls, case).eval()
        g = torch.Generator().manual_seed(SEED)
        values = _inputs(cls, case, g)
        repadded = {name: _repad(v, g) for name, v in values.items()}
        with torch.no_grad():
            first = _valid_part(_run(module, cls, case, values))
            second = _valid_part(_run(module, cls, case, repadded))
        for a, b in zip(first, second):
            if a.shape != b.shape or not torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-5):
                raise _error(cls, f"padded input positions change the valid outputs on {case.describe()}:"
                                  " mask the padding (x.mask / lengths)")


EXTRA_REGIONS = 5  # padded rows check_region_padding appends to every image


def _widen(value: Any, extra: int, g: torch.Generator, fill: str) -> Any:
    """The same images with ``extra`` padded rows appended (zeros or random), their lengths unchanged.

    Regions (raw features, boxes) and Local fragments grow; everything else is returned as is.
    """
    def grow(t: torch.Tensor) -> torch.Tensor:
        shape = (t.shape[0], extra, *t.shape[2:])
        if t.dtype == torch.bool:
            pad = torch.zeros(shape, dtype=torch.bool)
        elif fill == "zeros":
            pad = torch.zeros(shape, dtype=t.dtype)
        else:
            pad = (torch.rand(shape, generator=g) * 10).to(t.dtype)
        return torch.cat([t, pad], dim=1)

    if isinstance(value, Regions):
        boxes = None if value.boxes is None else grow(value.boxes)
        return attrs.evolve(value, feats=grow(value.feats), boxes=boxes)
    if isinstance(value, Local):
        n = value.feats.shape[:2]
        extras = {k: grow(v) if torch.is_tensor(v) and v.shape[:2] == n else v for k, v in value.extras.items()}
        return Local(grow(value.feats), grow(value.mask), extras)
    return value


def _valid_values(out: Any) -> list[torch.Tensor]:
    """What padding must leave unchanged, in a form that does not depend on the padded width."""
    if isinstance(out, Local):
        return [out.mask.sum(dim=1), out.feats[out.mask]]
    if isinstance(out, PairSims):
        return [out.mask.sum(dim=-1), out.sims[out.mask]]
    if isinstance(out, Aligned):
        mask = out.query_mask.expand(out.weights.shape[:-1])
        return [mask.sum(dim=-1), out.attended()[mask]]
    if isinstance(out, PairLocal):
        mask = out.mask.expand(out.feats.shape[:3])
        return [mask.sum(dim=-1), out.feats[mask]]
    return [t for t in _tensors(out) if t.is_floating_point()]


def check_region_padding(cls: type[Stage]) -> None:
    """Images stored with extra padded rows past their region count (zeros or noise) give the same outputs.

    Adaptive detectors give 10 to 100 boxes per image, stored zero-padded to the longest: a stage
    must read an image's regions by its length (Regions.lengths, Local.mask), never by the width
    of the array, nor let padded rows reach a statistic (a mean over R, a BatchNorm over a fixed
    slot count). Image-side inputs (Regions, and image / pooled Local fragments) are widened.
    """
    for case in cases(cls):
        module = _built(cls, case).eval()
        values = _inputs(cls, case, torch.Generator().manual_seed(SEED))
        image_side = {name for name, port in case.inputs.items()
                      if isinstance(port, RegionsPort) or (isinstance(port, LocalPort) and name != "text")}
        if not image_side:
            continue
        with torch.no_grad():
            first = _valid_values(_run(module, cls, case, values))
            for fill in ("zeros", "random"):
                g = torch.Generator().manual_seed(SEED + 1)
                wider = {name: _widen(v, EXTRA_REGIONS, g, fill) if name in image_side else v
                         for name, v in values.items()}
                try:
                    second = _valid_values(_run(module, cls, case, wider))
                except AssertionError as exc:
                    raise _error(cls, f"images with {EXTRA_REGIONS} more padded rows ({fill}) past their region"
                                      f" count fail: {exc.__cause__ or exc}") from exc
                for a, b in zip(first, second):
                    if a.shape != b.shape or not torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-5):
                        raise _error(cls, f"{EXTRA_REGIONS} more padded rows ({fill}) past each image's region"
                                          f" count change the outputs on {case.describe()}: read regions by"
                                          " Regions.lengths / Local.mask, not by the array's width")
        # Training through zero rows: a padded row must not reach a square root or a division whose
        # derivative at 0 is infinite (0 x inf = NaN, and the optimiser spreads it to every weight).
        module.train()
        wider = {name: _widen(v, EXTRA_REGIONS, torch.Generator().manual_seed(SEED + 1), "zeros")
                 if name in image_side else v for name, v in values.items()}
        leaves = _float_leaves(wider)
        for leaf in leaves:
            leaf.requires_grad_(True)
        try:
            _check_gradients(cls, module, case, _run(module, cls, case, wider), leaves)
        except AssertionError as exc:
            raise _error(cls, f"training on images with {EXTRA_REGIONS} zero-padded rows past their region"
                              f" count: {exc}") from exc


def check_safetensors_roundtrip(cls: type[Stage]) -> None:
    """The state dict survives safetensors (as checkpoints save it) into a fresh module, outputs unchanged."""
    for case in cases(cls):
        module = _built(cls, case, seed=SEED).eval()
        values = _inputs(cls, case, torch.Generator().manual_seed(SEED))
        tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        try:
            payload = safetensors_save(tensors)
        except Exception as exc:  # shared storage (tied weights) is the usual cause
            raise _error(cls, f"the state dict cannot be saved with safetensors: {exc}") from exc
        fresh = _built(cls, case, seed=SEED + 1).eval()
        try:
            fresh.load_state_dict(safetensors_load(payload), strict=True)
        except RuntimeError as exc:
            raise _error(cls, f"a fresh module does not load the saved state dict: {exc}") from exc
        with torch.no_grad():
            first = list(_tensors(_run(module, cls, case, values)))
            second = list(_tensors(_run(fresh, cls, case, values)))
        if len(first) != len(second) or any(not torch.equal(a, b) for a, b in zip(first, second)):
            raise _error(cls, f"outputs differ after the safetensors round trip on {case.describe()}:"
                              " state that is not in state_dict() (register it as a buffer or parameter)")


def check_recipe_roundtrip(cls: type[Stage]) -> None:
    """The spec written as a recipe table (via TOML text) structures back into an equal spec."""
    spec = make_spec(cls)
    table = {"stage": cls.name, **unstructure(spec)}
    try:
        text = tomli_w.dumps({"slot": table})
    except TypeError as exc:
        raise _error(cls, f"parameters cannot be written to TOML: {exc}") from exc
    params = {k: v for k, v in tomllib.loads(text)["slot"].items() if k != "stage"}
    again, problems = structure(cls, params, "slot", f"stage {cls.name}")
    _fail(cls, [f"its own parameters do not validate: {p.render()}" for p in problems])
    if again != spec:
        raise _error(cls, f"recipe round trip changed the spec: {spec!r} became {again!r} (None values are dropped)")


def check_pair_bytes(cls: type[Stage]) -> None:
    """pair_bytes() gives the scoring engine a positive int (for every case's wired input ports)."""
    values = [wired_pair_bytes(make_spec(cls), text_len=WORDS, image_len=REGIONS, ports=case.inputs)
              for case in cases(cls)] or [make_spec(cls).pair_bytes(text_len=WORDS, image_len=REGIONS)]
    for value in values:
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _error(cls, f"pair_bytes(text_len={WORDS}, image_len={REGIONS}) returned {value!r},"
                              " expected a positive int")


CHECKS: tuple[Callable[[type[Stage]], None], ...] = (
    check_definition,
    check_defaults,
    check_documentation,
    check_ports,
    check_forward,
    check_padding,
    check_region_padding,
    check_safetensors_roundtrip,
    check_recipe_roundtrip,
    check_pair_bytes,
)


def check_stage(cls: type[Stage], *, registry: Any = None) -> None:
    """Run every check on ``cls`` (and, given a registry, that it is registered under its name)."""
    if registry is not None and registry.stages.get(cls.name) is not cls:
        owner = registry.owners.get(cls.name)
        raise AssertionError(f"{cls.name}: not registered under its name"
                             + (f" (the name belongs to plugin {owner!r})" if owner else ""))
    for check in CHECKS:
        check(cls)


def check_scores_match_captions_alone(checkpoint, split_dir, split: str = "test", *, batch_size: int = 3,
                                      atol: float = 1e-5) -> None:
    """The scoring engine's matrix for a trained checkpoint equals each caption scored alone against every image.

    Scoring batches captions (padded to each batch's longest, shortest first) and images in blocks;
    a stage that lets padding, batch composition or block shape leak into a score fails here. For
    plugin tests of whole recipes trained on a tiny dataset.
    """
    import numpy as np

    from itmkit.checkpoint import load_checkpoint
    from itmkit.data.split import open_split
    from itmkit.evaluate import similarity_matrix

    loaded = load_checkpoint(checkpoint)
    model, vocab = loaded.model.eval(), loaded.vocab
    data = open_split(split_dir, split)
    sims, _ = similarity_matrix(model, vocab, data, batch_size=batch_size)
    with torch.no_grad():
        rows = np.arange(data.num_images)
        images = model.encode_images(Regions(torch.as_tensor(data.image_features(rows)),
                                             torch.as_tensor(data.region_lengths(rows))))
        for c in range(data.num_captions):
            ids = torch.tensor([vocab.encode(data.captions[c])])
            alone = model.score(images, model.encode_texts(Tokens(ids, torch.tensor([ids.shape[1]]))))
            torch.testing.assert_close(torch.as_tensor(sims[:, c]), alone[:, 0], rtol=0, atol=atol,
                                       msg=lambda m: f"caption {c} scored in a batch vs alone: {m}")
