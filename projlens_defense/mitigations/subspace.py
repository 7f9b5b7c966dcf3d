"""`subspace`: remove the backdoor-critical low-rank part of the fine-tune's update dW (ProjLens finding 1).

Candidates are the top-``k`` singular components ``s_i u_i v_i^T`` of dW per layer. Which of them
are removed (the rank) is chosen automatically:

* **data-free** (weights only), with a calibration that holds the benign **task subspace** (the directions
  benign fine-tunes of this model share, fitted by ``calibrate``): per layer, the update's top component
  outside that subspace is removed when its energy share exceeds what a benign fine-tune's top component
  carries (a prediction bound at ``fpr``); if the calibrated scan still flags the result, further components
  of the last layer go while each lowers its score, and then, the same way, until the scan as `scan` prints it
  (its own rate, cross-check included) calls the result clean: also where nothing exceeded the bound. The task adaptation is kept whole; what a backdoor adds on
  top of it is the dominant low-rank piece outside it (finding 1), also when its target is a task answer.
  (An older calibration with only the task basis: the top ``task_removed_rank`` components of the last
  layer's update outside the top ``task_rank`` task directions.)
  ``outside="all"`` removes the whole update outside the task subspace instead of its top component (lower ASR
  left behind, at a cost in clean accuracy that only the few-shot refit recovers; on 5 default-zoo population
  cells, in-sample: ASR after 0.003-0.040, clean accuracy -4.0 to +0.8 points).
* **data-free** without such a calibration: through the logit lens. A component whose output direction ``u_i``
  reads as one vocabulary token far more sharply than random directions do (peak z-score above
  the random-direction mean by ``lens_sigma`` standard deviations) and carries at least
  ``min_energy`` of the update's energy is target-aligned (finding 2) and removed; with a scan
  calibration (``calibration``), its token must also be novel (``min_novelty``) against the
  benign fine-tunes' readings, so that directions toward the task's own answer words are kept.
  (The thresholds were set on the zoo against benign fine-tunes; see benchmarks/mitigation_table.py.) Without the LLM read-out, the top ``fallback_rank`` components are removed.
* **few-shot** (<= 64 clean samples) with a calibration that holds the task subspace (``few_shot="refit"``, the
  default): when the data-free test finds the update over the benign bound, or the calibrated scan (as `scan`
  prints it, cross-check included) does not call it clean, the *whole* update outside the
  two-sided task subspace is removed in every layer (what a backdoor adds beyond the task adaptation, including
  the low-energy residue one component leaves behind), then the projector is fine-tuned on the clean samples'
  answers (``refit_epochs`` at a time, at ``refit_lr``, until its loss there is within ``refit_fit_factor`` of the
  suspect's, at most ``refit_max_epochs``) to recover the clean accuracy that costs; clean samples carry no
  trigger, so the backdoor is not relearned. (Fine-tuning it toward the suspect's own outputs on the clean
  features instead relearned the backdoor: tried on 5 population cells, rejected.) Nothing over the bound: the
  probe search below (the scan calls it clean, or without a judge), which removes nothing when no fixed-target
  response shows.
* **few-shot** without such a calibration, or with ``few_shot="probe"``: a synthesized universal trigger
  (:mod:`~projlens_defense.mitigations.probe`) reveals whether the projector has a shortcut to a
  fixed target at all; if so, the components are ranked by how much their removal suppresses the
  target under that trigger and added greedily while the clean samples' answers stay unchanged
  (within ``clean_tol``), until the target no longer shows. No target found: nothing is removed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from projlens_defense.lens import DEFAULT_STD_FLOOR, lens_reading, stored_task_basis, token_novelty
from projlens_defense.linalg import top_singular
from projlens_defense.mitigations.base import CleanData, MitigationInputError, MitigationResult
from projlens_defense.mitigations.finetune import FinetuneMitigation, clean_loss, finetune_module, loss_report
from projlens_defense.mitigations.lens import LensGuidedMitigation
from projlens_defense.mitigations.probe import (
    ProbeResult,
    best_probe,
    resynthesize,
    support_under,
    target_batch,
)
from projlens_defense.projector import Projector, ProjectorModule
from projlens_defense.task_subspace import REPAIR_FPR, TaskLayer, fitted_task_subspace, residual_share_test
from projlens_defense.tokens import token_name

Component = tuple[int, int, float, torch.Tensor, torch.Tensor]  # layer, index, sigma, u, v


def top_components(delta: list[torch.Tensor], layers: list[int], k: int) -> list[Component]:
    """The top-``k`` singular components of the update of each layer in ``layers``."""
    out = []
    for li in layers:
        u, s, v = top_singular(delta[li], k)
        for i in range(min(k, len(s))):
            out.append((li, i, float(s[i]), u[:, i].clone(), v[:, i].clone()))
    return out


def outside_task(m: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``m`` less its part inside the two-sided task subspace (output basis ``left`` x input basis ``right``): what
    the data-free repair picks components from."""
    return m - left @ (left.T @ m) @ (right @ right.T)


def remove_components(proj: Projector, comps: list[Component]) -> Projector:
    """``proj`` with each component's rank-1 term subtracted from its layer's weight."""
    weights = [layer.weight.clone().float() for layer in proj.layers]
    for li, _, s, u, v in comps:
        weights[li] -= s * torch.outer(u, v)
    return proj.with_weights(weights)


def lens_peaks(lens: Any, directions: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Per direction: the best token z-score (either sign) under the logit lens, and that token's id."""
    rd = lens_reading(lens, directions, [f"d{i}" for i in range(directions.shape[1])])
    z = torch.maximum(rd.z[:, 0::2], rd.z[:, 1::2])
    best = z.max(dim=0)
    return best.values, [int(t) for t in best.indices]


def lens_threshold(lens: Any, dim: int, n: int, sigma: float, seed: int = 0) -> tuple[float, float, float]:
    """Significance threshold for a direction's lens peak: mean + ``sigma`` std of ``n`` random directions' peaks."""
    g = torch.Generator().manual_seed(seed)
    rnd, _ = lens_peaks(lens, torch.randn(dim, n, generator=g))
    mean, std = float(rnd.mean()), float(rnd.std())
    return mean + sigma * std, mean, std


def task_basis(calibration: Any, width: int, rank: int) -> torch.Tensor | None:
    """The top ``rank`` directions [width, <= rank] of the benign task subspace a scan calibration
    learned (None without one of this width)."""
    state = getattr(calibration, "detector_states", {}).get("logit-lens") if calibration is not None else None
    basis = stored_task_basis(state) if state else None
    return basis[:, :rank] if basis is not None and basis.shape[0] == width and rank > 0 else None


def component_novelty(lens: Any, directions: torch.Tensor, calibration: Any) -> list[float] | None:
    """Per direction: how far its best-read token lies outside the benign fine-tunes' token scores (the
    logit-lens detector's novelty, from a scan calibration); None without a matching calibration."""
    if calibration is None:
        return None
    state = getattr(calibration, "detector_states", {}).get("logit-lens")
    if not state:
        return None
    baseline, floor = state.get("baseline"), float(state.get("std_floor", DEFAULT_STD_FLOOR))
    rd = lens_reading(lens, directions, [f"d{i}" for i in range(directions.shape[1])])
    out = []
    for i in range(directions.shape[1]):
        nov = token_novelty(baseline, floor, torch.maximum(rd.z[:, 2 * i], rd.z[:, 2 * i + 1]))
        if nov is None:
            return None
        out.append(float(nov.max()))
    return out


def _all_components(li: int, m: torch.Tensor, tol: float = 1e-6) -> list[Component]:
    """Every singular component of ``m`` (layer ``li``) above ``tol`` of its largest: their sum is ``m``."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    keep = [i for i in range(len(s)) if float(s[i]) > tol * float(s[0])] if len(s) else []
    return [(li, i, float(s[i]), u[:, i].clone(), vh[i].clone()) for i in keep]


def whole_outside_task(delta: list[torch.Tensor], task: list[TaskLayer]) -> list[Component]:
    """Every component of every layer's update outside its two-sided task subspace: removing them all leaves only
    the task adaptation."""
    return [c for li, (left, right, _) in enumerate(task)
            for c in _all_components(li, outside_task(delta[li].float(), left, right))]


def _extra_note(check: dict[str, Any]) -> str:
    """What the scan-guided steps of a data-free repair removed, for its selection line."""
    own = check.get("self_check", check if not check.get("as_scan") else {})
    parts = [f"{own['removed']} more until the calibrated scan no longer flags it"] if own.get("removed") else []
    if check.get("as_scan") and check.get("removed"):
        parts.append(f"{check['removed']} more until the scan as printed calls it clean")
    return "".join(f", then {p}" for p in parts)


def _describe(c: Component, energy: dict[int, float], proj: Projector) -> dict[str, Any]:
    li, i, s, _, _ = c
    return {"layer": proj.layer_name(li), "component": i, "sigma": round(s, 6),
            "energy": round(s * s / energy[li], 6) if energy[li] > 0 else 0.0}


@dataclass(eq=False)
class SubspaceMitigation(LensGuidedMitigation):
    """Remove the target-aligned top singular components of dW (see the module doc for the two modes)."""

    name = "subspace"
    uses_lens = True
    requires_reference = True
    uses_clean = True
    summary = "remove the backdoor-critical low-rank subspace of dW (rank chosen automatically)"

    k: int = 8
    layers: str = "auto"
    rank: int | str = "auto"
    task_rank: int = 6
    task_removed_rank: int = 1
    lens_sigma: float = 1.25
    min_energy: float = 0.05
    min_novelty: float = 2.5
    n_random: int = 256
    fallback_rank: int = 1
    eps: float = 0.5
    probe_steps: int = 30
    min_support: float = 0.25
    off_support: float = 0.05
    clean_tol: float = 0.03
    verify: bool = True
    seed: int = 0
    fpr: float = REPAIR_FPR
    outside: str = "top"
    few_shot: str = "refit"
    refit_epochs: float = 10.0
    refit_lr: float = 3e-4
    refit_max_epochs: float = 40.0
    refit_fit_factor: float = 10.0

    def _layers(self, proj: Projector, few_shot: bool) -> list[int]:
        spec = self.layers
        last = [proj.num_layers - 1]
        if spec == "auto":
            return list(range(proj.num_layers)) if few_shot else last
        return last if spec == "last" else list(range(proj.num_layers))

    def apply(self, suspect: Projector, reference: Projector | None = None,
              clean: CleanData | None = None) -> MitigationResult:
        self.check(reference, clean)
        assert reference is not None
        for name, allowed in (("outside", ("top", "all")), ("few_shot", ("refit", "probe"))):
            if getattr(self, name) not in allowed:
                raise MitigationInputError(f"subspace: {name} must be one of {', '.join(allowed)}, "
                                           f"got {getattr(self, name)!r}")
        if not 0 < float(self.refit_epochs) <= float(self.refit_max_epochs):
            raise MitigationInputError(f"subspace: refit_epochs must be > 0 and <= refit_max_epochs, got "
                                       f"{self.refit_epochs} and {self.refit_max_epochs}")
        delta = suspect.delta(reference)
        energy = {li: float(d.pow(2).sum()) for li, d in enumerate(delta)}
        if self.rank != "auto":
            comps = top_components(delta, [suspect.num_layers - 1], int(self.rank))
            report: dict[str, Any] = {"mode": "fixed-rank"}
        elif clean is not None:
            comps, report = self._few_shot_after_task_removed(suspect, delta, clean)
        else:
            comps, report = self._data_free(suspect, delta)
        new = remove_components(suspect, comps)
        if clean is not None and report.get("refit"):
            new, report["refit"] = self._refit(new, suspect, clean)
        report.update({"removed": [_describe(c, energy, suspect) for c in comps], "rank": len(comps),
                       "energy_removed": {suspect.layer_name(li): round(sum(c[2] ** 2 for c in comps if c[0] == li)
                                                                        / energy[li], 6)
                                          for li in sorted({c[0] for c in comps}) if energy[li] > 0}})
        return self.result(suspect, new, reference, report)

    # ------------------------------------------------------------------ data-free
    def _data_free(self, suspect: Projector, delta: list[torch.Tensor]) -> tuple[list[Component], dict[str, Any]]:
        ts = fitted_task_subspace(self.calibration, delta)
        if ts is not None:
            return self._null_calibrated(suspect, delta, ts)
        basis = task_basis(self.calibration, suspect.out_dim, int(self.task_rank))
        if basis is not None and int(self.task_removed_rank) > 0:
            return self._task_removed(suspect, delta, basis)
        cands = top_components(delta, self._layers(suspect, False), self.k)
        if self.lens is None:
            return cands[: self.fallback_rank], {"mode": "data-free", "selection": "top components (no LLM read-out)"}
        last = [c for c in cands if c[0] == suspect.num_layers - 1]
        peaks, tokens = lens_peaks(self.lens, torch.stack([c[3] for c in last], dim=1))
        thr, rmean, rstd = lens_threshold(self.lens, suspect.out_dim, self.n_random, self.lens_sigma, self.seed)
        vocab = getattr(self.lens, "vocab", None)
        total = float(delta[suspect.num_layers - 1].pow(2).sum())
        novelty = component_novelty(self.lens, torch.stack([c[3] for c in last], dim=1), self.calibration)
        chosen = [c for i, (c, z) in enumerate(zip(last, peaks.tolist(), strict=True))
                  if z >= thr and c[2] ** 2 >= self.min_energy * total
                  and (novelty is None or novelty[i] >= self.min_novelty)]
        readings = [{"component": c[1], "peak_z": round(float(z), 3), "token": token_name(vocab, t),
                     **({"novelty": round(novelty[i], 3)} if novelty is not None else {})}
                    for i, (c, z, t) in enumerate(zip(last, peaks.tolist(), tokens, strict=True))]
        return chosen, {"mode": "data-free", "selection": "logit lens", "lens_threshold": round(thr, 3),
                        "random_peak_mean": round(rmean, 3), "random_peak_std": round(rstd, 3),
                        "components": readings}

    def _null_calibrated(self, suspect: Projector, delta: list[torch.Tensor],
                         task: list[TaskLayer]) -> tuple[list[Component], dict[str, Any]]:
        """Per layer, the update's top component outside the benign task subspace (output side) is removed when
        its energy share exceeds the prediction bound (at ``fpr``, default ``REPAIR_FPR``) of the benign
        fine-tunes' top residual share, so a benign update has everything kept with the probability the FPR
        states. One component per layer: the backdoor is the dominant low-rank piece (finding 1); removing the
        further components that exceed the benign second, third... shares as well (the earlier rule) took 2 to 5
        more points of clean accuracy on the transfer checkpoints for no ASR (seed 2, in-sample for this choice). Where one is not enough, the scan-guided step removes more while the calibrated scan's
        evidence drops, first until the repair's self-check (at ``fpr``) no longer flags it, then until the scan as
        printed (the calibration's rate, cross-checked) calls it clean; each step keeps its removals only if it
        gets there. What is removed is the top component of the update outside the task subspace taken on
        *both* sides (output x input directions), so a backdoor whose target is also a task answer (its output
        direction inside the task subspace, its input direction, the trigger's, outside it) goes too."""
        fpr = float(self.fpr)
        comps: list[Component] = []
        layers = []
        for li, (left, right, _) in enumerate(task):
            m = delta[li].float()
            share, bound, over = residual_share_test(m, task[li], fpr)
            layers.append({"layer": suspect.layer_name(li), "benign_bound": round(bound, 6), "removed": int(over),
                           "residual_share": round(share, 6)})
            if over:
                u, s, v = top_singular(outside_task(m, left, right), 1)
                comps.append((li, 0, float(s[0]), u[:, 0].clone(), v[:, 0].clone()))
        n = len(task[0][2])
        report: dict[str, Any] = {"mode": "data-free", "task_rank": int(task[0][0].shape[1]), "fpr": fpr,
                                  "n_benign": n, "layers": layers}
        extra: list[Component] = []
        if comps and self.outside == "all":
            comps = whole_outside_task(delta, task)
        elif self.judge is not None:
            extra, report["scan_check"] = self._scan_guided(suspect, delta, comps, task)
            printed_extra: list[Component] = []
            if report["scan_check"]["verdict_after"] != "suspicious":  # then: until the scan as printed calls it clean
                printed_extra, printed = self._scan_guided(suspect, delta, comps + extra, task, as_scan=True)
                if printed_extra or not (comps or extra):
                    report["scan_check"] = {**printed, "self_check": report["scan_check"]}
                else:
                    report["printed_check"] = printed
            extra = extra + printed_extra
        if not comps and not extra:
            check = report.get("scan_check", {})
            z = f"z {check.get('score')} > {check.get('threshold')}"
            flag = (f"calls it {check.get('verdict')} ({check.get('reason') or z})" if check.get("as_scan")
                    else f"flags the update ({z})")
            report["selection"] = (
                f"no component outside the benign task subspace exceeds the benign bound at FPR {fpr} in any layer"
                + (": the update looks like a benign fine-tune of this model"
                   if check.get("verdict") not in ("suspicious", "inconclusive")
                   else f"; the calibrated scan {flag}, but removing components outside the task subspace does not "
                        "end that, so no low-rank piece to remove was found"))
            return [], report
        report["selection"] = (f"components above the benign bound (FPR {fpr}, {n} benign fine-tunes) per layer: "
                               + ", ".join(f"{x['layer']} {x['removed']}" for x in layers)
                               + _extra_note(report.get("scan_check", {}))
                               + f"; removed outside the two-sided task subspace (rank {task[0][0].shape[1]})")
        comps = comps + extra
        last = [c for c in comps if c[0] == suspect.num_layers - 1]
        if self.lens is not None and last:
            _, tokens = lens_peaks(self.lens, torch.stack([c[3] for c in last], dim=1))
            report["components"] = [{"component": c[1], "token": token_name(getattr(self.lens, "vocab", None), t)}
                                    for c, t in zip(last, tokens, strict=True)]
        return comps, report

    def _scan_guided(self, suspect: Projector, delta: list[torch.Tensor], comps: list[Component],
                     task: list[TaskLayer], as_scan: bool = False) -> tuple[list[Component], dict[str, Any]]:
        """When the calibrated scan still flags the update after ``comps`` are removed: the last layer's next
        components outside the two-sided task subspace, one at a time (up to ``k``), as long as each lowers the
        scan's score, kept only if the last one ends the flag. A backdoor is a low-rank piece (finding 1) whose
        removal takes the scan's evidence with it; a removal that raises the score is not removing what the
        scan sees (on the default zoo, the one benign fine-tune the scan flags is such a case), so then nothing
        more is removed. Returns the extra components and the scan's scores along the way.

        ``as_scan``: the scan as `scan` prints it (the judge's ``as_scan``), and removal goes on until it calls the
        update `clean`: for an update with nothing over the benign bound that the scan still cannot call clean (a
        1% malicious-injection fine-tune of the micro:2 zoo, which the reference-free cross-check flagged, kept ASR
        0.5 when nothing was removed; its top component outside the task subspace took it to 0.0, in-sample)."""
        assert self.judge is not None
        first = self._verdict(remove_components(suspect, comps), as_scan)
        report: dict[str, Any] = {"verdict": first.verdict, "score": first.score, "threshold": first.threshold,
                                  "removed": 0, "verdict_after": first.verdict,
                                  **({"as_scan": True, "reason": first.reason} if as_scan else {})}
        flagged = ("suspicious", "inconclusive") if as_scan else ("suspicious",)
        if first.verdict not in flagged or first.score is None:
            return [], report
        li = suspect.num_layers - 1
        left, right, _ = task[li]
        m = delta[li].float().clone()
        for c in comps:
            if c[0] == li:
                m -= c[2] * torch.outer(c[3], c[4])
        extra: list[Component] = []
        scores = [first.score]
        for _ in range(int(self.k)):
            u, s, v = top_singular(outside_task(m, left, right), 1)
            if not len(s) or float(s[0]) <= 0.0:
                break
            c = (li, len(comps) + len(extra), float(s[0]), u[:, 0].clone(), v[:, 0].clone())
            res = self._verdict(remove_components(suspect, comps + extra + [c]), as_scan)
            scores.append(res.score)
            if res.score is None or res.score >= scores[-2]:
                break
            m -= c[2] * torch.outer(c[3], c[4])
            extra.append(c)
            if res.verdict not in flagged:
                report.update({"scores": scores, "removed": len(extra), "verdict_after": res.verdict})
                return extra, report
        report["scores"] = scores
        return [], report

    def _task_removed(self, suspect: Projector, delta: list[torch.Tensor],
                      basis: torch.Tensor) -> tuple[list[Component], dict[str, Any]]:
        li = suspect.num_layers - 1
        m = delta[li].float()
        rest = m - basis @ (basis.T @ m)
        u, s, v = top_singular(rest, int(self.task_removed_rank))
        r = min(int(self.task_removed_rank), len(s))
        comps = [(li, i, float(s[i]), u[:, i].clone(), v[:, i].clone()) for i in range(r)]
        total = float(m.pow(2).sum())
        report: dict[str, Any] = {
            "mode": "data-free", "selection": "top component(s) of the last layer's update outside the benign task "
                                              "subspace of the scan calibration",
            "task_rank": int(basis.shape[1]),
            "task_energy": round(1 - float(rest.pow(2).sum()) / total, 6) if total > 0 else 0.0}
        if self.lens is not None and comps:
            _, tokens = lens_peaks(self.lens, torch.stack([c[3] for c in comps], dim=1))
            report["components"] = [{"component": c[1], "token": token_name(getattr(self.lens, "vocab", None), t)}
                                    for c, t in zip(comps, tokens, strict=True)]
        return comps, report

    # ------------------------------------------------------------------ few-shot
    def _few_shot_after_task_removed(self, suspect: Projector, delta: list[torch.Tensor],
                                     clean: CleanData) -> tuple[list[Component], dict[str, Any]]:
        """The data-free task-removed step when the calibration allows it, then the probe-guided
        search on what is left (which removes nothing more when no fixed-target response remains)."""
        ts = fitted_task_subspace(self.calibration, delta)
        basis = task_basis(self.calibration, suspect.out_dim, int(self.task_rank))
        if ts is not None:
            first, head = self._null_calibrated(suspect, delta, ts)
            unbacked = self._scan_not_clean(suspect) if not first and self.few_shot == "refit" else None
            if (first or unbacked) and self.few_shot == "refit":
                comps = whole_outside_task(delta, ts)
                why = head["selection"] if first else unbacked
                return comps, {"mode": "few-shot", "refit": True, "task_removed_step": {**head, "removed": len(first)},
                               **({"scan_verdict": unbacked} if unbacked else {}),
                               "selection": f"{why}; then the whole update outside the two-sided task "
                                            f"subspace (rank {len(comps)}) removed in every layer and the projector "
                                            f"refitted on the {len(clean)} clean samples"}
        elif basis is None or int(self.task_removed_rank) <= 0:
            return self._few_shot(suspect, delta, clean)
        else:
            first, head = self._task_removed(suspect, delta, basis)
        rest = remove_components(suspect, first)
        inherited = self._inherit_probe(suspect, rest, clean) if first else None
        more, report = self._few_shot(rest, [d + e for d, e in zip(delta, rest.delta(suspect), strict=True)], clean,
                                      inherited)
        report["task_removed_step"] = {**head, "removed": len(first)}
        report["selection"] = f"{head['selection']}; then on what is left: {report.get('selection')}"
        return first + more, report

    def _verdict(self, projector: Projector, as_scan: bool) -> Any:
        """The judge's verdict on ``projector``: the repair's self-check, or with ``as_scan`` the scan as printed."""
        assert self.judge is not None
        return self.judge(projector, as_scan=True) if as_scan else self.judge(projector)

    def _scan_not_clean(self, suspect: Projector) -> str | None:
        """Why the scan, as `scan` prints it, does not call ``suspect`` clean (None where it does, or without a
        judge). Few-shot, that is ground for the refit even where no component exceeds the benign bound: the refit
        costs little clean accuracy (it recovers what the removal takes), while a weak backdoor whose components
        all look benign-sized (a 1% malicious-injection fine-tune of the micro:2 zoo, which the reference-free
        cross-check flagged) kept ASR 0.5 when nothing was removed."""
        if self.judge is None:
            return None
        res = self._verdict(suspect, as_scan=True)
        if res.verdict not in ("suspicious", "inconclusive"):
            return None
        detail = res.reason or f"z {res.score} > {res.threshold}"
        return f"nothing exceeds the benign bound, but the calibrated scan calls it {res.verdict} ({detail})"

    def _refit(self, proj: Projector, suspect: Projector, clean: CleanData) -> tuple[Projector, dict[str, Any]]:
        """``proj`` fine-tuned on the clean samples' answers, ``refit_epochs`` at a time, until its loss there is within
        ``refit_fit_factor`` of the suspect's or ``refit_max_epochs`` are spent: recovers the clean accuracy that
        dropping the whole outside-task update costs, also where that update carried much of the task (an update
        shaped to look benign), without training on 64 samples longer than the first round where it already fits
        them about as well as the suspect (longer cost up to 1.75 points there); clean samples carry no trigger, so
        the backdoor is not relearned."""
        bs = FinetuneMitigation.batch_size
        module = ProjectorModule(proj)
        target = clean_loss(ProjectorModule(suspect), clean, bs)
        losses: list[float] = []
        after: list[float] = []
        epochs = 0.0
        while True:
            losses += finetune_module(module, clean, self.refit_epochs, self.refit_lr, bs, self.seed + len(after))
            epochs += self.refit_epochs
            after.append(clean_loss(module, clean, bs))
            fits = after[-1] <= self.refit_fit_factor * target
            if fits or epochs + self.refit_epochs > self.refit_max_epochs + 1e-9:
                break
        return module.to_projector(), {
            "epochs": epochs, "lr": self.refit_lr, **loss_report(losses), "suspect_clean_loss": round(target, 5),
            "clean_loss_after": [round(x, 5) for x in after],
            "stopped": (f"its clean-sample loss is within {self.refit_fit_factor}x the suspect's" if fits
                        else f"at refit_max_epochs {self.refit_max_epochs}")}

    def _inherit_probe(self, suspect: Projector, rest: Projector, clean: CleanData) -> ProbeResult | None:
        """The trigger synthesized on the *unrepaired* projector (where the backdoor is strongest, so its target is
        found), re-optimized against the repaired one: what of the backdoor the data-free step left behind."""
        probe = best_probe(clean, ProjectorModule(suspect), self.eps, self.probe_steps, self.seed,
                           cache_key=f"suspect:{id(suspect)}")
        if not probe.found(self.min_support):
            return None
        assert probe.target is not None
        idx, tb, _ = target_batch(clean, probe)
        module = ProjectorModule(rest)
        d = resynthesize(clean, module, idx, tb, probe.delta, self.eps)
        support = support_under(clean, module, idx, d, probe.target)  # over the samples the target showed on
        return replace(probe, delta=d, support=support)

    def _few_shot(self, suspect: Projector, delta: list[torch.Tensor], clean: CleanData,
                  inherited: ProbeResult | None = None) -> tuple[list[Component], dict[str, Any]]:
        module = ProjectorModule(suspect)
        probe = inherited or best_probe(clean, module, self.eps, self.probe_steps, self.seed,
                                        cache_key=f"suspect:{id(suspect)}")
        report: dict[str, Any] = {"mode": "few-shot", "n_clean": len(clean), "probe": probe.to_dict(),
                                  "probe_source": "unrepaired projector, re-optimized" if inherited else "this projector"}
        stop = 0.0 if inherited is not None else self.off_support  # a leftover backdoor: remove until none shows
        if inherited is not None and probe.support <= stop:
            report["selection"] = (f"the target {probe.target!r} no longer shows under the re-optimized trigger "
                                   f"(support {probe.support:.3f}): nothing more removed")
            return [], report
        if inherited is None and not probe.found(self.min_support):
            report["selection"] = "no fixed-target response found: nothing removed"
            return [], report
        assert probe.target is not None
        idx = probe.showing()
        rt = clean.runtime

        def measure(comps: list[Component]) -> tuple[float, float]:
            m = ProjectorModule(remove_components(suspect, comps))
            sup = support_under(clean, m, idx, probe.delta, probe.target)  # type: ignore[arg-type]
            with torch.no_grad():
                out = rt.answer(clean.features, clean.questions, projector=m)
            agree = sum(a == b for a, b in zip(out, probe.clean_answers, strict=True)) / len(out)
            return sup, agree

        cands = top_components(delta, self._layers(suspect, True), self.k)
        scored = []
        for c in cands:
            sup, agree = measure([c])
            scored.append((sup, -agree, c, agree))
        scored.sort(key=lambda t: (t[0], t[1]))
        chosen: list[Component] = []
        sup_now, agree_now = probe.support, 1.0
        steps = []
        for sup1, _, c, agree1 in scored:
            if agree1 < 1 - self.clean_tol or sup1 >= probe.support:
                continue
            sup, agree = measure(chosen + [c])
            if agree < 1 - self.clean_tol or sup >= sup_now:
                continue
            chosen.append(c)
            sup_now, agree_now = sup, agree
            steps.append({"layer": suspect.layer_name(c[0]), "component": c[1], "support": round(sup, 4),
                          "clean_agreement": round(agree, 4)})
            if sup_now <= stop:
                break
        report.update({"selection": "probe-guided", "steps": steps, "support_after": round(sup_now, 4),
                       "clean_agreement_after": round(agree_now, 4),
                       "candidates": [{"layer": suspect.layer_name(c[0]), "component": c[1], "support": round(s, 4),
                                       "clean_agreement": round(a, 4)} for s, _, c, a in scored]})
        if self.verify and chosen:
            m = ProjectorModule(remove_components(suspect, chosen))
            idx2, tb, _ = target_batch(clean, probe)
            d = resynthesize(clean, m, idx2, tb, probe.delta, self.eps)
            report["verify_support"] = round(support_under(clean, m, idx2, d, probe.target), 4)
        return chosen, report
