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


def test_default_zoo_key_is_unchanged_by_the_preset_field() -> None:
    # The shipped calibration and every cached zoo are keyed by this: a new preset must not move it.
    assert ZooConfig().key() == "7001045ad6199a87"
    assert ZooConfig.micro().key() == "106b7edf742db1a4"
    assert ZooConfig.instructed().key() not in {ZooConfig().key(), ZooConfig.micro().key()}
    assert ZooConfig.instructed(seed=1).key() != ZooConfig.instructed().key()


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
