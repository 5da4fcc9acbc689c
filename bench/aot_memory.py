"""Ahead-of-time decode graphs with and without inductor's memory planning, through the engine, in one process.

    python bench/aot_memory.py [--cases m2:1,m2-int8:1,hybrid:1,mmx-tiny:1,mmx-tiny:16] [--rounds 5]

Each case is MODEL[-int8]:BATCH (models as in bench/compiled_decode.py). Two engines of the case are built, one
with the default (each intermediate buffer of a step allocated on its own) and one with MMX_AOT_MEMORY_PLANNING=1
(one allocation per step), and decode alternately (bench/env_ab.py). The figure is the median decode step time
(prefill excluded).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from env_ab import compare, parser

if __name__ == "__main__":
    args = parser(__doc__, "m2:1,m2-int8:1,hybrid:1,mmx-tiny:1,mmx-tiny:16").parse_args()
    compare(args, "MMX_AOT_MEMORY_PLANNING", {"one allocation each": "0", "one allocation per step": "1"})
