"""Commands about the model families: families."""
from __future__ import annotations

from minigenrecal.models.families import FAMILIES, markdown_table


# -- the command of minigenrecal.models.families ------------------------------------------------------------------------
def add_families_command(sub) -> None:
    """`python -m minigenrecal families --markdown`: the README's family block."""
    f = sub.add_parser("families", help="the VLM families this kit is tested on")
    f.add_argument("--markdown", action="store_true", help="print the README's family block (table and notes)")
    f.set_defaults(fn=lambda a: print(markdown_table() if a.markdown else "\n".join(FAMILIES), end="\n"))
