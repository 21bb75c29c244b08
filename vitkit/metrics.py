"""Top-1/top-5 counts, shared by `vitkit eval` (PyTorch) and `vitkit infer` / `postprocess` (ONNX Runtime, numpy)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class TopKCounts:
    correct1: int
    correct5: int
    total: int
    failed: int = 0  # unreadable images, skipped

    @property
    def top1(self) -> float:
        return self.correct1 / self.total if self.total else 0.0

    @property
    def top5(self) -> float:
        return self.correct5 / self.total if self.total else 0.0

    def as_dict(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "correct1": self.correct1, "correct5": self.correct5,
                "total": self.total, "failed": self.failed}
