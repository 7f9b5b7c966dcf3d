"""The logit-lens context data-free mitigations read: a checkpoint's ScanInput with the LLM read-out, and the
scan calibration that matches its model."""

from __future__ import annotations

import os

from projlens_defense.detectors.calibration import Calibration, calibration_for, load_calibration
from projlens_defense.detectors.loading import load_checkpoint
from projlens_defense.errors import CheckpointError
from projlens_defense.projector import Projector
from projlens_defense.scan_input import ScanInput

__all__ = ["lens_context"]


def lens_context(checkpoint: str | os.PathLike[str], reference: Projector | None,
                 warnings: list[str] | None = None,
                 calibration: str | os.PathLike[str] | None = None,
                 ) -> tuple[ScanInput | None, Calibration | None]:
    """(ScanInput with the LLM read-out, scan calibration matching this model or None); (None, None) when
    the checkpoint holds no LLM weights. ``calibration``: a calibration file (default: the cached
    self-generated calibration of this model's reference). Problems are appended to ``warnings``."""
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
