"""Generation speed of the embedded city: images per second at the default size (128x256).

Measures (1) rendering alone in one process, per domain, and (2) end-to-end generation to disk with
`ensure_city` (render + PNG encode + atomic writes) using all cores of the machine (2 here).
Writes benchmarks/results/generator_speed.json.   Usage: python benchmarks/bench_generator.py [--n 300]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=300, help="images written in the end-to-end measurement")
    p.add_argument("--size", type=int, nargs=2, default=[128, 256])
    a = p.parse_args()
    from dgnb.data.city import DOMAINS, ensure_city, render
    from dgnb.engine.bench import machine_info
    from dgnb.io import atomic_write_json

    size = tuple(a.size)
    render("source_a", "train", 0, size=size)  # warm-up (imports, texture tiles)
    per_domain = {}
    for name in DOMAINS:
        t = time.perf_counter()
        for i in range(40):
            render(name, "train", i, size=size)
        per_domain[name] = round(40 / (time.perf_counter() - t), 1)
    workers = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        ensure_city(tmp, ["source_a"], {"train": a.n}, size=size, progress=False, workers=workers)
        end_to_end = a.n / (time.perf_counter() - t)
    out = {"size": list(size), "cores": workers, "machine": machine_info(),
           "render_one_process_img_per_s": per_domain,
           "generate_to_disk_img_per_s": round(end_to_end, 1), "images_written": a.n}
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "generator_speed.json", out)
    print(f"render, one process (img/s): {per_domain}")
    print(f"generate to disk with {workers} processes: {end_to_end:.1f} img/s ({a.n} images at {size[0]}x{size[1]})")


if __name__ == "__main__":
    main()
