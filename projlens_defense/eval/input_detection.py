"""Input-level detection in the bench: each registered input-level detector, triggered vs clean test inputs.

For one backdoored model, every :class:`~projlens_defense.detectors.input_level.InputDetector` in the
registry is calibrated on the defender's clean probes only (the same <= ``n_clean`` samples the
few-shot mitigations get; no trigger knowledge) and scores the held-out test set: every clean test
image (negatives) and the triggered copies of the eligible ones (positives), i.e. the features the
cell already computed for its ASR. Batch-level detectors (Spectral Signatures, Activation
Clustering) see that whole mixed batch. Image-level detectors that run the LLM (STRIP) score a
seeded subset of ``image_subset`` clean and ``image_subset`` triggered images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from ..metrics import auroc, tpr_at_fpr

FPR_GRID = [0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0]
"""False-positive rates at which each cell stores its ROC (mean curves are drawn from these)."""


def input_detector_names(names: Sequence[str]) -> list[str]:
    """The names among ``names`` whose registered class is an input-level detector."""
    from ..detectors import DETECTORS
    from ..detectors.input_level import InputDetector

    return [n for n in names if n in DETECTORS and issubclass(DETECTORS[n], InputDetector)]


def roc_points(pos: Sequence[float], neg: Sequence[float], grid: Sequence[float] = FPR_GRID) -> list[float]:
    """TPR at each false-positive rate of ``grid`` (thresholds from the negatives, as :func:`tpr_at_fpr`)."""
    return [1.0 if f >= 1.0 else round(tpr_at_fpr(pos, neg, f), 5) for f in grid]


def detection_entry(pos: Sequence[float], neg: Sequence[float], threshold: float | None = None) -> dict[str, Any]:
    """AUROC, TPR at 1% / 5% FPR (oracle thresholds on these negatives), the ROC on :data:`FPR_GRID`
    and, for a probe-calibrated ``threshold``, the TPR / FPR it gives on these inputs."""
    out: dict[str, Any] = {"n_clean": len(neg), "n_triggered": len(pos), "auroc": auroc(pos, neg),
                           "tpr@1%fpr": tpr_at_fpr(pos, neg, 0.01), "tpr@5%fpr": tpr_at_fpr(pos, neg, 0.05),
                           "roc_tpr": roc_points(pos, neg)}
    if threshold is not None and np.isfinite(threshold):
        out["threshold_tpr"] = float((np.asarray(pos) > threshold).mean()) if len(pos) else float("nan")
        out["threshold_fpr"] = float((np.asarray(neg) > threshold).mean()) if len(neg) else float("nan")
    return out


def run_input_detectors(runtime: Any, suspect: Any, reference: Any, names: Sequence[str], *, samples: Sequence[Any],
                        clean_features: torch.Tensor, eligible: Sequence[int], triggered_features: torch.Tensor,
                        variant: Any, seed: int, probe_features: torch.Tensor, probe_images: Sequence[np.ndarray],
                        probe_questions: Sequence[str], image_subset: int = 32) -> dict[str, dict[str, Any]]:
    """Score held-out clean vs triggered test inputs with each input-level detector in ``names``.

    ``clean_features`` are those of every test sample, ``triggered_features`` those of the triggered
    eligible ones (test-time trigger seed ``seed + 10_000``, as the ASR uses). Returns one
    :func:`detection_entry` per detector (``input-shift`` also as ``input-shift[reference-free]``), plus
    its wall time in seconds.
    """
    import time

    from ..detectors import DETECTORS
    from ..scan_input import ProbeData, ScanInput

    n_clean = len(clean_features)
    feats = torch.cat([clean_features, triggered_features])
    rng = np.random.default_rng(seed)
    ci = sorted(rng.choice(n_clean, size=min(image_subset, n_clean), replace=False).tolist())
    ti = sorted(rng.choice(len(eligible), size=min(image_subset, len(eligible)), replace=False).tolist())
    base = ProbeData(probes=probe_features, probe_images=list(probe_images),
                     probe_questions=list(probe_questions), runtime=runtime)
    out: dict[str, dict[str, Any]] = {}
    for name in input_detector_names(names):
        cls = DETECTORS[name]
        image_level = "input_images" in cls.needs
        for label, ref in [(name, reference)] + ([(f"{name}[reference-free]", None)] if name == "input-shift" else []):
            t = time.time()
            det = cls()
            if image_level:
                imgs = [samples[i].image for i in ci] + [variant.triggered_image(samples[eligible[j]], seed + 10_000,
                                                                                 eligible[j]) for j in ti]
                qs = [samples[i].question for i in ci] + [samples[eligible[j]].question for j in ti]
                inp = ScanInput(projector=suspect, reference=ref,
                                probe_data=replace(base, input_images=imgs, input_questions=qs))
                det.calibrate(inp)
                s, n_neg = det.score_inputs(inp, None, imgs, qs), len(ci)
            else:
                inp = ScanInput(projector=suspect, reference=ref, probe_data=replace(base, inputs=feats))
                det.calibrate(inp)
                s, n_neg = det.score_inputs(inp, feats), n_clean
            s = np.asarray(s, float)
            thr = None if cls.batch_level else det.threshold
            out[label] = {**detection_entry(s[n_neg:].tolist(), s[:n_neg].tolist(), thr),
                          "seconds": round(time.time() - t, 2)}
    return out
