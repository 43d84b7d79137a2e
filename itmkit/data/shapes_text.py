"""Captions of the "shapes" dataset: a small grammar that binds attributes to objects and states relations."""

from __future__ import annotations

import math

import numpy as np

from itmkit.data.shapes_scene import Scene, SceneObject

CAPTIONS_PER_IMAGE = 5
RELATIONAL_PER_IMAGE = 3  # at least this many of the five captions state a relation between two objects

SIZE_WORDS = {"small": ("small", "small", "little", "tiny"), "large": ("large", "big", "big", "large")}
COLOUR_WORDS = {"purple": ("purple", "purple", "violet")}  # other colours are said by their own name
SHAPE_WORDS = {
    "circle": ("circle", "circle", "disc"),
    "cross": ("cross", "cross", "plus sign"),
    "diamond": ("diamond", "diamond", "rhombus"),
}
BACKGROUND_WORDS = {
    "white": ("white",),
    "grey": ("grey", "gray"),
    "beige": ("beige", "cream"),
    "dark": ("dark", "black"),
}
# "a is <phrase> b" for each relation of a to b.
RELATION_PHRASES = {
    "left": ("left of", "to the left of", "on the left of"),
    "right": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over", "higher than"),
    "below": ("below", "under", "beneath", "underneath"),
    "near": ("next to", "near", "beside", "close to"),
}
# "b with a <phrase>" for the same relation seen from b.
WITH_PHRASES = {
    "left": ("to its left", "on its left"),
    "right": ("to its right", "on its right"),
    "above": ("above it", "over it"),
    "below": ("below it", "under it", "beneath it"),
    "near": ("next to it", "beside it", "near it"),
}
# Words that can only come from a spatial relation or location (not "of", "to", "the").
RELATION_WORDS = frozenset(
    ("left", "right", "above", "over", "higher", "below", "under", "beneath", "underneath")
    + ("next", "near", "beside", "close")
)
NUMBERS = ("zero", "one", "two", "three", "four", "five")


def relations(a: SceneObject, b: SceneObject) -> list[str]:
    """The relations that truthfully describe a with respect to b, from their centres."""
    dx, dy = b.cx - a.cx, b.cy - a.cy  # positive dx: a is left of b; image y grows downwards
    found = []
    if dx >= 10 and dx >= 0.75 * abs(dy):
        found.append("left")
    if -dx >= 10 and -dx >= 0.75 * abs(dy):
        found.append("right")
    if dy >= 10 and dy >= 0.75 * abs(dx):
        found.append("above")
    if -dy >= 10 and -dy >= 0.75 * abs(dx):
        found.append("below")
    if math.hypot(dx, dy) <= 1.8 * (a.radius + b.radius) + 6:
        found.append("near")
    return found or ["near"]


def location(obj: SceneObject, scene: Scene) -> tuple[str, ...]:
    """Phrases for where on the canvas an object is, in thirds; none when it sits within 4 px of a third's edge."""
    cells = []
    for value, extent in ((obj.cx, scene.width), (obj.cy, scene.height)):
        if min(abs(value - extent * k / 3) for k in (1, 2)) < 4:
            return ()
        cells.append(min(int(3 * value / extent), 2))
    col, row = cells
    vertical = ("top", "middle", "bottom")[row]
    horizontal = ("left", "middle", "right")[col]
    if row == col == 1:
        return ("in the middle", "in the center")
    if row == 1:
        return (f"on the {horizontal}", f"on the {horizontal} side")
    if col == 1:
        return (f"at the {vertical}", f"near the {vertical}")
    return (f"in the {vertical} {horizontal} corner", f"at the {vertical} {horizontal}")


def captions_for(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Five distinct captions of a scene: at least three state relations, the rest count, group or locate."""
    relational = [_relation, _there_is, _is_relation, _with, _chain, _two_pairs, _on_background]
    others = [_count_list, _group, _locations, _relation]
    plans = [relational] * RELATIONAL_PER_IMAGE + [others] * (CAPTIONS_PER_IMAGE - RELATIONAL_PER_IMAGE)
    cores: list[str] = []
    for templates in plans:
        # Templates return None when the scene cannot support them; synonyms make a fresh caption easy to find.
        for _ in range(100):
            core = templates[int(rng.integers(len(templates)))](scene, rng)
            if core is not None and core not in cores:
                cores.append(core)
                break
        else:
            raise RuntimeError(f"no new caption found for {scene!r}")
    return [_finish(core, rng) for core in cores]


def _finish(core: str, rng: np.random.Generator) -> str:
    """Flickr30K-like surface: sometimes capitalised, ending in " .", "." or nothing."""
    if rng.random() < 0.25:
        core = core[0].upper() + core[1:]
    return core + str(rng.choice([" .", ".", ""], p=[0.45, 0.15, 0.4]))


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    """One of the options, uniformly."""
    return options[int(rng.integers(len(options)))]


def _with_article(phrase: str) -> str:
    """'a' or 'an' before a phrase."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun_phrase(obj: SceneObject, rng: np.random.Generator) -> str:
    """'a (size) colour shape', now and then without the size, the colour or the shape's name."""
    words = []
    if rng.random() < 0.45:
        words.append(_pick(rng, SIZE_WORDS[obj.size]))
    r = rng.random()
    if r >= 0.06:
        words.append(_pick(rng, COLOUR_WORDS.get(obj.colour, (obj.colour,))))
    words.append(_pick(rng, ("shape", "object")) if r >= 0.94 else _pick(rng, SHAPE_WORDS.get(obj.shape, (obj.shape,))))
    return _with_article(" ".join(words))


def _plural(noun: str) -> str:
    """English plural of a shape noun."""
    return noun + ("es" if noun.endswith(("s", "x")) else "s")


def _objects(scene: Scene, rng: np.random.Generator, k: int) -> list[SceneObject] | None:
    """k distinct objects in random order, or None if the scene has fewer."""
    if len(scene.objects) < k:
        return None
    return [scene.objects[int(i)] for i in rng.permutation(len(scene.objects))[:k]]


def _relation_of(a: SceneObject, b: SceneObject, rng: np.random.Generator) -> str:
    """A true relation of a to b, preferring a direction over plain nearness."""
    found = relations(a, b)
    directions = [r for r in found if r != "near"]
    if directions and (len(directions) == len(found) or rng.random() < 0.8):
        return _pick(rng, tuple(directions))
    return "near"


def _related(a: SceneObject, b: SceneObject, rng: np.random.Generator) -> str:
    """'<a> <relation> <b>'."""
    phrase = _pick(rng, RELATION_PHRASES[_relation_of(a, b, rng)])
    return f"{_noun_phrase(a, rng)} {phrase} {_noun_phrase(b, rng)}"


def _relation(scene: Scene, rng: np.random.Generator) -> str | None:
    """'a small red circle left of a blue square'."""
    a, b = _objects(scene, rng, 2)
    return _related(a, b, rng)


def _there_is(scene: Scene, rng: np.random.Generator) -> str | None:
    """'there is a large green triangle above a yellow star'."""
    a, b = _objects(scene, rng, 2)
    leads = ("there is", "there's", "we can see", "you can see", "an image of", "a picture of", "a drawing of")
    lead = _pick(rng, leads)
    return f"{lead} {_related(a, b, rng)}"


def _is_relation(scene: Scene, rng: np.random.Generator) -> str | None:
    """'a blue square is to the right of a little red circle'."""
    a, b = _objects(scene, rng, 2)
    verb = _pick(rng, ("is", "is", "sits", "is placed", "is drawn"))
    phrase = _pick(rng, RELATION_PHRASES[_relation_of(a, b, rng)])
    return f"{_noun_phrase(a, rng)} {verb} {phrase} {_noun_phrase(b, rng)}"


def _with(scene: Scene, rng: np.random.Generator) -> str | None:
    """'a blue square with a red circle to its left'."""
    a, b = _objects(scene, rng, 2)
    phrase = _pick(rng, WITH_PHRASES[_relation_of(a, b, rng)])
    return f"{_noun_phrase(b, rng)} with {_noun_phrase(a, rng)} {phrase}"


def _chain(scene: Scene, rng: np.random.Generator) -> str | None:
    """'a red circle left of a blue square and above a green star'."""
    picked = _objects(scene, rng, 3)
    if picked is None:
        return None
    a, b, c = picked
    second = _pick(rng, RELATION_PHRASES[_relation_of(a, c, rng)])
    return f"{_related(a, b, rng)} and {second} {_noun_phrase(c, rng)}"


def _two_pairs(scene: Scene, rng: np.random.Generator) -> str | None:
    """'a red circle above a blue square and a pink star next to a cross'."""
    picked = _objects(scene, rng, 4)
    if picked is None:
        return None
    a, b, c, d = picked
    return f"{_related(a, b, rng)} and {_related(c, d, rng)}"


def _on_background(scene: Scene, rng: np.random.Generator) -> str | None:
    """'a red circle below a brown diamond on a white background'."""
    a, b = _objects(scene, rng, 2)
    background = _pick(rng, BACKGROUND_WORDS[scene.background])
    return f"{_related(a, b, rng)} on a {background} background"


def _count_list(scene: Scene, rng: np.random.Generator) -> str | None:
    """'three shapes: a red circle, a blue square and a star', or two of many with a relation."""
    n = len(scene.objects)
    noun = _pick(rng, ("shapes", "objects", "figures"))
    if n > 3:
        lead = _pick(rng, (f"{NUMBERS[n]} {noun}", f"a group of {NUMBERS[n]} {noun}"))
        return f"{lead} including {_related(*_objects(scene, rng, 2), rng)}"
    phrases = [_noun_phrase(o, rng) for o in _objects(scene, rng, n)]
    listed = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{NUMBERS[n]} {noun}: {listed}"


def _group(scene: Scene, rng: np.random.Generator) -> str | None:
    """'two triangles, one red and one green' or 'two red shapes: a circle and a star'; short ones get more."""
    grouped = _counted_group(scene, rng)
    if grouped is None:
        return None
    text, members = grouped
    if len(text.split()) >= 5:
        return text
    outside = [o for o in scene.objects if all(o is not m for m in members)]
    if outside and rng.random() < 0.6:
        return f"{text} and {_noun_phrase(outside[int(rng.integers(len(outside)))], rng)}"
    return f"{text} on a {_pick(rng, BACKGROUND_WORDS[scene.background])} background"


def _counted_group(scene: Scene, rng: np.random.Generator) -> tuple[str, list[SceneObject]] | None:
    """Objects sharing a shape or a colour, counted, with those objects; None when no two share either."""
    by_shape = _groups(scene, "shape")
    by_colour = _groups(scene, "colour")
    if not by_shape and not by_colour:
        return None
    if by_shape and (not by_colour or rng.random() < 0.5):
        shape, members = by_shape[int(rng.integers(len(by_shape)))]
        noun = _plural(_pick(rng, SHAPE_WORDS.get(shape, (shape,))))
        counts = _counted([o.colour for o in members])
        if len(counts) == 1:
            return f"{NUMBERS[len(members)]} {members[0].colour} {noun}", members
        parts = [f"{NUMBERS[k]} {colour}" for colour, k in counts]
        return f"{NUMBERS[len(members)]} {noun}, " + ", ".join(parts[:-1]) + " and " + parts[-1], members
    colour, members = by_colour[int(rng.integers(len(by_colour)))]
    counts = _counted([o.shape for o in members])
    if len(counts) == 1:
        return f"{NUMBERS[len(members)]} {colour} {_plural(counts[0][0])}", members
    noun = _pick(rng, ("shapes", "objects"))
    parts = [_with_article(shape) if k == 1 else f"{NUMBERS[k]} {_plural(shape)}" for shape, k in counts]
    return f"{NUMBERS[len(members)]} {colour} {noun}: " + ", ".join(parts[:-1]) + " and " + parts[-1], members


def _groups(scene: Scene, attribute: str) -> list[tuple[str, list[SceneObject]]]:
    """Values of an attribute shared by two or more objects, with those objects."""
    values = sorted({getattr(o, attribute) for o in scene.objects})
    members = [(v, [o for o in scene.objects if getattr(o, attribute) == v]) for v in values]
    return [(v, objs) for v, objs in members if len(objs) >= 2]


def _counted(values: list[str]) -> list[tuple[str, int]]:
    """(value, count) pairs, most frequent first, ties in first-seen order."""
    return sorted(((v, values.count(v)) for v in dict.fromkeys(values)), key=lambda vk: -vk[1])


def _locations(scene: Scene, rng: np.random.Generator) -> str | None:
    """'a blue square in the top left corner and a red star at the bottom'."""
    located = [(o, location(o, scene)) for o in scene.objects]
    located = [(o, phrases) for o, phrases in located if phrases]
    if not located:
        return None
    order = rng.permutation(len(located))
    a, where_a = located[int(order[0])]
    first = f"{_noun_phrase(a, rng)} {_pick(rng, where_a)}"
    if len(located) == 1 or rng.random() < 0.3:
        return first
    b, where_b = located[int(order[1])]
    if where_b == where_a:
        return first
    return f"{first} and {_noun_phrase(b, rng)} {_pick(rng, where_b)}"
