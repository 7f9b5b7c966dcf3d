"""The detector interface: what a detector gets (:class:`~projlens_defense.scan_input.ScanInput`) and returns
(:class:`DetectorReport`).

In scikit-learn's spirit: a detector is configured in ``__init__``, may be ``fit`` on benign
examples (most weight-space detectors need nothing and return ``self``), and ``score``-s one
suspect, returning plain data. Higher scores mean more suspicious. A detector that needs
something the input lacks (a reference, the LLM read-out) raises :class:`~projlens_defense.scan_input.MissingInput`; the
scan then records that the detector was skipped instead of failing the checkpoint.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from projlens_defense.jsonsafe import finite
from projlens_defense.params import Configurable
from projlens_defense.scan_input import ScanInput, readout_matrix

__all__ = ["Detector", "DetectorReport"]


@dataclass
class DetectorReport:
    """One detector's verdict material for one checkpoint.

    ``score``: the detector's headline number (higher = more suspicious, uncalibrated);
    ``signals``: named scalar signals, each oriented so that higher = more suspicious (these are
    what a calibration normalises and combines); ``evidence``: anything JSON-serialisable a human
    may want (per-layer numbers, token readings); ``suspected_tokens``: ranked token strings.
    """

    name: str
    score: float
    signals: dict[str, float] = field(default_factory=dict)
    evidence: dict[str, Any] = field(default_factory=dict)
    suspected_tokens: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (NaN/inf become null)."""
        return finite(asdict(self))


class Detector(Configurable, ABC):
    """Abstract base. Subclasses set ``name`` (the registry / CLI name), take every parameter as an explicit
    keyword of ``__init__`` stored under its own name (so ``get_params`` finds them, see
    :class:`~projlens_defense.params.Configurable`), and implement
    :meth:`score`.

    ``requires_reference`` / ``requires_readout`` say what the detector cannot work without; the
    scan skips a detector whose requirements the input does not meet. ``learns``: :meth:`fit` learns
    from benign inputs (a calibration refits it without each benign input before scoring that one);
    its learnt state is what :meth:`get_state` returns and :meth:`set_state` restores (None: no state).
    """

    name: ClassVar[str] = "detector"
    requires_reference: ClassVar[bool] = False
    requires_readout: ClassVar[bool] = False
    learns: ClassVar[bool] = False

    def fit(self, benign: Sequence[ScanInput]) -> Detector:  # noqa: B027 - optional hook
        """Learn from benign examples (only where ``learns``; weight-space detectors need none). Returns self."""
        return self

    def get_state(self) -> dict[str, Any] | None:
        """What :meth:`fit` learnt, as JSON-able data a calibration stores (None: nothing learnt to store)."""
        return None

    def set_state(self, state: dict[str, Any]) -> Detector:
        """Restore :meth:`get_state` output. Returns self."""
        return self

    def can_score(self, inp: ScanInput) -> bool:
        """Whether ``inp`` has what this detector needs."""
        if self.requires_reference and inp.reference is None:
            return False
        return not (self.requires_readout and (inp.readout is None or readout_matrix(inp) is None))

    @abstractmethod
    def score(self, inp: ScanInput) -> DetectorReport:
        """Score one suspect; higher is more suspicious."""

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"
