"""Box AP by the official COCO evaluation (``pycocotools.cocoeval.COCOeval``, ``iouType="bbox"``).

``AP`` is the mean over IoU thresholds 0.50:0.05:0.95 and categories, ``AP50``/``AP75`` at one
threshold, ``APs``/``APm``/``APl`` over objects of area below 32², between 32² and 96², and
above 96² pixels; all in percent, as papers report them (43.7 for 0.437). A metric COCOeval
cannot define on the split (no ground-truth object in that area range: it returns -1) is left
out rather than reported as a number.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def detections_to_coco(image_id: int, boxes: Any, scores: Any, labels: Any, category_ids: list[int]) -> list[dict]:
    """One image's detections (``boxes`` ``[x1, y1, x2, y2]``, labels 1..K) as COCO result
    entries (``bbox`` ``[x, y, width, height]``, the file's category ids)."""
    boxes, scores, labels = boxes.tolist(), scores.tolist(), labels.tolist()
    return [
        {
            "image_id": int(image_id),
            "category_id": category_ids[int(label) - 1],
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "score": float(score),
        }
        for (x1, y1, x2, y2), score, label in zip(boxes, scores, labels)
    ]


def coco_box_ap(coco_gt: Any, results: list[dict], image_ids: list[int]) -> dict[str, float]:
    """The metrics of :data:`METRICS` for ``results`` on the images ``image_ids`` of ``coco_gt``.
    No detections at all score 0 everywhere a metric is defined."""
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            coco_dt = coco_gt.loadRes(results)
            evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
            evaluator.params.imgIds = sorted(image_ids)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
            stats = evaluator.stats[:6]
        else:
            stats = np.array([0.0 if defined else -1.0 for defined in _defined_ranges(coco_gt, image_ids)])
    return {name: 100.0 * float(value) for name, value in zip(METRICS, stats) if value >= 0}


def _defined_ranges(coco_gt: Any, image_ids: list[int]) -> list[bool]:
    """Which of :data:`METRICS` COCOeval defines on these images (some non-crowd object in range)."""
    areas = [a["area"] for a in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=image_ids, iscrowd=False))]
    anything = bool(areas)
    return [
        anything,
        anything,
        anything,
        any(a < 32**2 for a in areas),
        any(32**2 <= a < 96**2 for a in areas),
        any(a >= 96**2 for a in areas),
    ]
