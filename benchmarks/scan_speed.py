"""Speed of `scan` on a LLaVA-1.5-7B-shaped checkpoint versus loading the whole model.

Writes a sharded HF LLaVA checkpoint with the real shapes (projector 1024 -> 4096 -> 4096, Llama-7B
LLM: embeddings and lm_head 32000 x 4096, 32 layers; CLIP ViT-L vision tower; bf16, ~14 GB). The
tensors the scan reads (projector, embeddings, lm_head, the first LLM layers' attention value /
output maps and norms) hold random values; every other tensor is left as a hole in a sparse file
(zeros on read, no disk space). A reference projector is written beside it as
``mm_projector.safetensors``. Then, in one run: ``scan`` (in-process, and the CLI end to end) and
the usual full load (``safetensors.torch.load_file`` of every shard, every tensor copied into memory
as a model load does), with the bytes each read.
The files are deleted at the end.

    python benchmarks/scan_speed.py [--dir /tmp] [--threads 1] [--keep]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import projlens_defense as pld

HIDDEN, VOCAB, LAYERS, MLP = 4096, 32000, 32, 11008
V_HIDDEN, V_LAYERS, V_MLP, V_PATCHES = 1024, 24, 4096, 577
N_SHARDS = 3


def llava_7b_tensors() -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of llava-1.5-7b-hf, in the legacy key layout, in shard order."""
    t: list[tuple[str, tuple[int, ...]]] = [("language_model.model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(LAYERS):
        p = f"language_model.model.layers.{i}."
        t += [(p + f"self_attn.{n}_proj.weight", (HIDDEN, HIDDEN)) for n in "qkvo"]
        t += [(p + "mlp.gate_proj.weight", (MLP, HIDDEN)), (p + "mlp.up_proj.weight", (MLP, HIDDEN)),
              (p + "mlp.down_proj.weight", (HIDDEN, MLP)),
              (p + "input_layernorm.weight", (HIDDEN,)), (p + "post_attention_layernorm.weight", (HIDDEN,))]
    t += [("language_model.model.norm.weight", (HIDDEN,)), ("language_model.lm_head.weight", (VOCAB, HIDDEN)),
          ("multi_modal_projector.linear_1.weight", (HIDDEN, V_HIDDEN)), ("multi_modal_projector.linear_1.bias", (HIDDEN,)),
          ("multi_modal_projector.linear_2.weight", (HIDDEN, HIDDEN)), ("multi_modal_projector.linear_2.bias", (HIDDEN,))]
    v = "vision_tower.vision_model."
    t += [(v + "embeddings.class_embedding", (V_HIDDEN,)), (v + "embeddings.patch_embedding.weight", (V_HIDDEN, 3, 14, 14)),
          (v + "embeddings.position_embedding.weight", (V_PATCHES, V_HIDDEN)),
          (v + "pre_layrnorm.weight", (V_HIDDEN,)), (v + "pre_layrnorm.bias", (V_HIDDEN,))]
    for i in range(V_LAYERS):
        p = f"{v}encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t += [(p + f"self_attn.{n}.weight", (V_HIDDEN, V_HIDDEN)), (p + f"self_attn.{n}.bias", (V_HIDDEN,))]
        t += [(p + "mlp.fc1.weight", (V_MLP, V_HIDDEN)), (p + "mlp.fc1.bias", (V_MLP,)),
              (p + "mlp.fc2.weight", (V_HIDDEN, V_MLP)), (p + "mlp.fc2.bias", (V_HIDDEN,))]
        t += [(p + f"layer_norm{j}.{w}", (V_HIDDEN,)) for j in (1, 2) for w in ("weight", "bias")]
    t += [(v + "post_layernorm.weight", (V_HIDDEN,)), (v + "post_layernorm.bias", (V_HIDDEN,))]
    return t


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _real(name: str) -> bool:
    """Tensors the scan reads get real values; everything else stays a sparse hole."""
    if name.startswith("multi_modal_projector.") or name.endswith(("embed_tokens.weight", "lm_head.weight", "model.norm.weight")):
        return True
    return any(name.startswith(f"language_model.model.layers.{i}.") and
               name.endswith(("v_proj.weight", "o_proj.weight", "input_layernorm.weight")) for i in range(2))


def _values(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return (1.0 + 0.1 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    return (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)


def write_sparse_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], gen: torch.Generator,
                             overrides: dict[str, torch.Tensor] | None = None) -> int:
    """A valid bf16 safetensors file; real data only where ``_real``; the rest a hole. Returns its size."""
    header, off = {}, 0
    for name, shape in tensors:
        n = _numel(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in tensors:
            t = (overrides or {}).get(name)
            if t is None and _real(name):
                t = _values(name, shape, gen)
            if t is not None:
                f.seek(start + header[name]["data_offsets"][0])
                f.write(t.contiguous().view(torch.uint8).numpy().tobytes())
        f.truncate(start + off)
    return start + off


def build(root: Path) -> tuple[Path, Path, int]:
    """Write the 7B-shaped suspect checkpoint and the reference projector; returns (ckpt, ref, total bytes)."""
    gen = torch.Generator().manual_seed(0)
    ckpt = root / "llava-7b-shaped"
    ckpt.mkdir(parents=True)
    tensors = llava_7b_tensors()
    total = sum(_numel(s) * 2 for _, s in tensors)
    per, shards, cur, size = total / N_SHARDS, [], [], 0
    for t in tensors:
        cur.append(t)
        size += _numel(t[1]) * 2
        if size >= per and len(shards) < N_SHARDS - 1:
            shards.append(cur)
            cur, size = [], 0
    shards.append(cur)
    ref = {n: _values(n, s, gen) for n, s in tensors if n.startswith("multi_modal_projector.")}
    # the suspect = reference + a small update with a planted rank-1 direction
    sus = dict(ref)
    w2 = ref["multi_modal_projector.linear_2.weight"].float()
    u, v = torch.randn(HIDDEN, generator=gen), torch.randn(HIDDEN, generator=gen)
    sus["multi_modal_projector.linear_2.weight"] = (w2 + 1e-3 * torch.randn(w2.shape, generator=gen)
                                                    + 2e-3 * torch.outer(u, v) / HIDDEN**0.5).to(torch.bfloat16)
    weight_map = {}
    for i, group in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_sparse_safetensors(ckpt / name, group, gen, sus)
        weight_map.update(dict.fromkeys((n for n, _ in group), name))
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (ckpt / "config.json").write_text(json.dumps({
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "projector_hidden_act": "gelu",
        "image_token_index": 32000, "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "text_config": {"model_type": "llama", "hidden_size": HIDDEN, "num_attention_heads": 32, "num_key_value_heads": 32,
                        "num_hidden_layers": LAYERS, "intermediate_size": MLP, "vocab_size": VOCAB},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": V_HIDDEN, "num_hidden_layers": V_LAYERS},
    }))
    vocab = {f"<s{i}>" if i < 3 else f"w{i}": i for i in range(VOCAB)}
    (ckpt / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab}, "added_tokens": []}))
    ref_dir = root / "reference"
    ref_dir.mkdir()
    from safetensors.torch import save_file

    save_file({k.replace("multi_modal_projector.linear_1", "model.mm_projector.0")
                .replace("multi_modal_projector.linear_2", "model.mm_projector.2"): t for k, t in ref.items()},
              ref_dir / "mm_projector.safetensors", metadata={"format": "pt"})
    return ckpt, ref_dir, total


def time_scan(ckpt: Path, ref: Path) -> tuple[float, int, str, list[str]]:
    t0, c0 = time.perf_counter(), time.process_time()
    [r] = pld.scan([ckpt], reference=ref)
    dt = time.perf_counter() - t0
    print(f"  scan CPU time {time.process_time() - c0:.2f} s (wall {dt:.2f} s)")
    if r.errors:
        raise SystemExit(f"scan failed: {r.errors}")
    return dt, r.bytes_read + tensor_bytes(ref / "mm_projector.safetensors"), r.verdict, r.suspected_target_tokens[:5]


def tensor_bytes(path: Path) -> int:
    """The tensor bytes of a safetensors file (all of them are the reference projector's, which the scan reads)."""
    with path.open("rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - header


def time_full_load(ckpt: Path) -> tuple[float, int]:
    """Every shard through ``safetensors.torch.load_file``, each tensor copied into its own memory as a
    model load copies it into its parameters (``load_file`` alone only maps the file: with the default
    mmap backend no byte is read until a tensor is used). Shards are released one by one to keep peak
    memory near one shard (~5 GB) on a shared machine; the time is the same."""
    from safetensors.torch import load_file

    t0 = time.perf_counter()
    nbytes = 0
    for shard in sorted(ckpt.glob("model-*.safetensors")):
        params = [t.clone() for t in load_file(shard).values()]
        nbytes += sum(t.numel() * t.element_size() for t in params)
        del params
        gc.collect()
    return time.perf_counter() - t0, nbytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where to write the ~14 GB sparse checkpoint")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--keep", action="store_true", help="keep the files")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    free = shutil.disk_usage(args.dir).free
    if free < 3 * 2**30:
        raise SystemExit(f"{args.dir}: only {free / 2**30:.1f} GiB free; need ~3 GiB (the rest of the files are sparse)")
    root = Path(tempfile.mkdtemp(prefix="projlens-scan-speed-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        ckpt, ref, total = build(root)
        on_disk = sum(os.stat(p).st_blocks * 512 for p in ckpt.iterdir())
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(f"wrote {ckpt} ({total / 1e9:.2f} GB of bf16 tensors in {N_SHARDS} shards, "
              f"{on_disk / 1e9:.2f} GB on disk, sparse) in {time.perf_counter() - t0:.1f} s; torch threads "
              f"{torch.get_num_threads()}")
        time_scan(ckpt, ref)  # warm-up: imports, page cache of the tensors the scan reads
        scan_s, scan_bytes, verdict, tokens = time_scan(ckpt, ref)
        print(f"scan (in-process): {scan_s:.2f} s, read {scan_bytes / 1e6:.0f} MB "
              f"({100 * scan_bytes / total:.1f}% of the checkpoint); verdict {verdict}, tokens {tokens}")
        t1 = time.perf_counter()
        cli = subprocess.run([sys.executable, "-m", "projlens_defense", "scan", str(ckpt), "--reference", str(ref),
                              "--format", "json"], capture_output=True, text=True)
        cli_s = time.perf_counter() - t1
        print(f"scan (CLI, end to end incl. Python/torch start-up): {cli_s:.2f} s, exit code {cli.returncode}")
        c0 = time.process_time()
        load_s, load_bytes = time_full_load(ckpt)
        print(f"  full load CPU time {time.process_time() - c0:.2f} s (wall {load_s:.2f} s)")
        print(f"full load (safetensors.torch.load_file of every shard, tensors copied to memory): {load_s:.2f} s, "
              f"read {load_bytes / 1e6:.0f} MB")
        print(f"bytes read: scan {scan_bytes:,} vs full load {load_bytes:,} ({load_bytes / scan_bytes:.1f}x fewer)")
        print(f"scan is {load_s / scan_s:.1f}x faster than a full load")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
