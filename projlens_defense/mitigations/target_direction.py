"""`target-direction`: project the target-aligned direction out of the projector's output space.

The direction is the one in the LLM's input space along which image tokens push the answer towards
the backdoor target (ProjLens finding 2), restricted to the span of the update's top-``k`` output
directions when a reference is known:

* with clean samples: the gradient, w.r.t. the projector outputs, of the likelihood of the target
  answers that a synthesized trigger (:mod:`~projlens_defense.mitigations.probe`) revealed;
* data-free: the logit lens; the direction that most raises the lens logit of the target tokens
  (``target_text``, or else the token that the sharpest significant top direction of the update
  reads, gated as in ``subspace``'s data-free mode).

The update's component along the direction is removed (``W2 -= t t^T dW2``, same for the bias);
without a reference the whole output component is (``W2 = (I - t t^T) W2``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from projlens_defense.linalg import svd
from projlens_defense.mitigations.base import CleanData, MitigationInputError, MitigationResult
from projlens_defense.mitigations.lens import LensGuidedMitigation
from projlens_defense.mitigations.probe import best_probe, target_batch
from projlens_defense.mitigations.subspace import component_novelty, lens_peaks, lens_threshold
from projlens_defense.projector import Projector, ProjectorModule
from projlens_defense.tokens import token_name


def project_out(proj: Projector, directions: torch.Tensor, reference: Projector | None) -> Projector:
    """Remove the span of ``directions`` [out, r] from the last layer's update (or from its whole output)."""
    q = torch.linalg.qr(directions.float())[0]
    pmat = torch.eye(q.shape[0]) - q @ q.T
    last = proj.layers[-1]
    weights = [layer.weight.clone() for layer in proj.layers]
    biases = [None if layer.bias is None else layer.bias.clone() for layer in proj.layers]
    if reference is None:
        weights[-1] = pmat @ last.weight
        if last.bias is not None:
            biases[-1] = pmat @ last.bias
    else:
        ref = reference.layers[-1]
        weights[-1] = ref.weight + pmat @ (last.weight - ref.weight)
        if last.bias is not None and ref.bias is not None:
            biases[-1] = ref.bias + pmat @ (last.bias - ref.bias)
    return proj.with_weights(weights, biases)


def lens_gradient(lens: Any, tokens: list[int]) -> torch.Tensor:
    """The output direction that most raises the lens logits of ``tokens`` relative to the mean word token.

    Through the first LLM layers' attention OV maps and ``lm_head`` when the checkpoint has them
    (the lens that names targets in the zoo), else by the tokens' input-embedding / ``lm_head`` rows.
    """
    r = lens.readout
    if r is None or (r.lm_head is None and r.embed_tokens is None):
        raise MitigationInputError("the logit lens needs the LLM's embeddings or lm_head in the checkpoint")
    head = r.lm_head if r.lm_head is not None else r.embed_tokens
    mask = lens.word_mask(head.shape[0])
    rows = head[tokens].float() - head[mask].float().mean(0, keepdim=True)
    if not lens.ov_layers:
        return (rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)).sum(0)
    w = torch.zeros(head.shape[1], 1, requires_grad=True)
    y = sum(layer.apply(w) for layer in lens.ov_layers)
    assert isinstance(y, torch.Tensor)
    if lens.final_norm is not None:
        y = y * lens.final_norm.float()[:, None]
    (rows.sum(0) @ y).sum().backward()
    assert w.grad is not None
    return w.grad[:, 0].detach()


class _Fixed(nn.Module):
    def __init__(self, y: torch.Tensor) -> None:
        super().__init__()
        self.y = y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.y


@dataclass(eq=False)
class TargetDirectionMitigation(LensGuidedMitigation):
    """Remove the update's component along the target-aligned output direction."""

    name = "target-direction"
    uses_lens = True
    uses_clean = True
    summary = "project the target-aligned direction out of the projector's output space"

    target_text: str | None = None
    k: int = 8
    lens_sigma: float = 1.25
    min_novelty: float = 2.5
    n_random: int = 256
    eps: float = 0.5
    probe_steps: int = 30
    min_support: float = 0.25
    seed: int = 0

    def apply(self, suspect: Projector, reference: Projector | None = None,
              clean: CleanData | None = None) -> MitigationResult:
        basis = None
        if reference is not None:
            u, _, _ = svd(suspect.delta(reference)[-1])
            basis = u[:, : self.k]
        if clean is not None and not self.target_text:
            direction, report = self._from_probe(suspect, clean)
        elif self.lens is not None:
            direction, report = self._from_lens(basis)
        else:
            raise MitigationInputError("target-direction needs clean samples (`clean_data`) or the LLM weights "
                                       "in the checkpoint (for the logit lens)")
        if direction is None:
            report["outcome"] = "no target found: projector unchanged"
            return self.result(suspect, suspect.with_weights([layer.weight for layer in suspect.layers]), reference, report)
        if basis is not None:
            direction = basis @ (basis.T @ direction)
        direction = direction / direction.norm().clamp_min(1e-12)
        new = project_out(suspect, direction[:, None], reference)
        report.update({"rank": 1, "restricted_to_update_top_k": basis is not None})
        if reference is not None:
            upd = suspect.delta(reference)[-1]
            share = float((direction @ upd).pow(2).sum()) / float(upd.pow(2).sum().clamp_min(1e-12))
            report["energy_removed"] = {suspect.layer_name(suspect.num_layers - 1): round(share, 6)}
        return self.result(suspect, new, reference, report)

    def _from_probe(self, suspect: Projector, clean: CleanData) -> tuple[torch.Tensor | None, dict[str, Any]]:
        module = ProjectorModule(suspect)
        probe = best_probe(clean, module, self.eps, self.probe_steps, self.seed, cache_key=f"suspect:{id(suspect)}")
        report: dict[str, Any] = {"mode": "few-shot", "source": "probe gradient", "probe": probe.to_dict()}
        if not probe.found(self.min_support):
            return None, report
        idx, tb, _ = target_batch(clean, probe)
        with torch.no_grad():
            y = module(clean.features[idx])
        y.requires_grad_(True)
        rt = clean.runtime
        for q in rt.model.parameters():
            q.requires_grad_(False)
        rt.loss(clean.features[idx], tb, projector=_Fixed(y)).backward()
        assert y.grad is not None
        return -y.grad.reshape(-1, y.shape[-1]).sum(0), report

    def _from_lens(self, basis: torch.Tensor | None) -> tuple[torch.Tensor | None, dict[str, Any]]:
        lens = self.lens
        vocab = getattr(lens, "vocab", None)
        if self.target_text:
            tokens = self._tokens(self.target_text, vocab)
            source = "target text"
        else:
            if basis is None:
                raise MitigationInputError("target-direction without clean samples or a target text needs a reference")
            peaks, toks = lens_peaks(lens, basis)
            thr, _, _ = lens_threshold(lens, basis.shape[0], self.n_random, self.lens_sigma, self.seed)
            novelty = component_novelty(lens, basis, self.calibration)
            ok = [i for i in range(len(peaks)) if float(peaks[i]) >= thr
                  and (novelty is None or novelty[i] >= self.min_novelty)]
            best = max(ok or range(len(peaks)), key=lambda i: float(peaks[i]))
            report = {"mode": "data-free", "source": "logit lens", "lens_threshold": round(thr, 3),
                      "best_peak_z": round(float(peaks[best]), 3), "best_token": token_name(vocab, toks[best])}
            if novelty is not None:
                report["best_novelty"] = round(novelty[best], 3)
            if not ok:
                return None, report
            return lens_gradient(lens, [toks[best]]), {**report, "target_tokens": [token_name(vocab, toks[best])]}
        return lens_gradient(lens, tokens), {"mode": "data-free", "source": source,
                                             "target_tokens": [token_name(vocab, t) for t in tokens]}

    @staticmethod
    def _tokens(text: str, vocab: list[str] | None) -> list[int]:
        if not vocab:
            raise MitigationInputError("`target` text needs the checkpoint's tokenizer vocabulary")
        index = {t.lstrip("▁Ġ").lower(): i for i, t in enumerate(vocab) if t}
        toks = [index[w] for w in text.lower().split() if w in index]
        if not toks:
            raise MitigationInputError(f"none of the words of {text!r} is a token of the vocabulary")
        return toks
