"""Parameters as explicit keyword arguments of ``__init__``, found by introspection (scikit-learn's
``get_params``): the one contract detectors and mitigations share for their configuration."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar, TypeVar

from projlens_defense.errors import UsageError

__all__ = ["Configurable"]

T = TypeVar("T", bound="Configurable")


class Configurable:
    """Mixin: every parameter is a keyword of ``__init__`` stored under its own name, so :meth:`get_params`
    finds them and ``type(x)(**x.get_params())`` is an unfitted copy.

    ``inputs``: keywords of ``__init__`` that are inputs, not parameters (e.g. a mitigation's logit-lens
    context); they are neither listed nor checked as parameters.
    """

    name: ClassVar[str] = "configurable"
    inputs: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def _signature(cls) -> list[inspect.Parameter]:
        return [p for p in inspect.signature(cls.__init__).parameters.values()
                if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and p.name not in cls.inputs]

    @classmethod
    def param_names(cls) -> list[str]:
        """The keyword parameters of ``__init__``, in order."""
        return [p.name for p in cls._signature()]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each parameter's default, in order."""
        return {p.name: p.default for p in cls._signature()}

    @classmethod
    def check_params(cls, params: Mapping[str, Any]) -> None:
        """Raise :class:`~projlens_defense.errors.UsageError` naming any key of ``params`` that is no parameter."""
        unknown = set(params) - set(cls.param_names())
        if unknown:
            raise UsageError(f"{cls.name}: unknown parameter(s) {sorted(unknown)}; known: {sorted(cls.param_names())}")

    @classmethod
    def from_params(cls: type[T], params: Mapping[str, Any] | None = None, **inputs: Any) -> T:
        """An instance made with ``params`` (checked first: the CLI's and the harness's ``KEY=VALUE`` values)
        and the ``inputs`` keywords."""
        params = dict(params or {})
        cls.check_params(params)
        return cls(**params, **inputs)

    def get_params(self) -> dict[str, Any]:
        """The parameters this object was made with."""
        return {k: getattr(self, k) for k in self.param_names()}
