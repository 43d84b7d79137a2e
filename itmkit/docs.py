"""Generate the stage reference (docs/recipes.md) from the registry, the same data `itmkit stages` shows."""

from __future__ import annotations

from itmkit.plugins import Registry
from itmkit.stage import KINDS, stage_inputs, stage_outputs, stage_params

HEADER = """# Recipe reference

Generated from the installed plugins by `python docs/generate.py` (the same data as
`itmkit stages`); a test keeps it in step with the code. A recipe slot names a stage by its registered name
(`stage = "core.precomp"`) and sets any of its parameters; everything else takes the default.

"""


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def stage_reference_markdown(registry: Registry, header: str = HEADER) -> str:
    lines = [header.rstrip() + "\n"]
    for kind in KINDS:
        classes = registry.by_kind(kind)
        if not classes:
            continue
        lines.append(f"\n## {kind} stages\n")
        for cls in classes:
            doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
            inputs = ", ".join(f"`{s.describe()}`" for s in stage_inputs(cls))
            outputs = " or ".join(f"`{p.__name__}`" for p in stage_outputs(cls))
            lines.append(f"\n### `{cls.name}`\n")
            lines.append(f"\n{doc}\n")
            lines.append(f"\n- plugin: `{registry.owners[cls.name]}`\n- paper: {cls.paper}\n")
            lines.append(f"- consumes: {inputs}\n- produces: {outputs}\n")
            params = stage_params(cls)
            if params:
                lines.append("\n| parameter | type | default | help |\n|---|---|---|---|\n")
                for p in params:
                    default = "required" if p.required else f"`{p.default!r}`"
                    constraint = p.constraint()
                    help_text = p.help + (f" ({constraint})" if constraint else "")
                    lines.append(f"| `{p.name}` | `{_cell(p.type_name())}` | {_cell(default)} | {_cell(help_text)} |\n")
    return "".join(lines)
