"""Decode steps through the native step (mmx.engine.native_step, ``mmx_decode_rows``), two engines alternating in
one process (bench/env_ab.py); ms a decode step. ``--compare graphs`` (the default): against the compiled graphs
(``MMX_NATIVE_DECODE=0`` and on); ``--compare panels``: reading the weights in the model's own layout against
reading their panel copy (``MMX_WEIGHT_PANELS=0`` and ``1``).

Cases are MODEL[-int8]:BATCH (models as in bench/compiled_decode.py).
"""

from __future__ import annotations

from env_ab import compare, parser

CASES = "m2:1,m2:4,m2:16,m2:32,m2-int8:1,m2-int8:4,m2-int8:16,hybrid:1,hybrid:16,hybrid:32,hybrid-int8:1,hybrid-int8:16"
COMPARISONS = {
    "graphs": ("MMX_NATIVE_DECODE", {"compiled graphs": "0", "native step": "1"}),
    "panels": ("MMX_WEIGHT_PANELS", {"model's layout": "0", "panels": "1"}),
}


def main() -> None:
    p = parser(__doc__, CASES)
    p.add_argument("--compare", choices=sorted(COMPARISONS), default="graphs")
    args = p.parse_args()
    compare(args, *COMPARISONS[args.compare])


if __name__ == "__main__":
    main()
