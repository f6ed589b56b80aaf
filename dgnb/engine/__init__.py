from .evaluate import SegMetrics, confusion_matrix, evaluate
from .runs import Run, evaluate_domains, train
from .train import fit

__all__ = ["Run", "SegMetrics", "confusion_matrix", "evaluate", "evaluate_domains", "fit", "train"]
