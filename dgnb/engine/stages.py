"""What a multi-stage method gets at a stage boundary (MRNet Stage I -> II, self-training rounds).

The engine calls `method.begin_stage(stage, context)` at the iteration where the stage begins, then writes
a checkpoint (also kept as `stage<k>.pt`: the weights that ended the previous stage) and rebuilds the
loader, which then reads what the new stage asks for (`Method.pseudo_label_root`). The context gives the
*unlabelled* target train split and the run folder (pseudo labels are written under it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..data.folder import SegFolder
from ..data.loaders import eval_loader
from ..data.transforms import eval_transform


@dataclass
class StageContext:
    """`target`: the UDA target's train split without labels; `folder`: the run folder."""

    target: SegFolder
    folder: Path
    batch_size: int = 8
    num_workers: int = 0

    def target_batches(self) -> Iterator[tuple[list[str], torch.Tensor]]:
        """(image ids, images (B, 3, H, W) in [0, 1]) over the whole target train split, in id order."""
        ds = SegFolder(self.target.root, self.target.dataset, self.target.split, transform=eval_transform(),
                       limit=len(self.target), labels=False)
        ids = [s.image.stem for s in ds.samples]
        start = 0
        for batch in eval_loader(ds, self.batch_size, self.num_workers):
            groups = batch if isinstance(batch, list) else [batch]
            for group in groups:
                n = len(group["image"])
                yield ids[start : start + n], group["image"]
                start += n

    def images(self, ids: list[str]) -> list[Path]:
        by_id = {s.image.stem: s.image for s in self.target.samples}
        return [by_id[i] for i in ids]


def stage_checkpoint(stage: int) -> str:
    """File name of the checkpoint written when `stage` began (the weights that ended stage `stage` - 1)."""
    return f"stage{stage}.pt"
