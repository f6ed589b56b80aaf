"""The training loop at the speed of its steps: pure step rate against the whole loop, in one run.

- pure step: `method.training_step` + `end_iteration` on batches already built and held in memory
  (what the model costs);
- whole loop: `dgnb.engine.train.fit` as `dgnb train` runs it: the loader (cached decoded images,
  batched augmentation), periodic validation, checkpoints, logging (what a user waits for).

Both use the preset's configuration (quick: 1,200 iterations with validation every 400 and a
checkpoint every 200) and the same number of iterations; the ratio pure/whole is the share of the
loop spent in the steps (1.0 = no overhead). Writes benchmarks/results/loop_rate.json.

Usage: python benchmarks/loop_rate.py [--preset quick] [--method erm] [--iterations N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="quick")
    p.add_argument("--method", default="erm")
    p.add_argument("--iterations", type=int, help="default: the preset's")
    p.add_argument("--out", default=str(RESULTS / "loop_rate.json"))
    a = p.parse_args()

    from dgnb.config import preset
    from dgnb.data.loaders import train_loader
    from dgnb.data.transforms import BatchAugment, eval_transform
    from dgnb.engine.bench import machine_info
    from dgnb.engine.evaluate import SegMetrics
    from dgnb.engine.runs import domain_set, evaluate_domains, make_method, prepare_data
    from dgnb.engine.train import fit, resolve_device
    from dgnb.io import atomic_write_json

    cfg = preset(a.preset, a.method, 0)
    n = a.iterations or cfg.train.iterations
    prepare_data(cfg)
    d, device = cfg.data, resolve_device(cfg.train.device)
    sources = [domain_set(cfg, s, "train", None, i, d.train_limit, d.cache_images) for i, s in enumerate(d.sources)]
    augment = BatchAugment(tuple(d.crop), tuple(d.base_size), tuple(d.scale), d.color_jitter)
    val_sets = {s: domain_set(cfg, s, "val", eval_transform(d.eval_size), limit=d.val_limit, cache=d.cache_images)
                for s in d.sources}

    # pure step: batches built beforehand (the first 50 of the run, cycled)
    batches = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
               for b in train_loader(sources, augment, d.batch_per_domain, cfg.seed, 0, min(50, n), 0, device=device)]
    method = make_method(cfg, device)
    method.train()
    for b in batches[:3]:  # warm-up
        method.training_step(b)
        method.end_iteration()
    method = make_method(cfg, device)
    method.train()
    t0 = time.perf_counter()
    for t in range(n):
        method.training_step(batches[t % len(batches)])
        method.end_iteration()
    pure = time.perf_counter() - t0

    # whole loop, as dgnb train runs it (fresh method, empty run folder)
    method = make_method(cfg, device)

    def make_loader(start: int):
        return train_loader(sources, augment, d.batch_per_domain, cfg.seed, start, n, d.num_workers, device=device)

    def validate(m):
        res = evaluate_domains(m, cfg, d.sources, limit=d.val_limit, datasets=val_sets)
        return {"val_miou": round(SegMetrics(sum(r.confusion for r in res.values())).miou, 2)}

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fit(method, make_loader, n, Path(tmp), validate, cfg.train.eval_every, cfg.train.checkpoint_every,
            cfg.train.log_every, progress=False)
        whole = time.perf_counter() - t0
    out = {"preset": a.preset, "method": a.method, "iterations": n, "machine": machine_info(),
           "pure_step_seconds": round(pure, 2), "whole_loop_seconds": round(whole, 2),
           "pure_step_rate_it_per_s": round(n / pure, 3), "whole_loop_rate_it_per_s": round(n / whole, 3),
           "loop_rate_vs_pure_step": round(pure / whole, 3)}
    atomic_write_json(a.out, out)
    print(out)


if __name__ == "__main__":
    main()
