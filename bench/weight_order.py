"""How fast one sequence's products read their weights, by the order the 16 rows of a block are walked: side by side
(the 16 rows' first 16 floats, then their next 16, ...: 16 streams a row apart) or in order (each row to its end,
then the next: one stream). Weights far larger than the caches, float32 and int8, rows of 256 and 512 columns, as
the one-sequence products read them; GB/s of weights, best of a few passes.

A small C program in a temporary folder, built with the kernels' flags around mmx/ops/decode_rows.c's own row
products (its DEFINE_ROWS, instantiated in both orders).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

from mmx.ops.expert_rows import FLAGS  # the kernels' own compiler flags

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))

PROGRAM = r"""
/* the kernels' own row products (DEFINE_ROWS), instantiated here in both orders */
#include "decode_rows.c"
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

DEFINE_ROWS(f32_side_by_side, float, load_f32, block_f32, 0)
DEFINE_ROWS(f32_in_order, float, load_f32, block_f32, 1)
DEFINE_ROWS(i8_side_by_side, int8_t, load_i8, block_i8, 0)
DEFINE_ROWS(i8_in_order, int8_t, load_i8, block_i8, 1)

int main(int argc, char **argv) {
    int n = atoi(argv[1]), threads = atoi(argv[2]), int8 = atoi(argv[3]), passes = atoi(argv[4]);
    int64_t bytes = (int64_t)atoi(argv[5]) << 20, element = int8 ? 1 : 4, rows = bytes / element / n / 32 * 32;
    void *w = aligned_alloc(64, rows * n * element);
    float *x = aligned_alloc(64, sizeof(float) * n), *out = aligned_alloc(64, sizeof(float) * rows);
    for (int64_t i = 0; i < rows * n; i++) {
        if (int8) ((int8_t *)w)[i] = (int8_t)(i % 7);
        else ((float *)w)[i] = (float)(i % 7) * 0.1f;
    }
    for (int i = 0; i < n; i++) x[i] = 1.0f;
    for (int in_order = 0; in_order < 2; in_order++) {
        double best = 1e9;
        for (int p = 0; p < passes; p++) {
            double t = now();
#pragma omp parallel num_threads(threads)
            {
                int tid = omp_get_thread_num();
                int r0 = (int)(rows / 16 * tid / threads * 16), r1 = (int)(rows / 16 * (tid + 1) / threads * 16);
                const int8_t *w8 = (const int8_t *)w;
                const float *w32 = (const float *)w;
                if (int8) (in_order ? i8_in_order : i8_side_by_side)(w8, x, out + r0, r0, r1, n);
                else (in_order ? f32_in_order : f32_side_by_side)(w32, x, out + r0, r0, r1, n);
            }
            t = now() - t;
            best = t < best ? t : best;
        }
        printf("%s %.1f\n", in_order ? "in order" : "side by side", (double)rows * n * element / best / 1e9);
    }
    return 0;
}
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--passes", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="runs of each case, alternating")
    p.add_argument("--mib", type=int, default=64, help="float32 weights' size (int8: a quarter)")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        source, binary = os.path.join(folder, "order.c"), os.path.join(folder, "order")
        with open(source, "w") as f:
            f.write(PROGRAM)
        subprocess.run(["gcc", *FLAGS, f"-I{ROOT}/mmx/ops", source, "-o", binary, "-lm"], check=True)
        print("| weights | columns | side by side (GB/s) | in order (GB/s) | in order / side by side |")
        print("|---|---|---|---|---|")
        for int8 in (0, 1):
            for n in (256, 512):
                mib = a.mib // 4 if int8 else a.mib
                runs: dict[str, list[float]] = {"side by side": [], "in order": []}
                for _ in range(a.rounds):
                    command = [binary, str(n), str(a.threads), str(int8), str(a.passes), str(mib)]
                    for line in subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines():
                        name, rate = line.rsplit(" ", 1)
                        runs[name].append(float(rate))
                side, order = sorted(runs["side by side"]), sorted(runs["in order"])
                side_m, order_m = side[len(side) // 2], order[len(order) // 2]
                kind = f"int8, {mib} MiB" if int8 else f"float32, {mib} MiB"
                print(f"| {kind} | {n} | {side_m:.1f} | {order_m:.1f} | {order_m / side_m:.2f} |")


if __name__ == "__main__":
    main()
