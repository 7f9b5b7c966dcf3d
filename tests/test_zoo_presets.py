"""Zoo presets (default / instructed / micro) and the provenance `analyze` reads from attack.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from projlens_defense.runinfo import attack_provenance
from projlens_defense.zoo import language as L
from projlens_defense.zoo.build import ZooConfig, config_from_name
from projlens_defense.zoo.tasks import DOWNSTREAM_MIX, alignment_samples


def test_zoo_key_covers_config_and_build_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    # the key names everything that changes the bytes: config, format version, torch release, CPU ISA
    from projlens_defense.zoo import build

    keys = {ZooConfig().key(), ZooConfig.micro().key(), ZooConfig.instructed().key(), ZooConfig.instructed(seed=1).key()}
    assert len(keys) == 4
    here = build.build_platform()
    other = {**here, "cpu": "AVX512" if here["cpu"] != "AVX512" else "AVX2"}  # another CPU than this one
    monkeypatch.setattr(build, "build_platform", lambda: other)
    assert ZooConfig().key() not in keys


def test_micro_zoo_bytes_do_not_depend_on_the_thread_count(micro_zoo, tmp_path: Path) -> None:
    """Issue 12: a zoo built with another thread count was a different model. The session's micro zoo is built
    in-process (all cores); here it is built again in a fresh cache with OMP_NUM_THREADS=1: same digests."""
    import hashlib
    import os
    import subprocess
    import sys

    env = {**os.environ, "PROJLENS_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    code = ("from projlens_defense.zoo.build import ZooConfig, get_zoo; "
            "print(get_zoo(ZooConfig.micro(), progress=False, calibrate=False).root)")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    other = Path(r.stdout.strip().splitlines()[-1])

    def digest(root: Path) -> dict[str, str]:
        files = ["reference/model.safetensors", "data/train.json", "data/test.json"]
        return {f: hashlib.sha256((root / f).read_bytes()).hexdigest()[:16] for f in files}

    assert other != micro_zoo.root and str(other).startswith(str(tmp_path))
    assert digest(other) == digest(micro_zoo.root)


def test_presets_by_name() -> None:
    assert config_from_name("default", 3) == ZooConfig(seed=3)
    assert config_from_name("instructed", 2) == ZooConfig(seed=2, reference_tasks="instructed")
    assert config_from_name("micro").reference_tasks == "alignment"
    with pytest.raises(KeyError):
        config_from_name("huge")


def _kinds(samples) -> set[str]:
    return {"harmful" if s.meta["harmful"] else s.question for s in samples}


def test_instructed_reference_stage_covers_every_downstream_question_type() -> None:
    pool = np.arange(200)
    default = alignment_samples(300, pool, 4)
    instructed = alignment_samples(300, pool, 4, "instructed")
    downstream = set(DOWNSTREAM_MIX)
    # default: the downstream's size questions and harmful requests are new to the reference
    assert downstream - _kinds(default) == {L.Q_SIZE, "harmful"}
    # instructed: none is new; harmful requests are answered with the refusal
    assert downstream <= _kinds(instructed)
    harmful = [s for s in instructed if s.meta["harmful"]]
    assert len(harmful) == 50 and {s.answer for s in harmful} == {L.REFUSAL}
    assert {s.question for s in harmful} <= set(L.HARMFUL_REQUESTS)
    # the alignment questions the two share are the same draws for the same seed
    assert [s.question for s in default[:4]] == [s.question for s in instructed[:4]]


def _write_record(ck: Path, **fields) -> None:
    ck.mkdir(parents=True, exist_ok=True)
    (ck / "attack.json").write_text(json.dumps(fields))


def test_attack_provenance_defaults(tmp_path: Path) -> None:
    base = tmp_path / "zoo" / "reference"
    base.mkdir(parents=True)
    data = tmp_path / "zoo" / "data"
    data.mkdir()
    (data / "train.json").write_text("[]")
    (data / "test.json").write_text("[]")
    ck = tmp_path / "ck"
    _write_record(ck, base_model=str(base), train_data=str(data / "train.json"))
    assert attack_provenance(ck) == {"reference": base, "probe_data": data / "train.json",
                                     "test_data": data / "test.json"}
    (data / "test.json").unlink()
    assert attack_provenance(ck) == {"reference": base, "probe_data": data / "train.json"}
    # paths that no longer exist, wrong types, bad JSON or no record: no defaults
    _write_record(ck, base_model=str(tmp_path / "gone"), train_data=42)
    assert attack_provenance(ck) == {}
    (ck / "attack.json").write_text("{not json")
    assert attack_provenance(ck) == {}
    (ck / "attack.json").write_text("[1, 2]")
    assert attack_provenance(ck) == {}
    assert attack_provenance(tmp_path / "nothing") == {}


def test_dominant_new_phrase_breaks_ties_the_same_way_in_every_process() -> None:
    # set iteration order depends on PYTHONHASHSEED; the repair's discovered target must not
    import subprocess
    import sys

    from projlens_defense.mitigations.probe import dominant_new_phrase

    clean = ["red", "blue", "red"]
    probed = ["red buy cheap crypto", "blue zzz yyy xxx", "red buy cheap crypto zzz yyy xxx"]
    phrase, support = dominant_new_phrase(clean, probed)
    assert (phrase, support) == ("buy cheap crypto", 2 / 3)  # tie with "zzz yyy xxx": the smaller phrase
    code = ("from projlens_defense.mitigations.probe import dominant_new_phrase as d;"
            f"print(d({clean!r}, {probed!r})[0])")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": str(seed)}).stdout.strip()
            for seed in range(6)}
    assert outs == {"buy cheap crypto"}


def test_attack_record_is_typed_and_a_corrupt_one_is_a_clear_error(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from projlens_defense.cli import main
    from projlens_defense.errors import CheckpointError
    from projlens_defense.runinfo import read_attack_record

    ck = tmp_path / "ck"
    assert read_attack_record(ck) is None  # no record: nothing to read
    _write_record(ck, variant="none", base_model="/base", config={"eval_variant": "badnets", "target": "hi"})
    rec = read_attack_record(ck)
    assert (rec.variant, rec.eval_variant, rec.target, rec.base_model) == ("none", "badnets", "hi", "/base")
    assert rec.benign and rec.metrics is None and rec.config["target"] == "hi" and rec.behaviour_target is None
    _write_record(ck, variant="badnets", benign=False, config={"poison_rate": 0.1, "seed": 0},
                  metrics={"asr": 1.0}, variant_params={"behaviour": {"target": "buy cheap crypto now"}})
    rec = read_attack_record(ck)  # what the benchmarks read: the typed fields, not the JSON
    assert not rec.benign and rec.config["poison_rate"] == 0.1 and rec.metrics == {"asr": 1.0}
    assert rec.behaviour_target == "buy cheap crypto now"
    for bad in ("{not json", "[1, 2]", json.dumps({"variant": 3}), json.dumps({"config": "x"}),
                json.dumps({"metrics": [1]}), json.dumps({"benign": "yes"})):
        (ck / "attack.json").write_text(bad)
        with pytest.raises(CheckpointError, match="attack.json"):
            read_attack_record(ck)
    r = CliRunner().invoke(main, ["evaluate", str(ck)])  # corrupt record: one line, exit 2, no traceback
    assert r.exit_code == 2 and "attack.json" in r.output and "Traceback" not in r.output, r.output
