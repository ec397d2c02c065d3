"""The fault table of FAULTS.md, written from registry.FAULTS.

    python -m aggregator.simulator.faultdoc          rewrite the table in FAULTS.md
    python -m aggregator.simulator.faultdoc --check  exit 1 if FAULTS.md is out of date

The Python API column is read from the SimulatorService methods themselves, so it cannot
drift either.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Sequence

from .registry import FAULTS, Fault
from .service import SimulatorService

PATH = Path(__file__).with_name("FAULTS.md")
BEGIN = "<!-- fault table: generated from registry.FAULTS by `python -m aggregator.simulator.faultdoc` -->"
END = "<!-- end of fault table -->"
HEADER = (
    "| fault | Python API (`SimulatorService`) | control parameters | random mode | what the client sees |\n"
    "|---|---|---|---|---|"
)


def python_api(fault: Fault) -> str:
    """`method(arg, arg=default)` → returns, from the method's signature."""
    signature = inspect.signature(getattr(SimulatorService, fault.method))
    params = [p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()]
    text = f"`{fault.method}{signature.replace(parameters=params[1:], return_annotation=inspect.Signature.empty)}`"
    returns = signature.return_annotation
    if returns not in ("None", None, inspect.Signature.empty):
        text += f" → `{returns}`"
    return text


def row(fault: Fault) -> str:
    params = ", ".join(p.usage() for p in fault.params) or "—"
    drawn = fault.random_doc if fault.draw is not None else "—"
    cells = [fault.name, python_api(fault), params, drawn, fault.sees]
    # A bare | would end the cell, also inside `code` (e.g. a `tuple[int, int] | None`).
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def table() -> str:
    return "\n".join([BEGIN, HEADER, *(row(fault) for fault in FAULTS), END])


def render(text: str) -> str:
    """`text` (FAULTS.md) with its table replaced by the registry's."""
    before, begin, rest = text.partition(BEGIN)
    _, end, after = rest.partition(END)
    if not begin or not end:
        raise ValueError("FAULTS.md has no generated fault table markers")
    return before + table() + after


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    current = PATH.read_text(encoding="utf-8")
    wanted = render(current)
    if "--check" in args:
        if wanted != current:
            print(f"{PATH} is out of date: run python -m aggregator.simulator.faultdoc", file=sys.stderr)
            return 1
        return 0
    PATH.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
