"""The base of mitigations that read the logit lens: a :class:`~projlens_defense.scan_input.ScanInput` with the
LLM read-out and a matching scan calibration (:func:`projlens_defense.detectors.lens_context.lens_context`
makes both from a checkpoint)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from projlens_defense.mitigations.base import Mitigation
from projlens_defense.scan_input import ScanInput


@dataclass(eq=False)
class LensGuidedMitigation(Mitigation):
    """A mitigation that can name the target through the logit lens when given the LLM read-out.

    Keyword inputs (not parameters): ``lens``, the ``lens_context`` ScanInput (or None: no LLM weights);
    ``calibration``, the scan calibration that gives benign token novelty for this model (or None); ``judge``,
    the calibrated reference-mode scan of this model as a function of a candidate projector (or None; with
    ``as_scan=True`` the verdict `scan` prints), which a repair may use to check itself (``detectors.scan.repair_judge`` makes one; injected so that mitigations do
    not depend on the scan).
    """

    inputs = ("lens", "calibration", "judge")

    lens: ScanInput | None = field(default=None, kw_only=True, repr=False)
    calibration: Any = field(default=None, kw_only=True, repr=False)
    judge: Callable[..., Any] | None = field(default=None, kw_only=True, repr=False)
