"""`restore`: reset the projector to the reference (the classic repair; it also undoes the task)."""

from __future__ import annotations

from projlens_defense.mitigations.base import CleanData, Mitigation, MitigationResult
from projlens_defense.projector import Projector


class RestoreMitigation(Mitigation):
    """Replace every projector weight and bias by the reference's."""

    name = "restore"
    requires_reference = True
    summary = "reset the projector to the reference (undoes the downstream fine-tune too)"

    def apply(self, suspect: Projector, reference: Projector | None = None,
              clean: CleanData | None = None) -> MitigationResult:
        self.check(reference, clean)
        assert reference is not None
        suspect.delta(reference)  # shape check with a clear error
        new = suspect.with_weights([layer.weight for layer in reference.layers], [layer.bias for layer in reference.layers])
        return self.result(suspect, new, reference, {"removed": "the whole fine-tune update (all layers, weights and biases)"})
