"""Fuzzing `itmkit build` with mutated recipes and --set values: zero tracebacks.

Each case is seeded (case number = seed): it takes one of the files in recipes/, applies a few random
mutations of the kinds users and editors produce (a key deleted or renamed, a value of the wrong
type, NaN, infinity, a huge or negative number, a wrong stage name, a list for a table and the
reverse, deep nesting, Unicode junk, a byte-order mark, Latin-1 bytes, a truncated file) and adds
random --set items (odd values, bad indexes, malformed keys), then runs `itmkit build` in-process
through ``cli.run``, what the console script calls. Every case must end in exit 0 with a stage tree,
or exit 1 with one `error:` line: never a traceback, never an internal error (exit 70).

The data is the tiny built-in dataset of the test session (256-d regions, ~100 words), so a case
that builds a model builds it in a fraction of a second.
"""

from __future__ import annotations

import math
import random
import tomllib
from pathlib import Path
from typing import Any

import attrs
import pytest
import tomli_w

from cliutil import invoke
from itmkit.plugins import get_registry

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "recipes").glob("*.toml"))
CASES = 360

ODD_VALUES: list[Any] = ["text", "", 3, 0, -7, 2.5, -0.0, True, False, [], [1, "a"], [[1, 2], [3]], {},
                         {"stage": "core.mean"}, {"a": {"b": 1}}, "1e3", "core.precomp", "shapes"]
NON_FINITE = [math.nan, math.inf, -math.inf]
# Past every int bound (train.seed's included); nothing a case could build becomes terabytes.
HUGE = [10**12, 2**63, 2**64 + 1, 10**30, -(10**30), 10**400, 1e300, -1e308, 5e-324]
JUNK = ["😀", "\u202eevil", "zero\u200bwidth", "café", "\x00", "\x1b[31m", "a\nb", "\\", "ﬁ", "\ud800", "\U0010ffff", "x" * 5000]
STAGE_NAMES = ["core.nope", "", " core.precomp", "CORE.PRECOMP", "core", "os.system", "..", "core.precomp.x",
               "scan.t2i", "core.triplet", "core.cosine", "core.mean", "gpo.gpo", "sgraf.sgr"]
SET_VALUES = ["nan", "inf", "-inf", "+nan", "1e400", "9" * 30, "-1", "0", "[1,2]", "{a=1}", '"x"', "true", "",
              "💥", "\ufeff1", "[" * 30 + "1" + "]" * 30, "a=b", "2024-01-01", "0x10", "1_000", "'''", '"\\u0000"',
              "[[[", "{", "=", "1.5", "2", "-0", "core.mean", '{stage="core.mean"}', "[{stage='core.mean'}]"]
SET_KEYS = ["match[-1].weight", "match[7].weight", "match[x].weight", "match[0", "match]0[", "..", "", "train.",
            ".train", "image.reasoners[0].stage", "recipe.name.x", "\ufefftrain.lr", "train." + "a." * 50 + "b",
            "match.0.weight", "match[0][0]", "match[0].similarity", "loss", "train", "data.path", "image.encoder",
            "match", "recipe.embed_dim", "train.seed", "text.encoder.stage", "image.pool.stage", "nosection.x",
            "match[99999999999999999999].weight", "match[0].cross.lambda_softmax", "train.epochs.x"]


@attrs.frozen
class Case:
    """One fuzz case: what was done (for the failure message) and what to run."""

    description: str
    recipe: bytes
    sets: tuple[str, ...]


# ------------------------------------------------------------------------ mutations of the table


def nodes(node: Any, path: tuple = ()) -> list[tuple]:
    """Key paths of every value below the root, containers included."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        out.append((*path, key))
        out += nodes(child, (*path, key))
    return out


def get(root: Any, path: tuple) -> Any:
    for key in path:
        root = root[key]
    return root


def put(root: Any, path: tuple, value: Any) -> None:
    get(root, path[:-1])[path[-1]] = value


def pick(rng: random.Random, raw: dict, want=lambda v: True) -> tuple | None:
    paths = [p for p in nodes(raw) if want(get(raw, p))]
    return rng.choice(paths) if paths else None


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def m_delete(rng, raw):
    path = pick(rng, raw)
    if path:
        del get(raw, path[:-1])[path[-1]]
    return f"delete {path}"


def m_swap_type(rng, raw):
    path, value = pick(rng, raw), rng.choice(ODD_VALUES)
    if path:
        put(raw, path, value)
    return f"{path} = {value!r}"


def m_non_finite(rng, raw):
    path, value = pick(rng, raw, is_number) or pick(rng, raw), rng.choice(NON_FINITE)
    if path:
        put(raw, path, value)
    return f"{path} = {value}"


def m_huge(rng, raw):
    path, value = pick(rng, raw, is_number) or pick(rng, raw), rng.choice(HUGE)
    if path:
        put(raw, path, value)
    return f"{path} = {value:.3g}" if isinstance(value, float) else f"{path} = {value.bit_length()}-bit int"


def m_negative(rng, raw):
    path = pick(rng, raw, is_number)
    if path:
        put(raw, path, -abs(get(raw, path)) or -1)
    return f"{path} negated"


def m_scale(rng, raw):
    """A plausible edit (half or double a number): these cases mostly still build."""
    path = pick(rng, raw, is_number)
    if path:
        value = get(raw, path)
        put(raw, path, type(value)(value * rng.choice([0.5, 2])) if value else value)
    return f"{path} scaled"


def m_stage(rng, raw):
    path = pick(rng, raw, lambda v: isinstance(v, dict) and "stage" in v)
    value = rng.choice([*STAGE_NAMES, rng.choice(sorted(get_registry().stages)), ["core.mean"], {"a": 1}, 3, None])
    if path:
        if value is None:
            del get(raw, path)["stage"]
        else:
            get(raw, path)["stage"] = value
    return f"{path}.stage = {value!r}"


def m_list_for_table(rng, raw):
    path = pick(rng, raw, lambda v: isinstance(v, dict))
    if path:
        put(raw, path, rng.choice([[get(raw, path)], [], [get(raw, path), get(raw, path)]]))
    return f"{path} wrapped in a list"


def m_table_for_list(rng, raw):
    path = pick(rng, raw, lambda v: isinstance(v, list))
    if path:
        put(raw, path, {str(i): v for i, v in enumerate(get(raw, path))} or {"x": 1})
    return f"{path} turned into a table"


def m_deep(rng, raw):
    path, depth = pick(rng, raw), rng.choice([5, 15, 17, 40, 120])
    value: Any = 1
    for _ in range(depth):
        value = [value] if rng.random() < 0.7 else {"k": value}
    if path:
        put(raw, path, value)
    return f"{path} nested {depth} deep"


def m_junk(rng, raw):
    path = pick(rng, raw, lambda v: isinstance(v, str)) or pick(rng, raw)
    value = rng.choice(JUNK) + (rng.choice(["", "core.mean", "x"]))
    if path:
        put(raw, path, value)
    return f"{path} = junk {value[:12]!r}"


def m_unknown_key(rng, raw):
    path = pick(rng, raw, lambda v: isinstance(v, dict))
    table = get(raw, path) if path else raw
    key = rng.choice(["weigth", "stages", "lambda", "", " ", "😀", "embed-dim", "Stage", "a.b"])
    table[key] = rng.choice(ODD_VALUES)
    return f"{path} gains key {key!r}"


def m_rename(rng, raw):
    path = pick(rng, raw, lambda v: True)
    if path and isinstance(path[-1], str):
        parent = get(raw, path[:-1])
        parent[path[-1][::-1] or "x"] = parent.pop(path[-1])
    return f"{path} renamed"


def m_branches(rng, raw):
    branches = raw.get("match")
    if isinstance(branches, list) and branches:
        raw["match"] = rng.choice([[], branches * 3, [branches[0], {}], [branches[0], "x"]])
    return "match branches changed"


TABLE_MUTATIONS = [m_delete, m_swap_type, m_non_finite, m_huge, m_negative, m_stage, m_list_for_table,
                   m_table_for_list, m_deep, m_junk, m_unknown_key, m_rename, m_branches, m_scale, m_scale, m_scale]


# ------------------------------------------------------------------------- mutations of the bytes


def t_bom(rng, data):
    return b"\xef\xbb\xbf" + data, "BOM"


def t_latin1(rng, data):
    at = rng.randrange(len(data) + 1)
    return data[:at] + rng.choice([b"\xe9", b"\xff", b"\xc3", b"\x80\x80"]) + data[at:], f"bad byte at {at}"


def t_truncate(rng, data):
    at = rng.randrange(len(data) + 1)
    return data[:at], f"truncated at {at}"


def t_insert(rng, data):
    at = rng.randrange(len(data) + 1)
    piece = rng.choice([b"[", b"]", b"{", b"}", b"=", b'"', b"'", b"#", b"\n", b",", b".", b"\x00", b"[[match]]\n",
                        b"\n[train]\n", b"\r", b"\t", b"\\"])
    return data[:at] + piece + data[at:], f"{piece!r} inserted at {at}"


def t_deep(rng, data):
    depth = rng.choice([100, 1000, 100_000])
    return data + b"\nz = " + b"[" * depth + b"]" * depth + b"\n", f"a list {depth} deep appended"


def t_crlf(rng, data):
    return data.replace(b"\n", b"\r\n"), "CRLF line ends"


def t_utf16(rng, data):
    return data.decode("utf-8", "surrogatepass").encode("utf-16", "surrogatepass"), "UTF-16"


BYTE_MUTATIONS = [t_bom, t_bom, t_crlf, t_latin1, t_truncate, t_insert, t_deep, t_utf16]


# --------------------------------------------------------------------------------- --set items


def random_set(rng: random.Random, raw: dict) -> str:
    roll = rng.random()
    if roll < 0.45:  # a real key of this recipe, written as --set writes it
        path = pick(rng, raw) or ("train",)
        key = ""
        for part in path:
            key += f"[{part}]" if isinstance(part, int) and rng.random() < 0.7 else (f".{part}" if key else str(part))
    else:
        key = rng.choice(SET_KEYS)
    if rng.random() < 0.05:
        return key  # no '='
    return f"{key}={rng.choice(SET_VALUES)}"


# -------------------------------------------------------------------------------------- cases


def make_case(seed: int) -> Case:
    rng = random.Random(seed)
    source = FILES[seed % len(FILES)]  # every file in turn: a random pick can miss one as recipes/ grows
    text = source.read_text()
    steps = [source.name]
    if rng.random() < 0.75:
        raw = tomllib.loads(text)
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            mutation = rng.choice(TABLE_MUTATIONS)
            steps.append(f"{mutation.__name__}: {mutation(rng, raw)}")
        try:
            text = tomli_w.dumps(raw)
        except (TypeError, ValueError, RecursionError) as exc:  # a table tomli_w cannot write: keep it unmutated
            steps.append(f"(tomli_w: {type(exc).__name__}, unmutated)")
    data = text.encode("utf-8", "surrogatepass")
    if rng.random() < 0.3:
        mutation = rng.choice(BYTE_MUTATIONS)
        data, what = mutation(rng, data)
        steps.append(f"{mutation.__name__}: {what}")
    sets = tuple(random_set(rng, tomllib.loads(source.read_text())) for _ in range(rng.choice([0, 0, 1, 1, 2, 3])))
    return Case(" | ".join(steps), data, sets)


@pytest.fixture(scope="module")
def data_dir(tiny_data) -> Path:
    return tiny_data


@pytest.mark.parametrize("seed", range(CASES))
def test_mutated_recipe_builds_or_fails_cleanly(monkeypatch, tmp_path, data_dir, seed):
    case = make_case(seed)
    path = tmp_path / "fuzzed.toml"
    path.write_bytes(case.recipe)
    args = [arg for item in case.sets for arg in ("--set", item)]
    monkeypatch.setenv("ITMKIT_HOME", str(tmp_path / "home"))
    code, out, err = invoke("build", str(path), "--data", str(data_dir), *args)
    where = f"case {seed}: {case.description}; sets {[s[:60] for s in case.sets]}\nstderr: {err[-2000:]}"
    assert "Traceback" not in out + err, where
    assert code in (0, 1), where
    if code == 0:
        assert "total parameters" in out, where
    else:
        assert err.startswith("error:"), where
        assert sum(line.startswith("error:") for line in err.splitlines()) == 1, where
        assert "internal error" not in err, where
    assert not (tmp_path / "home").exists(), where  # nothing generated


def test_the_cases_are_mutations_of_every_recipe_file():
    """The fuzz covers every file in recipes/ and both outcomes are common, so it tests something."""
    cases = [make_case(seed) for seed in range(CASES)]
    assert {c.description.split(" | ")[0] for c in cases} == {f.name for f in FILES}
    assert sum(bool(c.sets) for c in cases) > CASES // 3
    assert sum(" | " in c.description for c in cases) > CASES // 2
