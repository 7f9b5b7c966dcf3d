"""The logit-lens context data-free mitigations read: the detectors' ScanInput and a matching calibration."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from projlens_defense.errors import CheckpointError
from projlens_defense.mitigations.base import Mitigation
from projlens_defense.projector import Projector


class LensGuidedMitigation(Mitigation):
    """A mitigation that can name the target through the logit lens when given the LLM read-out.

    ``lens``: the :func:`lens_context` ScanInput (or None: no LLM weights); ``calibration``: the
    scan calibration that gives benign token novelty for this model (or None); ``judge``: the calibrated
    reference-mode scan of this model as a function of a candidate projector (or None), which a repair
    may use to check itself (``detectors.scan.repair_judge`` makes one; injected so that mitigations do
    not depend on the scan).
    """

    def __init__(self, lens: Any = None, calibration: Any = None, judge: Callable[[Projector], Any] | None = None,
                 **params: Any) -> None:
        super().__init__(**params)
        self.lens = lens
        self.calibration = calibration
        self.judge = judge


def lens_context(checkpoint: str | os.PathLike[str], reference: Projector | None,
                 warnings: list[str] | None = None,
                 calibration: str | os.PathLike[str] | None = None) -> tuple[Any, Any]:
    """(ScanInput with the LLM read-out, scan calibration matching this model or None); (None, None) when
    the checkpoint holds no LLM weights. ``calibration``: a calibration file (default: the cached
    self-generated calibration of this model's reference). Problems are appended to ``warnings``."""
    from projlens_defense.detectors.base import ScanInput
    from projlens_defense.detectors.calibration import calibration_for, load_calibration
    from projlens_defense.detectors.loading import load_checkpoint

    notes = warnings if warnings is not None else []
    try:
        ck = load_checkpoint(checkpoint)
    except CheckpointError as e:
        notes.append(f"logit lens unavailable ({str(e).splitlines()[0]})")
        return None, None
    if not ck.has_readout:
        notes.append("no LLM weights in the checkpoint: no logit lens")
        return None, None
    inp = ScanInput(projector=ck.projector, reference=reference, readout=ck.readout, ov_layers=ck.ov_layers,
                    final_norm=ck.final_norm, vocab=ck.vocab, path=str(checkpoint), format=ck.info.format)
    if calibration is not None:
        cal = load_calibration(calibration)  # the user named it: a bad file is an error, not a fallback
        mismatch = cal.matches(inp)
        if mismatch:
            notes.append(f"{calibration}: fitted for another model ({'; '.join(mismatch)}); not used")
            cal = None
    else:
        try:
            cal = calibration_for(inp) if reference is not None else None
            if cal is not None and cal.matches(inp):
                cal = None
        except CheckpointError as e:  # a damaged cached calibration: say so, decide without it
            notes.append(f"cached calibration unusable ({str(e).splitlines()[0]})")
            cal = None
    if cal is None:
        notes.append("no calibration for this model: lens selection without the benign task subspace "
                     "(make one with `projlens-defense calibrate --reference REF --data CLEAN.json --generate 8`)")
    return inp, cal
