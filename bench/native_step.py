"""Decode steps through the native step (mmx.engine.native_step, ``mmx_decode_rows``) against the compiled graphs,
two engines alternating in one process (bench/env_ab.py): ``MMX_NATIVE_DECODE=0`` and on; ms a decode step.

Cases are MODEL[-int8]:BATCH (models as in bench/compiled_decode.py).
"""

from __future__ import annotations

from env_ab import compare, parser

CASES = "m2:1,m2:4,m2:16,m2:32,m2-int8:1,m2-int8:4,m2-int8:16,hybrid:1,hybrid:16,hybrid:32,hybrid-int8:1,hybrid-int8:16"


def main() -> None:
    args = parser(__doc__, CASES).parse_args()
    compare(args, "MMX_NATIVE_DECODE", {"compiled graphs": "0", "native step": "1"})


if __name__ == "__main__":
    main()
