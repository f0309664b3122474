"""The SR's coded findings and check verdicts: codes against pydicom's dictionary, dciodvfy, round trips."""

from __future__ import annotations

import csv
import importlib
import re
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.sr._concepts_dict import concepts

from radixpert.runtime.sr import load_codes, read_sr_findings, read_sr_verdicts, write_sr

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.dcm"))
PADCHEST = ("normal", "cardiomegaly", "pleural effusion", "pneumothorax", "nodule", "mass", "consolidation",
            "atelectasis", "pneumonia", "costophrenic angle blunting")
REPORT = "Derrame pleural derecho.\nNo se observa neumotórax."
FINDINGS = [
    {"label": "pleural effusion", "presence": "positive", "side": "right", "zone": ["lower"],
     "sentence": "Derrame pleural derecho."},
    {"label": "pneumothorax", "presence": "negated", "side": None, "zone": [],
     "sentence": "No se observa neumotórax."},
    {"label": "nodule", "presence": "uncertain", "side": "left", "zone": ["upper"],
     "sentence": "Posible nódulo izquierdo."},
    {"label": "cardiomegaly", "presence": "positive", "side": None, "zone": [], "sentence": "Cardiomegalia."},
    {"label": "consolidation", "presence": "positive", "side": "bilateral", "zone": [],
     "sentence": "Consolidación bilateral."},
    {"label": "atelectasis", "presence": "uncertain", "side": None, "zone": [], "sentence": "¿Atelectasia?"},
]
CHECKS = [
    {"kind": "laterality", "label": "pleural effusion", "verdict": "conflict", "stated_side": "right",
     "message": "report says right; the image evidence is on the left", "evidence": {"right": 0.1, "left": 0.8}},
    {"kind": "laterality", "label": "nodule", "verdict": "consistent", "stated_side": "left",
     "message": "left, as the image evidence", "evidence": None},
    {"kind": "laterality", "label": "consolidation", "verdict": "no evidence", "stated_side": "bilateral",
     "message": "no image evidence for consolidation", "evidence": None},
    {"kind": "omission", "label": "pneumothorax", "verdict": "possible omission", "stated_side": None,
     "message": "the image suggests a pneumothorax the report negates", "evidence": None},
    {"kind": "unsupported", "label": "cardiomegaly", "verdict": "unsupported", "stated_side": None,
     "message": "cardiothoracic ratio 0.42 does not support cardiomegaly", "evidence": {"ctr": 0.42}},
]
GATE = {"verdict": "mirrored", "reasons": ["heart mostly on the image's left", "aortic knob on the image's left"]}
CLEAN_CHECKS = [CHECKS[1]]
CLEAN_GATE = {"verdict": "ok", "reasons": []}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> list[Path]:
    """Three phantom DICOMs: uncompressed, RLE and JPEG 2000."""
    from radixpert.phantom import write_dataset

    out = tmp_path_factory.mktemp("phantoms")
    csv_path = write_dataset(out, n=3, seed=5, size=256, workers=1, progress=False)
    return [out / row["DicomPath"] for row in csv.DictReader(open(csv_path, encoding="utf-8"))]


def _write(source: Path, out: Path, **kwargs) -> Path:
    kwargs = {"findings": FINDINGS, "checks": CHECKS, "gate": GATE} | kwargs
    return write_sr(source, REPORT, out, bundle_id="b0123456789abcde", model_name="tiny", **kwargs)


def _items(ds) -> list:
    """Every content item of an SR tree, depth first."""
    found = []
    for item in ds.get("ContentSequence", []):
        found.append(item)
        found.extend(_items(item))
    return found


def _expected(findings: list[dict]) -> list[dict]:
    return [{"label": f["label"], "side": f["side"], "presence": f["presence"]} for f in findings
            if f["presence"] in ("positive", "uncertain")]


# ----------------------------------------------------------------------------- codes.json


def _pydicom_meanings(scheme: str, value: str) -> set[str]:
    """Every meaning pydicom's dictionary gives ``value`` in ``scheme``, also without a SNOMED semantic tag."""
    found = set()
    for entry in concepts.get(scheme, {}).values():
        if value in entry:
            meaning = entry[value][0]
            found |= {meaning, re.sub(r" \((qualifier value|finding|disorder|morphologic abnormality)\)$", "", meaning)}
    return found


def _entries(table: dict) -> list[tuple[str, dict]]:
    """(where, entry) of every code in codes.json."""
    out = [(f"labels/{k}", v) for k, v in table["labels"].items() if v is not None]
    for group in ("laterality", "certainty", "checks", "verdicts"):
        out += [(f"{group}/{k}", v) for k, v in table[group].items()]
    return out


def test_codes_json_names_every_padchest_label_and_the_laterality_codes():
    table = load_codes()
    assert tuple(table["labels"]) == PADCHEST
    for module in ("radixpert.checks.labeler", "radixpert.evaluation.labeler"):  # the labeler, wherever it lives now
        try:
            assert tuple(importlib.import_module(module).LABELS) == PADCHEST
            break
        except ImportError:
            continue
    lat = {k: (v["code"], v["scheme"]) for k, v in table["laterality"].items()}
    assert lat == {"concept": ("272741003", "SCT"), "right": ("24028007", "SCT"), "left": ("7771000", "SCT"),
                   "bilateral": ("51440002", "SCT")}


def test_every_standard_code_matches_pydicoms_dictionary():
    table = load_codes()
    private = table["private_scheme"]["designator"]
    checked = 0
    for where, entry in _entries(table):
        assert set(entry) == {"code", "scheme", "meaning"}, where
        if entry["scheme"] == private:
            continue
        assert entry["scheme"] in ("SCT", "DCM"), where
        meanings = _pydicom_meanings(entry["scheme"], entry["code"])
        assert meanings, f"{where}: {entry['scheme']} {entry['code']} is not in pydicom's dictionary"
        assert entry["meaning"] in meanings, f"{where}: {entry['meaning']!r} is not one of {sorted(meanings)}"
        checked += 1
    assert checked == 6 + 4 + 2  # coded labels, laterality, certainty


def test_private_codes_are_valid_short_strings_and_unique():
    table = load_codes()
    private = table["private_scheme"]["designator"]
    assert re.fullmatch(r"99[A-Z0-9]{1,14}", private)
    keys = []
    for where, entry in _entries(table):
        if entry["scheme"] == private:
            assert re.fullmatch(r"[A-Z0-9-]{1,16}", entry["code"]), where  # VR SH
            assert 0 < len(entry["meaning"]) <= 64, where  # VR LO
            keys.append(entry["code"])
    assert len(keys) == len(set(keys)) == 4 + 10


# ----------------------------------------------------------------------------- dciodvfy


def _dciodvfy(path: Path) -> list[str]:
    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.fail("dciodvfy not found: install the Debian package dicom3tools "
                    "(apt-get install -y dicom3tools); .ci/run installs it")
    done = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120, check=False)
    return (done.stdout + done.stderr).splitlines()


def _assert_valid(path: Path) -> list[str]:
    lines = _dciodvfy(path)
    assert lines and lines[0].strip() == "ComprehensiveSR", lines[:3]
    errors = [line for line in lines if "Error" in line]
    assert not errors, errors
    return lines


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_dciodvfy_accepts_srs_of_the_examples(example, tmp_path):
    out = _write(example, tmp_path / "e.sr.dcm")
    lines = _assert_valid(out)
    # The only warnings: dciodvfy does not know our private scheme (declared in the SR itself).
    assert all("99RDXE" in line for line in lines[1:]), lines
    assert read_sr_findings(out) == _expected(FINDINGS)


def test_dciodvfy_accepts_srs_of_phantoms_clean_flagged_and_plain(phantoms, tmp_path):
    assert len(EXAMPLES) == 4
    variants = [{}, {"checks": CLEAN_CHECKS, "gate": CLEAN_GATE}, {"findings": (), "checks": (), "gate": None},
                {"checks": (), "gate": {"verdict": "implausible", "reasons": ["no lungs found"]}},
                {"checks": (), "gate": {"verdict": "not checked", "reasons": ["no ranges"], "measures": {}}},
                # blank texts are dropped: an empty TEXT item is invalid DICOM
                {"checks": [CHECKS[0] | {"message": " "}], "gate": {"verdict": "mirrored", "reasons": ["", "x"]},
                 "warnings": ["", "a warning"]}]
    for n, source in enumerate(phantoms):
        for v, kwargs in enumerate(variants):
            _assert_valid(_write(source, tmp_path / f"{n}-{v}.sr.dcm", **kwargs))


# ----------------------------------------------------------------------------- content


def test_comprehensive_sr_relationship_constraints_hold(phantoms, tmp_path):
    """PS3.3 Table A.35.3-2, for the value types we write: dciodvfy does not check these."""
    sr = pydicom.dcmread(_write(phantoms[0], tmp_path / "r.sr.dcm"))

    def check(source) -> None:
        for item in source.get("ContentSequence", []):
            rel, target, kind = item.RelationshipType, item.ValueType, source.get("ValueType", "CONTAINER")
            if rel == "CONTAINS":
                assert kind == "CONTAINER", (kind, rel, target)
            elif rel == "HAS CONCEPT MOD":
                assert target in ("TEXT", "CODE"), (kind, rel, target)
            elif rel == "HAS PROPERTIES":
                assert kind in ("TEXT", "CODE", "NUM") and target in ("TEXT", "CODE", "NUM", "CONTAINER"), (kind, rel)
            elif rel == "HAS OBS CONTEXT":
                assert target in ("TEXT", "CODE", "NUM", "UIDREF", "PNAME", "DATETIME", "COMPOSITE"), (rel, target)
            else:
                pytest.fail(f"unexpected relationship {rel}")
            check(item)

    check(sr)


def test_coded_findings_carry_snomed_codes_laterality_and_certainty(phantoms, tmp_path):
    sr = pydicom.dcmread(_write(phantoms[1], tmp_path / "c.sr.dcm"))
    (section,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == "Findings"]
    findings = [i for i in section.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121071"]
    coded = {i.ConceptCodeSequence[0].CodeValue: i for i in findings if i.ValueType == "CODE"}
    assert set(coded) == {"60046008", "27925004", "287272002"}  # effusion, nodule, cardiomegaly; not pneumothorax
    assert all(i.ConceptCodeSequence[0].CodingSchemeDesignator == "SCT" for i in coded.values())

    def mods(item) -> dict:
        return {c.ConceptNameCodeSequence[0].CodeValue: c.ConceptCodeSequence[0].CodeValue
                for c in item.get("ContentSequence", [])
                if c.RelationshipType == "HAS CONCEPT MOD" and c.ValueType == "CODE"}

    assert mods(coded["60046008"]) == {"272741003": "24028007"}
    assert mods(coded["27925004"]) == {"272741003": "7771000", "111012": "64957009"}
    assert "ContentSequence" not in coded["287272002"]
    texts = {i.TextValue: i for i in findings if i.ValueType == "TEXT"}
    assert [line for line in texts if line in REPORT.splitlines()] == REPORT.splitlines()
    assert mods(texts["consolidation"]) == {"121049": "en", "272741003": "51440002"}
    assert mods(texts["atelectasis"]) == {"121049": "en", "111012": "64957009"}
    (scheme,) = sr.CodingSchemeIdentificationSequence
    assert scheme.CodingSchemeDesignator == "99RDXE"


def test_round_trip_of_every_label_side_and_presence(tmp_path):
    findings = [{"label": label, "presence": presence, "side": side, "zone": [], "sentence": "x"}
                for label in PADCHEST for side in (None, "right", "left", "bilateral")
                for presence in ("positive", "uncertain", "negated")]
    out = _write(EXAMPLES[0], tmp_path / "all.sr.dcm", findings=findings)
    got = read_sr_findings(out)
    assert got == _expected(findings) and len(got) == 10 * 4 * 2


def test_verdicts_round_trip_and_flagged_results_never_look_clean(phantoms, tmp_path):
    out = _write(phantoms[2], tmp_path / "v.sr.dcm")
    verdicts = read_sr_verdicts(out)
    assert verdicts["gate"] == "mirrored" and verdicts["gate_reasons"] == GATE["reasons"]
    assert verdicts["checks"] == [{k: c[k] for k in ("kind", "label", "verdict", "stated_side", "message")}
                                  for c in CHECKS]
    review = verdicts["review"]
    assert review.startswith("REVISAR:") and "derrame pleural" in review and "neumotórax" in review
    assert "cardiomegalia" in review and "invertida" in review and "nódulo" not in review

    sr = pydicom.dcmread(out)
    top = [i.TextValue for i in sr.ContentSequence if i.ValueType == "TEXT" and i.RelationshipType == "CONTAINS"]
    assert top[0] == review  # before the findings
    for check in CHECKS:
        flagged = [t for t in top if check["message"] in t]
        assert bool(flagged) == (check["verdict"] in ("conflict", "possible omission", "unsupported")), check["verdict"]
    assert any("mirrored" in t and GATE["reasons"][0] in t for t in top)
    (section,) = [i for i in sr.ContentSequence if i.ValueType == "CONTAINER"
                  and i.ConceptNameCodeSequence[0].CodeMeaning == "Conclusions"]
    assert len(section.ContentSequence) == len(CHECKS) + 1


def test_clean_results_have_no_review_comment_and_no_gate_is_not_run(phantoms, tmp_path):
    clean = read_sr_verdicts(_write(phantoms[0], tmp_path / "clean.sr.dcm", checks=CLEAN_CHECKS, gate=CLEAN_GATE))
    assert clean["gate"] == "ok" and clean["review"] is None and clean["checks"][0]["verdict"] == "consistent"
    unchecked = _write(phantoms[0], tmp_path / "unchecked.sr.dcm", checks=(),
                       gate={"verdict": "not checked", "reasons": ["no anatomy ranges"], "measures": {}})
    assert read_sr_verdicts(unchecked) == {"gate": "not checked", "gate_reasons": ["no anatomy ranges"], "checks": [],
                                           "review": None}
    out = _write(phantoms[0], tmp_path / "nogate.sr.dcm", checks=CLEAN_CHECKS, gate=None)
    assert read_sr_verdicts(out)["gate"] is None
    values = [i.ConceptCodeSequence[0].CodeValue for i in _items(pydicom.dcmread(out)) if i.ValueType == "CODE"]
    assert "NOT-RUN" in values
    plain = pydicom.dcmread(_write(phantoms[0], tmp_path / "plain.sr.dcm", findings=(), checks=(), gate=None))
    assert "CodingSchemeIdentificationSequence" not in plain
    assert not [i for i in plain.ContentSequence if i.ValueType == "CONTAINER"
                and i.ConceptNameCodeSequence[0].CodeMeaning == "Conclusions"]


@pytest.mark.parametrize("bad", [
    {"findings": [{"label": "effusion", "presence": "positive", "side": None}]},
    {"findings": [{"label": "nodule", "presence": "maybe", "side": None}]},
    {"findings": [{"label": "nodule", "presence": "positive", "side": "up"}]},
    {"checks": [{"kind": "zone", "label": "nodule", "verdict": "conflict", "stated_side": None, "message": "m"}]},
    {"checks": [{"kind": "laterality", "label": "nodule", "verdict": "bad", "stated_side": None, "message": "m"}]},
    {"gate": {"verdict": "fine", "reasons": []}},
], ids=["label", "presence", "side", "kind", "verdict", "gate"])
def test_unknown_values_are_refused_before_anything_is_written(bad, tmp_path):
    with pytest.raises(ValueError, match="write_sr: unknown"):
        _write(EXAMPLES[0], tmp_path / "x.sr.dcm", **bad)
    assert not list(tmp_path.iterdir())
