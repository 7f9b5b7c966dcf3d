"""How visible each backdoor trigger is to a zoo's frozen vision tower, at the projector's input.

For every variant's trigger, on `--n` training images of each zoo given, measures (reference model, nothing
trained here):

* ``pix``: the trigger's change of the image processor's output (RMS over pixels, in normalised units) divided by
  the RMS change of the raw pixels / the processor's std: 1.0 means the processor passes the trigger through intact;
* ``rel``: mean per-token distance between the projector inputs of triggered and clean images, over the mean
  distance between the projector inputs of two different clean images (how large the trigger's feature change is
  next to ordinary image-to-image variation);
* ``probe``: held-out AUROC of a logistic-regression probe telling triggered from clean projector-input *tokens*
  (the projector acts per token; for Qwen2-VL a token is the merger's row of four ``ln_q``-normalised patches);
* ``probe_img``: the same on the image's mean token.

    python benchmarks/trigger_probe.py ZOO_DIR... [--n 400]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import projlens_defense as pld


def projector_inputs(rt: pld.LlavaRuntime, feats: torch.Tensor, norm: bool = True) -> torch.Tensor:
    """[N, tokens, d]: what the projector's first Linear sees per LLM image token (``norm=False``: without
    the merger's ``ln_q``, the tower's own patch features, four to a row)."""
    merger = rt.projector
    ln = getattr(merger, "ln_q", None)
    if ln is None:
        return feats
    if not norm:
        ln = torch.nn.Identity()
    with torch.no_grad():
        x = ln(feats)
    m = int(rt.merge_size) ** 2
    return x.reshape(x.shape[0], -1, m * x.shape[-1])


def auroc(score: np.ndarray, label: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(label, score))


def probe(x0: np.ndarray, x1: np.ndarray, seed: int = 0) -> float:
    """Held-out AUROC of a linear probe (half the rows to fit, half to test)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    n = min(len(x0), len(x1), 6000)
    x0, x1 = x0[rng.permutation(len(x0))[:n]], x1[rng.permutation(len(x1))[:n]]
    half = n // 2
    xtr = np.concatenate([x0[:half], x1[:half]])
    ytr = np.r_[np.zeros(half), np.ones(half)]
    xte = np.concatenate([x0[half:], x1[half:]])
    yte = np.r_[np.zeros(n - half), np.ones(n - half)]
    sc = StandardScaler().fit(xtr)
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(sc.transform(xtr), ytr)
    return auroc(clf.decision_function(sc.transform(xte)), yte)


def measure(zoo: Path, n: int, variants: list[str], norm: bool = True) -> dict:
    rt = pld.LlavaRuntime.from_pretrained(zoo / "reference")
    samples = pld.load_conversations(zoo / "data" / "train.json")[:n]
    images = [s.image for s in samples]
    f0 = rt.vision_features(images)
    x0 = projector_inputs(rt, f0, norm)
    perm = np.roll(np.arange(len(images)), 1)
    base = float((x0 - x0[perm]).norm(dim=-1).mean())
    pv0 = rt.pixel_values(images).double()
    std = float(np.mean(rt.image_processor.image_std)) * 255.0
    out = {"zoo": str(zoo), "family": type(rt).__name__, "tokens": int(x0.shape[1]), "dim": int(x0.shape[2])}
    for name in variants:
        v = pld.get_variant(name)
        trig = [v.triggered_image(s, 0, i) for i, s in enumerate(samples)]
        raw = np.sqrt(np.mean([(t.astype(np.float64) - im.astype(np.float64)) ** 2 for t, im in
                               zip(trig, images, strict=True)])) / std
        pv = rt.pixel_values(trig).double()
        pix = float(torch.sqrt(((pv - pv0) ** 2).mean())) / raw
        x1 = projector_inputs(rt, rt.vision_features(trig), norm)
        rel = float((x1 - x0).norm(dim=-1).mean()) / base
        a, b = x0.reshape(-1, x0.shape[-1]).numpy(), x1.reshape(-1, x1.shape[-1]).numpy()
        out[name] = {"pix": round(pix, 3), "rel": round(rel, 3), "probe": round(probe(a, b), 3),
                     "probe_img": round(probe(x0.mean(1).numpy(), x1.mean(1).numpy()), 3)}
        print(zoo.name, name, out[name], flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoos", nargs="+", type=Path)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--variants", nargs="*", default=list(pld.VARIANTS))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--no-norm", action="store_true", help="measure before the merger's ln_q")
    args = ap.parse_args()
    torch.manual_seed(0)
    res = [measure(z, args.n, args.variants, not args.no_norm) for z in args.zoos]
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
