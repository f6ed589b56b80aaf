"""Evaluation: mIoU from a confusion matrix accumulated over a whole split (not per-image IoU)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from ..data.taxonomy import CLASSES, IGNORE_INDEX, NUM_CLASSES


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """C[i, j] = number of pixels of true class i predicted as j; ignore (255) pixels are skipped."""
    keep = target != IGNORE_INDEX
    idx = target[keep] * num_classes + pred[keep]
    return torch.bincount(idx, minlength=num_classes**2).reshape(num_classes, num_classes).cpu()


def per_image_confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """(B, K, K) confusion matrices, one per image, in one bincount (image index as the leading digit)."""
    b = pred.shape[0]
    keep = target != IGNORE_INDEX
    image = torch.arange(b, device=pred.device).view(b, *[1] * (pred.dim() - 1)).expand_as(pred)
    idx = (image * num_classes + target.clamp(max=num_classes - 1)) * num_classes + pred
    counts = torch.bincount(idx[keep], minlength=b * num_classes**2)
    return counts.reshape(b, num_classes, num_classes).cpu()


@dataclass
class SegMetrics:
    """IoU_c = TP / (TP + FP + FN). mIoU averages over `classes` that appear in the ground truth."""

    confusion: torch.Tensor
    classes: Sequence[int] = field(default_factory=lambda: tuple(range(NUM_CLASSES)))

    @property
    def iou(self) -> torch.Tensor:
        cm = self.confusion.double()
        tp = cm.diag()
        return tp / (cm.sum(0) + cm.sum(1) - tp).clamp(min=1)

    @property
    def present(self) -> list[int]:
        gt = self.confusion.sum(1)
        return [c for c in self.classes if gt[c] > 0]

    @property
    def miou(self) -> float:
        """Mean IoU in percent over the evaluated classes present in the ground truth."""
        present = self.present
        return 100.0 * self.iou[present].mean().item() if present else float("nan")

    @property
    def accuracy(self) -> float:
        return 100.0 * (self.confusion.diag().sum() / self.confusion.sum().clamp(min=1)).item()

    def per_class(self) -> dict[str, float]:
        """Class name -> IoU in percent, for the evaluated classes present in the ground truth."""
        iou = self.iou
        return {CLASSES[c]: round(100.0 * iou[c].item(), 2) for c in self.present}


@torch.no_grad()
def evaluate(predict: Callable[[torch.Tensor], torch.Tensor], loader: Iterable[dict], device: torch.device,
             classes: Sequence[int] | None = None, num_classes: int = NUM_CLASSES) -> SegMetrics:
    """Run `predict` (images in [0,1] -> scores) over `loader` and accumulate the confusion matrix."""
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for batch in loader:
        for group in batch if isinstance(batch, list) else [batch]:  # a list: same-size groups of mixed sizes
            scores = predict(group["image"].to(device))
            cm += confusion_matrix(scores.argmax(1), group["label"].to(device), num_classes)
    return SegMetrics(cm, tuple(classes) if classes is not None else tuple(range(num_classes)))
