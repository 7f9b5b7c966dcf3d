"""Classic input-level backdoor detectors as baselines, behind the :class:`InputDetector` interface.

* :class:`StripDetector` (Gao et al., 2019): superimpose the input on clean images; a triggered
  input keeps producing the same (target) answer, so the model's output entropy stays low.
  Adapted to a generative model: the entropy of each greedy answer token's distribution, averaged
  over the answer and over the blends. Image-level (runs the vision tower and the LLM).
* :class:`SpectralSignatureDetector` (Tran et al., 2018): the squared projection of each input's
  representation on the top singular vector of the centred batch.
* :class:`ActivationClusteringDetector` (Chen et al., 2018): 2-means on the top principal
  components of the batch; inputs in the smaller cluster are suspicious.

SS and AC are batch-level (they need a batch that contains the poisoned inputs) and work on the
suspect projector's outputs, mean-pooled over image tokens (``pool="mean"``) or flattened
(``pool="flat"``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from projlens_defense.detectors.input_level import InputDetector, clean_threshold
from projlens_defense.linalg import svd
from projlens_defense.scan_input import MissingInput, ScanInput

__all__ = ["ActivationClusteringDetector", "SpectralSignatureDetector", "StripDetector"]


class _BatchOutputDetector(InputDetector):
    """A batch-level baseline on the batch's own projector outputs: nothing to calibrate on clean probes."""

    batch_level = True
    needs = ("inputs",)
    pool: str = "mean"

    def calibrate(self, inp: ScanInput) -> _BatchOutputDetector:
        return self

    def outputs(self, inp: ScanInput, features: torch.Tensor | None) -> np.ndarray:
        """The batch's projector outputs, pooled per input (``pool``: mean over tokens or flat)."""
        if features is None:
            raise MissingInput(f"{self.name}: needs vision features of the inputs")
        with torch.no_grad():
            out = inp.projector.forward(features.float())
        if out.ndim == 2:
            out = out[:, None]
        if self.pool == "mean":
            return out.mean(1).double().numpy()
        if self.pool == "flat":
            return out.reshape(out.shape[0], -1).double().numpy()
        raise ValueError(f"unknown pooling {self.pool!r} (mean, flat)")


class SpectralSignatureDetector(_BatchOutputDetector):
    """Squared projection on the top singular vector of the centred batch of projector outputs.

    ``threshold`` is batch-relative: the ``remove_frac`` highest-scoring inputs of a batch are flagged.
    """

    name = "spectral-signatures"

    def __init__(self, pool: str = "mean", remove_frac: float = 0.15) -> None:
        super().__init__()
        self.pool = pool
        self.remove_frac = remove_frac

    def score_inputs(self, inp: ScanInput, features: torch.Tensor | None, images: Sequence[np.ndarray] | None = None,
                     questions: Sequence[str] | None = None) -> np.ndarray:
        r = self.outputs(inp, features)
        r = r - r.mean(0)
        top = svd(r)[2][:, 0].numpy()
        scores = (r @ top) ** 2
        self.threshold = float(np.quantile(scores, 1 - self.remove_frac)) if len(scores) else None
        return scores


class ActivationClusteringDetector(_BatchOutputDetector):
    """2-means on the batch's top ``n_components`` principal components of projector outputs.

    Score: distance to the larger cluster's centre minus distance to the smaller one's (higher =
    closer to the small cluster); an input is flagged when it sits in the smaller cluster and that
    cluster holds at most ``max_size`` of the batch (the relative-size rule of the paper).
    """

    name = "activation-clustering"

    def __init__(self, pool: str = "mean", n_components: int = 10, max_size: float = 0.35, seed: int = 0) -> None:
        super().__init__()
        self.pool = pool
        self.n_components = n_components
        self.max_size = max_size
        self.seed = seed
        self._flag_mask: np.ndarray | None = None

    def score_inputs(self, inp: ScanInput, features: torch.Tensor | None, images: Sequence[np.ndarray] | None = None,
                     questions: Sequence[str] | None = None) -> np.ndarray:
        from sklearn.cluster import KMeans
        from sklearn.decomposition import PCA

        r = self.outputs(inp, features)
        n_comp = max(1, min(self.n_components, r.shape[0] - 1, r.shape[1]))
        z = PCA(n_components=n_comp, random_state=self.seed).fit_transform(r)
        km = KMeans(n_clusters=2, n_init=10, random_state=self.seed).fit(z)
        sizes = np.bincount(km.labels_, minlength=2)
        small = int(np.argmin(sizes))
        d = np.linalg.norm(z[:, None, :] - km.cluster_centers_[None], axis=2)
        scores = d[:, 1 - small] - d[:, small]
        self._flag_mask = (km.labels_ == small) & (sizes[small] / len(z) <= self.max_size)
        self.threshold = 0.0
        return scores

    def flags(self, scores: np.ndarray) -> np.ndarray:
        if self._flag_mask is None or len(self._flag_mask) != len(scores):
            return np.zeros(len(scores), bool)
        return self._flag_mask


class StripDetector(InputDetector):
    """STRIP for a generative VLM: low answer entropy under superimposition means a trigger.

    Each input is blended (``alpha``) with ``n_blends`` random clean probe images; the model answers
    greedily and the entropy of each answer token's next-token distribution is averaged over the
    answer and the blends. Score = minus that entropy. Calibrated on clean probes blended with
    other clean probes.
    """

    name = "strip"
    needs = ("runtime", "probe_images", "input_images")

    def __init__(self, n_blends: int = 8, alpha: float = 0.5, max_new_tokens: int = 8, fpr: float = 0.01,
                 question: str = "What is in the image?", seed: int = 0, batch_size: int = 256) -> None:
        super().__init__(fpr=fpr)
        self.n_blends = n_blends
        self.alpha = alpha
        self.max_new_tokens = max_new_tokens
        self.question = question
        self.seed = seed
        self.batch_size = batch_size
        self.clean_scores: np.ndarray | None = None

    def _runtime(self, inp: ScanInput) -> Any:
        rt = inp.probe_data.runtime
        if rt is None:
            raise MissingInput(f"{self.name}: needs a LlavaRuntime in ScanInput.probe_data.runtime")
        return rt

    @torch.no_grad()
    def _entropy(self, rt: Any, images: Sequence[np.ndarray], questions: Sequence[str]) -> np.ndarray:
        """Mean next-token entropy over each greedy answer (up to EOS) of each image."""
        feats = rt.vision_features(list(images))
        out = np.zeros(len(images))
        for s in range(0, len(images), self.batch_size):
            qs = list(questions[s : s + self.batch_size])
            batch = rt.encode(qs, padding_side="left")
            gen = rt.generate(feats[s : s + self.batch_size], batch, max_new_tokens=self.max_new_tokens,
                              do_sample=False, output_scores=True, return_dict_in_generate=True)
            logp = torch.stack([torch.log_softmax(x.float(), -1) for x in gen.scores], 1)  # [B, steps, V]
            ent = -(logp.exp() * logp).sum(-1)
            toks = gen.sequences[:, -len(gen.scores):]
            alive = torch.ones_like(toks, dtype=torch.bool)
            if rt.eos_id is not None:
                ended = (toks == rt.eos_id).cumsum(1)
                alive = (ended - (toks == rt.eos_id).long()) == 0  # up to and including the first EOS
            out[s : s + len(qs)] = ((ent * alive).sum(1) / alive.sum(1).clamp_min(1)).numpy()
        return out

    def _blend_scores(self, rt: Any, images: Sequence[np.ndarray], pool: Sequence[np.ndarray],
                      questions: Sequence[str], exclude_self: bool) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        blends, qs = [], []
        for i, img in enumerate(images):
            choices = [j for j in range(len(pool)) if not (exclude_self and j == i)] or list(range(len(pool)))
            for j in rng.choice(choices, size=self.n_blends, replace=len(choices) < self.n_blends):
                other = pool[int(j)]
                if other.shape != img.shape:
                    raise MissingInput(f"{self.name}: probe and input images differ in size")
                mix = (1 - self.alpha) * img.astype(np.float32) + self.alpha * other.astype(np.float32)
                blends.append(np.clip(np.rint(mix), 0, 255).astype(np.uint8))
                qs.append(questions[i])
        ent = self._entropy(rt, blends, qs).reshape(len(images), self.n_blends)
        return -ent.mean(1)

    def calibrate(self, inp: ScanInput) -> StripDetector:
        rt = self._runtime(inp)
        if inp.probe_data.probe_images is None:
            raise MissingInput(f"{self.name}: needs the clean probe images in ScanInput.probe_data.probe_images")
        probes = list(inp.probe_data.probe_images)
        qs = inp.probe_data.probe_questions or [self.question] * len(probes)
        self.clean_scores = self._blend_scores(rt, probes, probes, qs, exclude_self=True)
        self.threshold = clean_threshold(self.clean_scores, self.fpr)
        return self

    def score_inputs(self, inp: ScanInput, features: torch.Tensor | None, images: Sequence[np.ndarray] | None = None,
                     questions: Sequence[str] | None = None) -> np.ndarray:
        if not images:
            raise MissingInput(f"{self.name}: needs the input images")
        rt = self._runtime(inp)
        pool = list(inp.probe_data.probe_images or [])
        qs = list(questions) if questions else [self.question] * len(images)
        return self._blend_scores(rt, list(images), pool, qs, exclude_self=False)
