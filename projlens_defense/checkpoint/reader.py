"""Format detection and the projector / LM read-out / tokenizer readers.

``detect_format`` looks only at file names and safetensors headers (pickles are loaded with
``weights_only=True``); ``load_projector`` then reads just the projector's tensors.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from projlens_defense.checkpoint.container import (
    CONFIG_NAME,
    INDEX_NAME,
    PICKLE_SUFFIXES,
    SINGLE_NAME,
    TensorContainer,
    inside,
    read_json,
    stat_path,
)
from projlens_defense.errors import CheckpointError, NothingScannableError, UsageError
from projlens_defense.projector import ACTIVATIONS, LinearLayer, Projector

FORMATS = ("hf-llava", "llava-mm-projector", "qwen2-vl-merger", "bare-projector")
MAX_DIR_PICKLE_BYTES = 512 * 1024 * 1024
MAX_TOKENIZER_BYTES = 64 * 1024 * 1024  # the largest real tokenizer.json (Gemma 3) is ~33 MB
MAX_VOCAB = 2_000_000  # real vocabularies: up to ~262k tokens
_LAYER_STEM = re.compile(r"linear_\d+|(mlp\.)?\d+")  # projector Linear stems: linear_N, N, mlp.N
# training-run side files that never hold a projector state dict
_NOT_PROJECTOR_FILES = frozenset({"training_args.bin", "optimizer.pt", "scheduler.pt", "scaler.pt"})

# (format, key prefixes in order of preference, layer style)
_LAYOUTS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("hf-llava", ("model.multi_modal_projector.", "multi_modal_projector."), "linear_n"),
    ("qwen2-vl-merger", ("model.visual.merger.", "visual.merger."), "merger"),
    ("llava-mm-projector", ("model.mm_projector.", "mm_projector."), "sequential"),
    ("bare-projector", ("",), "bare"),
)

EMBED_KEYS = (
    "model.language_model.embed_tokens.weight",
    "language_model.model.embed_tokens.weight",
    "model.embed_tokens.weight",
)
LM_HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight")


@dataclass(eq=False)
class CheckpointInfo:
    """What :func:`detect_format` found.

    ``path``: as given; ``format``: one of FORMATS; ``files``: the files holding projector
    tensors; ``prefix``: the projector key prefix (e.g. ``model.multi_modal_projector.``);
    ``container``: ``safetensors`` / ``sharded-safetensors`` / ``pickle``; ``root``: the checkpoint
    directory when ``path`` is one; ``layer_names``: the layer key stems under ``prefix``
    (``""`` for a single Linear); ``norm_name``: the merger norm stem or None; ``config``: the
    parsed ``config.json`` or None. ``bytes_read`` counts tensor bytes read through this object.
    """

    path: Path
    format: str
    files: list[Path]
    prefix: str
    container: str
    root: Path | None = None
    layer_names: list[str] = field(default_factory=list)
    norm_name: str | None = None
    config: dict[str, Any] | None = None
    tensors: TensorContainer | None = field(default=None, repr=False, compare=False)

    @property
    def bytes_read(self) -> int:
        return self.tensors.bytes_read if self.tensors is not None else 0

    def layer_keys(self) -> list[tuple[str, str]]:
        """(weight key, bias key) candidates per layer; the bias key may be absent."""
        out = []
        for stem in self.layer_names:
            base = f"{self.prefix}{stem}." if stem else self.prefix
            out.append((f"{base}weight", f"{base}bias"))
        return out

    def projector_keys(self) -> list[str]:
        """Every projector tensor key present in the checkpoint."""
        assert self.tensors is not None
        keys = self.tensors.keys()
        cand = [k for pair in self.layer_keys() for k in pair]
        if self.norm_name:
            cand += [f"{self.prefix}{self.norm_name}.weight", f"{self.prefix}{self.norm_name}.bias"]
        return [k for k in cand if k in keys]


# --------------------------------------------------------------------------- classification
def _linear_n(keys: set[str], prefix: str) -> list[str]:
    names, i = [], 1
    while f"{prefix}linear_{i}.weight" in keys:
        names.append(f"linear_{i}")
        i += 1
    return names


def _sequential(keys: set[str], prefix: str) -> list[str]:
    names, i = [], 0
    while f"{prefix}{i}.weight" in keys:
        names.append(str(i))
        i += 2
    return names


def _classify(keys: set[str], where: Path) -> tuple[str, str, list[str], str | None] | None:
    """(format, prefix, layer names, norm name) of the projector keys in ``keys``, or None."""
    found: list[tuple[str, str, list[str], str | None]] = []
    for fmt, prefixes, style in _LAYOUTS:
        for prefix in prefixes:
            if style == "linear_n":
                names = _linear_n(keys, prefix)
                if names:
                    found.append((fmt, prefix, names, None))
            elif style == "merger":
                if f"{prefix}ln_q.weight" in keys or f"{prefix}mlp.0.weight" in keys:
                    found.append((fmt, prefix, _sequential(keys, f"{prefix}mlp."), "ln_q"))
            elif style == "sequential":
                names = _sequential(keys, prefix)
                if names:
                    found.append((fmt, prefix, names, None))
                elif f"{prefix}weight" in keys:
                    found.append((fmt, prefix, [""], None))
            else:  # bare state dict: linear_N.* or Sequential indices at top level
                names = _linear_n(keys, "") or _sequential(keys, "")
                if names:
                    found.append((fmt, "", names, None))
    if not found:
        return None
    if len(found) > 1:
        prefixes = ", ".join(repr(f[1] or "<top level>") for f in found)
        raise CheckpointError(f"{where}: ambiguous: projector keys under several prefixes ({prefixes})")
    fmt, prefix, names, norm = found[0]
    if norm:
        names = [f"mlp.{n}" for n in names]
    return fmt, prefix, names, norm


# --------------------------------------------------------------------------- detection
def _open_file(path: Path, root: Path | None = None) -> TensorContainer:
    """A container for one tensor file, chosen by suffix, else by sniffing the first bytes."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return TensorContainer.from_safetensors(path, root)
    if suffix in PICKLE_SUFFIXES:
        return TensorContainer.from_pickle(path, root)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(2)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    if magic[:2] == b"PK" or magic[:1] == b"\x80":
        return TensorContainer.from_pickle(path, root)
    try:
        return TensorContainer.from_safetensors(path, root)
    except CheckpointError:
        raise NothingScannableError(f"{path}: not a safetensors file or torch pickle") from None


def _config(root: Path | None) -> dict[str, Any] | None:
    if root is None or not os.path.lexists(root / CONFIG_NAME):
        return None
    cfg = read_json(inside(root, CONFIG_NAME))
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{root / CONFIG_NAME}: not a JSON object")
    return cfg


def _main_container(root: Path, names: set[str]) -> TensorContainer | None:
    """The HF model weights of dir ``root`` (sharded index or ``model.safetensors``), if any."""
    c = None
    if INDEX_NAME in names:
        c = TensorContainer.from_index(root)
    elif SINGLE_NAME in names:
        c = TensorContainer.from_safetensors(inside(root, SINGLE_NAME), root)
    if c is not None:
        c.is_main = True
    return c


def _dir_containers(root: Path) -> tuple[list[TensorContainer], list[CheckpointError]]:
    """Candidate containers of a checkpoint dir, most specific first, and fallback files refused.

    HF weights and ``mm_projector.*`` are authoritative (their errors propagate). Otherwise every
    top-level ``.safetensors`` / small torch pickle is a candidate; one that cannot be read is
    set aside with its error, so e.g. a Trainer's ``training_args.bin`` does not stop a scan.
    """
    try:
        names = {e.name for e in os.scandir(root)}
    except OSError as e:
        raise CheckpointError(f"{root}: cannot list directory: {e.strerror or e}") from None
    out: list[TensorContainer] = []
    main = _main_container(root, names)
    if main is not None:
        out.append(main)
    for name in ("mm_projector.safetensors", "mm_projector.bin"):
        if name in names:
            out.append(_open_file(inside(root, name), root))
    if out:
        return out, []
    refused: list[CheckpointError] = []
    for name in sorted(names - _NOT_PROJECTOR_FILES):
        suffix = Path(name).suffix.lower()
        if name.startswith((".", "rng_state")) or (
            suffix != ".safetensors" and suffix not in PICKLE_SUFFIXES
        ):
            continue
        try:
            p = inside(root, name)
            st = stat_path(p)
            if not stat.S_ISREG(st.st_mode) or (
                suffix in PICKLE_SUFFIXES and st.st_size > MAX_DIR_PICKLE_BYTES
            ):
                continue
            out.append(_open_file(p, root))
        except CheckpointError as e:
            refused.append(e)
    return out, refused


def detect_format(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Find the projector in ``path`` (a checkpoint dir or a single file) and name its format.

    Reads only file names, safetensors headers, ``config.json`` and (for pickles) the pickle
    itself with ``weights_only=True``. Raises NothingScannableError when no projector is
    found, CheckpointError when the files are unreadable, corrupt or ambiguous.
    """
    p = Path(path)
    st = stat_path(p)
    refused: list[CheckpointError] = []
    if stat.S_ISDIR(st.st_mode):
        root: Path | None = p
        containers, refused = _dir_containers(p)
    elif stat.S_ISREG(st.st_mode):
        root = None
        containers = [_open_file(p)]
    else:
        raise CheckpointError(f"{p}: not a regular file or directory")

    hits = []
    for c in containers:
        where = c.index_path or c.files[0]
        cls = _classify(c.keys(), where)
        if cls:
            hits.append((c, cls))
    if not hits:
        if len(refused) == 1 and not containers:
            raise refused[0]
        looked = ", ".join(f.name for c in containers for f in c.files[:3]) or "no tensor files"
        skipped = f"; unreadable: {len(refused)} file(s), first: {refused[0]}" if refused else ""
        raise NothingScannableError(f"{p}: no projector weights found (looked at: {looked}){skipped}")
    main_hits = [h for h in hits if h[0].is_main]
    if not main_hits and len(hits) > 1:
        names = ", ".join(c.files[0].name for c, _ in hits)
        raise UsageError(f"{p}: several files hold projector weights ({names}); pass one of them")
    container, (fmt, prefix, names, norm) = (main_hits or hits)[0]
    info = CheckpointInfo(
        path=p,
        format=fmt,
        files=[],
        prefix=prefix,
        container=container.kind,
        root=root,
        layer_names=names,
        norm_name=norm,
        config=_config(root),
        tensors=container,
    )
    info.files = sorted({container.file_of(k) for k in info.projector_keys()})
    return info


def _as_info(path: str | os.PathLike[str] | CheckpointInfo) -> CheckpointInfo:
    return path if isinstance(path, CheckpointInfo) else detect_format(path)


# --------------------------------------------------------------------------- projector
def text_config(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """The LLM's part of a model config: its ``text_config`` when nested (LLaVA, Qwen2-VL), else the config
    itself ({} without one)."""
    cfg = cfg or {}
    tc = cfg.get("text_config")
    return tc if isinstance(tc, dict) else cfg


def _activation(info: CheckpointInfo, n_layers: int) -> str:
    if n_layers == 1:
        return "none"
    cfg = info.config or {}
    if info.format == "hf-llava":
        act = cfg.get("projector_hidden_act", "gelu")
        if not isinstance(act, str) or act not in ACTIVATIONS:
            raise CheckpointError(f"{info.path}: unsupported projector_hidden_act {act!r} in {CONFIG_NAME}")
        return act
    return "gelu"  # LLaVA mlpNx_gelu and the Qwen2-VL merger use nn.GELU()


def _check_mm_projector_type(info: CheckpointInfo, n_layers: int) -> None:
    ptype = (info.config or {}).get("mm_projector_type")
    if info.format != "llava-mm-projector" or not isinstance(ptype, str):
        return
    if ptype == "linear":
        expected = 1
    elif ptype.startswith("mlp") and ptype.endswith("x_gelu") and ptype[3:-6].isdigit():
        expected = int(ptype[3:-6])
    else:
        raise CheckpointError(f"{info.path}: unsupported mm_projector_type {ptype!r}")
    if expected != n_layers:
        raise CheckpointError(
            f"{info.path}: config says mm_projector_type {ptype!r} ({expected} Linear layers) but the "
            f"checkpoint has {n_layers}"
        )


def _float(where: str, key: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` if it holds real floating-point values; integer, bool or complex weights are refused."""
    if not t.is_floating_point():
        raise CheckpointError(f"{where}: {key} must be floating-point, got {str(t.dtype).removeprefix('torch.')}")
    return t


def load_projector(path: str | os.PathLike[str] | CheckpointInfo) -> Projector:
    """Read and validate the projector of a checkpoint (dir, file or a :class:`CheckpointInfo`).

    Only the projector's tensors are read. Weights are float32 copies; original key names and
    dtypes are kept for the writer.
    """
    info = _as_info(path)
    c = info.tensors
    assert c is not None
    keys = c.keys()
    where = str(info.path)
    cfg = info.config or {}
    if info.format == "hf-llava" and len(info.layer_names) != 2:
        missing = f"{info.prefix}linear_{len(info.layer_names) + 1}.weight"
        if len(info.layer_names) < 2:
            raise CheckpointError(f"{where}: missing projector key {missing!r}")
        raise CheckpointError(f"{where}: unexpected extra projector layer {missing[:-7]!r}")
    if info.format == "qwen2-vl-merger":
        for k in (f"{info.prefix}ln_q.weight", f"{info.prefix}mlp.0.weight", f"{info.prefix}mlp.2.weight"):
            if k not in keys:
                raise CheckpointError(f"{where}: missing projector key {k!r}")
    need_bias = info.format == "hf-llava" and cfg.get("multimodal_projector_bias", True) is True

    layers, key_pairs, dtypes = [], [], []
    for wkey, bkey in info.layer_keys():
        w = _float(where, wkey, c.read(wkey))
        b = None
        if bkey in keys:
            b = _float(where, bkey, c.read(bkey))
        elif need_bias:
            raise CheckpointError(f"{where}: missing projector key {bkey!r}")
        if w.ndim != 2:
            raise CheckpointError(f"{where}: {wkey} must be a 2-D weight, got shape {tuple(w.shape)}")
        if w.numel() == 0:
            raise CheckpointError(f"{where}: {wkey} is empty (shape {tuple(w.shape)}): not a projector layer")
        layers.append(
            LinearLayer(w.to(torch.float32, copy=True), None if b is None else b.to(torch.float32, copy=True))
        )
        key_pairs.append((wkey, bkey if b is not None else None))
        dtypes.append((w.dtype, None if b is None else b.dtype))
    # a layer's bias without its weight: a layer was cut off, not a shorter projector
    orphans = sorted(
        k[: -len(".bias")] for k in keys
        if k.endswith(".bias") and k.startswith(info.prefix) and k[: -len(".bias")] + ".weight" not in keys
    )  # fmt: skip
    for stem in (o[len(info.prefix) :] for o in orphans):
        if _LAYER_STEM.fullmatch(stem) and stem not in info.layer_names:
            raise CheckpointError(f"{where}: missing projector key '{info.prefix}{stem}.weight' (its bias is present)")
    _check_mm_projector_type(info, len(layers))

    proj = Projector(
        layers=layers,
        activation=_activation(info, len(layers)),
        keys=key_pairs,
        dtypes=dtypes,
        format=info.format,
        source=where,
    )
    if info.norm_name:
        nw_key, nb_key = f"{info.prefix}{info.norm_name}.weight", f"{info.prefix}{info.norm_name}.bias"
        nw = _float(where, nw_key, c.read(nw_key))
        nb = _float(where, nb_key, c.read(nb_key)) if nb_key in keys else None
        if nw.ndim != 1:
            raise CheckpointError(f"{where}: {nw_key} must be 1-D, got shape {tuple(nw.shape)}")
        merge = Projector.infer_merge_size(int(nw.shape[0]), layers[0].in_features)
        if merge is None:
            raise CheckpointError(
                f"{where}: shapes do not chain: norm width {nw.shape[0]} does not divide "
                f"{info.layer_names[0]} input width {layers[0].in_features} into a square merge"
            )
        vc = cfg.get("vision_config") if isinstance(cfg.get("vision_config"), dict) else {}
        declared = vc.get("spatial_merge_size")
        if isinstance(declared, int) and declared != merge:
            raise CheckpointError(
                f"{where}: config spatial_merge_size {declared} but the weights imply {merge}"
            )
        proj.pre_norm = (
            nw.to(torch.float32, copy=True),
            None if nb is None else nb.to(torch.float32, copy=True),
        )
        proj.pre_norm_type = "layernorm" if nb is not None else "rmsnorm"
        proj.pre_norm_keys = (nw_key, nb_key if nb is not None else None)
        proj.pre_norm_dtypes = (nw.dtype, None if nb is None else nb.dtype)
        proj.merge_size = merge
    return proj.validate()


# --------------------------------------------------------------------------- LM read-out
@dataclass(eq=False)
class LmReadout:
    """The LLM's input embedding [vocab, hidden] and output head, for the logit lens.

    Tensors keep their stored dtype (they can be large); either may be None when absent.
    ``lm_head`` is the embedding itself when the config ties them and no head is stored.
    """

    embed_tokens: torch.Tensor | None
    lm_head: torch.Tensor | None
    embed_key: str | None = None
    lm_head_key: str | None = None
    tied: bool = False


def tied_embeddings(cfg: dict[str, Any] | None) -> bool:
    """Whether the config ties ``lm_head`` to the input embedding (the text config's setting first)."""
    tc = text_config(cfg)
    if "tie_word_embeddings" in tc:
        return tc["tie_word_embeddings"] is True
    return (cfg or {}).get("tie_word_embeddings") is True


def readout_keys(keys: Any) -> tuple[str | None, str | None]:
    """The stored names of the input embedding and of ``lm_head`` among ``keys`` (None where absent)."""
    return next((k for k in EMBED_KEYS if k in keys), None), next((k for k in LM_HEAD_KEYS if k in keys), None)


def check_readout_matrix(c: TensorContainer, key: str | None, shape: Any) -> None:
    """CheckpointError unless the read-out matrix ``key`` of shape ``shape`` is 2-D."""
    if len(shape) != 2:
        raise CheckpointError(f"{c.file_of(key or '')}: {key} must be 2-D, got shape {tuple(shape)}")


def check_readout_widths(where: Any, embed_width: int, head_width: int) -> None:
    """CheckpointError unless the input embedding and ``lm_head`` have the same width (the LLM's hidden size)."""
    if embed_width != head_width:
        raise CheckpointError(f"{where}: embedding width {embed_width} != lm_head width {head_width}")


def _lm_container(p: Path) -> tuple[TensorContainer | None, Path | None]:
    st = stat_path(p)
    if stat.S_ISDIR(st.st_mode):
        names = {n for n in (INDEX_NAME, SINGLE_NAME) if os.path.lexists(p / n)}
        return _main_container(p, names), p
    if stat.S_ISREG(st.st_mode):
        return _open_file(p), None
    raise CheckpointError(f"{p}: not a regular file or directory")


def load_lm_readout(path: str | os.PathLike[str] | CheckpointInfo) -> LmReadout:
    """Lazily read the input embedding and LM head of an HF checkpoint (dir or file).

    Returns an LmReadout with None fields when the checkpoint has no LLM weights (e.g. a bare
    ``mm_projector.bin``).
    """
    if (
        isinstance(path, CheckpointInfo)
        and path.tensors is not None
        and (path.tensors.is_main or path.root is None)
    ):
        c, root, cfg = path.tensors, path.root, path.config  # reuse it, so bytes_read keeps counting
    else:
        p = path.path if isinstance(path, CheckpointInfo) else Path(path)
        c, root = _lm_container(p)
        cfg = _config(root)
    if c is None:
        return LmReadout(None, None)
    ekey, hkey = readout_keys(c.keys())
    embed = c.read(ekey) if ekey else None
    head = c.read(hkey) if hkey else None
    for key, t in ((ekey, embed), (hkey, head)):
        if t is not None:
            check_readout_matrix(c, key, t.shape)
    if embed is not None and head is not None:
        check_readout_widths(root or c.files[0], embed.shape[1], head.shape[1])
    tied = False
    if head is None and embed is not None and tied_embeddings(cfg):
        head, hkey, tied = embed, ekey, True
    return LmReadout(embed, head, ekey, hkey, tied)


# --------------------------------------------------------------------------- tokenizer
def load_tokenizer_vocab(path: str | os.PathLike[str] | CheckpointInfo) -> list[str] | None:
    """id -> token list from ``tokenizer.json`` in the checkpoint dir (a file's own dir), or None.

    Parsed as JSON only: BPE/WordPiece/WordLevel ``model.vocab`` dicts, Unigram ``[token, score]``
    lists, plus ``added_tokens``. Ids without a token map to "".
    """
    p = path.path if isinstance(path, CheckpointInfo) else Path(path)
    root = p if stat.S_ISDIR(stat_path(p).st_mode) else p.parent
    if not os.path.lexists(root / "tokenizer.json"):
        return None
    tpath = inside(root, "tokenizer.json")
    data = read_json(tpath, MAX_TOKENIZER_BYTES)
    model = data.get("model") if isinstance(data, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    added = (data.get("added_tokens") if isinstance(data, dict) else None) or []
    if not isinstance(added, list):
        raise CheckpointError(f"{tpath}: added_tokens must be a list, got {type(added).__name__}")
    if (len(vocab) if isinstance(vocab, (dict, list)) else 0) + len(added) > MAX_VOCAB:
        raise CheckpointError(f"{tpath}: more than {MAX_VOCAB} vocabulary entries")
    pairs: list[tuple[int, str]] = []
    if isinstance(vocab, dict):
        pairs = [(i, t) for t, i in vocab.items()]
    elif isinstance(vocab, list):
        for i, item in enumerate(vocab):
            tok = item[0] if isinstance(item, list) and item else item
            pairs.append((i, tok))
    else:
        raise CheckpointError(f"{tpath}: no model.vocab in tokenizer.json")
    for entry in added:
        if isinstance(entry, dict):
            pairs.append((entry.get("id"), entry.get("content")))
    for i, t in pairs:
        if not (isinstance(i, int) and not isinstance(i, bool) and 0 <= i < MAX_VOCAB and isinstance(t, str)):
            raise CheckpointError(f"{tpath}: invalid vocabulary entry {t!r} -> {i!r}"[:300])
    out = [""] * (max((i for i, _ in pairs), default=-1) + 1)
    for i, t in pairs:
        out[i] = t
    return out
