"""The draft report as a DICOM Comprehensive SR, with coded findings and check verdicts (torch-free).

Codes come from ``radixpert/checks/codes.json``: SNOMED CT and DICOM codes that are all in
pydicom's code dictionary (a test checks each one), plus the private scheme ``99RDXE`` for the
verdicts of the report checks, declared in every SR's Coding Scheme Identification Sequence.
:func:`read_sr_findings` and :func:`read_sr_verdicts` read the coded content back. Only
pydicom and highdicom build the tree: no DICOM is encoded by hand. See docs/sr.md.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from radixpert.errors import InputError, UsageError
from radixpert.runtime.outputs import _atomic_write, _short

__all__ = ["DISCLAIMER", "MANUFACTURER", "SERIES_DESCRIPTION", "load_codes", "read_sr_findings", "read_sr_verdicts",
           "write_sr"]

SERIES_DESCRIPTION = "BORRADOR - NO USO CLINICO / draft, not for clinical use"  # LO: <= 64 chars
MANUFACTURER = "Radixpert Edge"
DISCLAIMER = ("BORRADOR generado automáticamente por Radixpert Edge, no verificado por un radiólogo; "
              "no apto para uso clínico.")
# Derived series conventionally get high numbers, clear of the modality's own series.
SERIES_NUMBER = 990
REVIEW_PREFIX = "REVISAR:"
CODED = ("positive", "uncertain")  # presences that get a coded Finding item
PRESENCES = (*CODED, "negated", "negative")  # "negative" is the labeler's own word for "negated"
FLAGGED = frozenset({"conflict", "possible omission", "unsupported", "mirrored", "implausible"})
CHECK_VERDICTS = ("consistent", "conflict", "no evidence", "possible omission", "unsupported")
GATE_VERDICTS = ("ok", "mirrored", "implausible", "not checked")  # "not checked": no anatomy ranges
_SPANISH = hd.sr.CodedConcept("es", "RFC5646", "Spanish")
_ENGLISH = hd.sr.CodedConcept("en", "RFC5646", "English")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Type 2 attributes highdicom reads from the evidence; anonymized files often drop them.
_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
          "StudyDate", "StudyTime")
# Spanish names for the REVISAR comment (the labels themselves are PadChest's English names).
_ES = {"normal": "normal", "cardiomegaly": "cardiomegalia", "pleural effusion": "derrame pleural",
       "pneumothorax": "neumotórax", "nodule": "nódulo", "mass": "masa", "consolidation": "consolidación",
       "atelectasis": "atelectasia", "pneumonia": "neumonía",
       "costophrenic angle blunting": "pinzamiento del seno costofrénico"}
_ES_SIDE = {"right": "lado derecho", "left": "lado izquierdo", "bilateral": "ambos lados"}
_FINDINGS, _FINDING, _COMMENT = codes.DCM.Findings, codes.DCM.Finding, codes.DCM.Comment
_VERDICTS = codes.DCM.Conclusions
_LANGUAGE = codes.DCM.LanguageOfContentItemAndDescendants


@lru_cache(maxsize=1)
def load_codes() -> dict[str, Any]:
    """The parsed ``radixpert/checks/codes.json`` (cached; treat it as read-only)."""
    return json.loads(resources.files("radixpert.checks").joinpath("codes.json").read_text(encoding="utf-8"))


def write_sr(source_path: Path, report: str, out_path: Path, *, bundle_id: str, model_name: str,
             warnings: Sequence[str] = (), findings: Sequence[dict] = (), checks: Sequence[dict] = (),
             gate: dict | None = None) -> Path:
    """Write ``report`` as a draft Comprehensive SR in the source image's study; return ``out_path``.

    Comprehensive SR (not Enhanced SR) because it is the SR class archives and viewers most widely
    accept and highdicom reads back. The tree follows TID 2000 and uses only CONTAINER, CODE,
    TEXT and IMAGE items (``[..]`` parts are written only when their inputs ask for them)::

        CONTAINER (18748-4, LN, "Diagnostic Imaging Report")
          HAS CONCEPT MOD  language = es
          HAS OBS CONTEXT  device observer: Radixpert Edge, model name
          HAS CONCEPT MOD  Algorithm Name = model_name, Algorithm Version = bundle_id
         [CONTAINS TEXT (121106, DCM, "Comment") = "REVISAR: ..."    Spanish, when a result is flagged]
          CONTAINS CONTAINER (121070, DCM, "Findings")
            CONTAINS TEXT (121071, DCM, "Finding")    one per non-empty report line
           [CONTAINS CODE (121071, DCM, "Finding") = SNOMED code     one per positive/uncertain finding
              HAS CONCEPT MOD CODE (272741003, SCT, "Laterality") = Right | Left | Right and left
              HAS CONCEPT MOD CODE (111012, DCM, "Certainty of Finding") = (64957009, SCT, "Uncertain")]
           [CONTAINS TEXT (121071, DCM, "Finding") = English label   for labels without a code
              HAS CONCEPT MOD language = en; Laterality and Certainty as above]
            CONTAINS IMAGE (121080, DCM, "Best illustration of finding") -> source image
         [CONTAINS CONTAINER (121076, DCM, "Conclusions")           when checks or a gate are given
            CONTAINS CODE (99RDXE check kind) = (99RDXE verdict)     one per check
              HAS CONCEPT MOD language = en
              HAS CONCEPT MOD TEXT (121071, DCM, "Finding") = label
              HAS CONCEPT MOD CODE Laterality = the side the report states
              HAS PROPERTIES  TEXT (121106, DCM, "Comment") = the check's message
            CONTAINS CODE (GATE-ANATOMY, 99RDXE) = GATE-OK | MIRRORED | IMPLAUSIBLE | NOT-CHECKED | NOT-RUN
              HAS CONCEPT MOD language = en
              HAS PROPERTIES  TEXT Comment = one per reason]
          CONTAINS TEXT (121106, DCM, "Comment")     the draft disclaimer
         [CONTAINS TEXT (121106, DCM, "Comment")     one per flagged result, language en]
          CONTAINS TEXT (121106, DCM, "Comment")     one per reader warning, language en

    ``findings``, ``checks`` and ``gate`` have the shapes described in docs/sr.md. Negated findings
    get no coded item. An uncertain finding is coded as a positive one is, plus a Certainty of
    Finding = Uncertain concept modifier (pydicom's dictionary has no Presence/Possible pair; both
    these codes are in it), so it is never silently dropped nor read as certain. The verdicts go
    under Conclusions, a TID 2000 heading that, unlike Impression, does not read as the
    radiologist's judgement. Flagged results (conflict, possible omission, unsupported, mirrored,
    implausible) are also top-level comments: English, and one Spanish "REVISAR: ..." line. One
    TEXT per report line: splitting Spanish prose at full stops breaks on decimals and
    abbreviations. Flags are UNVERIFIED, PARTIAL and PRELIMINARY: a radiologist signs the report.
    Unknown labels, sides, presences, kinds or verdicts raise ValueError.
    """
    source_path, out_path = Path(source_path), Path(out_path)
    coded = _finding_items(findings)
    verdicts = _verdict_items(checks, gate) if checks or gate is not None else []
    evidence = _read_source(source_path)
    for keyword in _TYPE2:
        if keyword not in evidence:
            setattr(evidence, keyword, "")

    section = hd.sr.ContainerContentItem(_FINDINGS, relationship_type="CONTAINS")
    section.ContentSequence = [
        *(hd.sr.TextContentItem(_FINDING, line, relationship_type="CONTAINS") for line in _lines(report)),
        *coded,
        hd.sr.ImageContentItem(codes.DCM.BestIllustrationOfFinding, evidence.SOPClassUID, evidence.SOPInstanceUID,
                               relationship_type="CONTAINS"),
    ]
    flagged = _flagged(checks, gate)
    review = [_text(_COMMENT, f"{REVIEW_PREFIX} " + "; ".join(_spanish(f) for f in flagged) + ".")] if flagged else []
    conclusions = []
    if verdicts:
        conclusions = [hd.sr.ContainerContentItem(_VERDICTS, relationship_type="CONTAINS")]
        conclusions[0].ContentSequence = verdicts
    notes = [_text(_COMMENT, DISCLAIMER)]
    notes += [_text(_COMMENT, _english_flag(f), english=True) for f in flagged]
    notes += [_text(_COMMENT, w, english=True) for w in _nonblank(warnings)]  # reader warnings are English
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        # Stable per bundle, so every report from one bundle names the same device observer.
        uid=generate_uid(entropy_srcs=["radixpert-edge", bundle_id]),
        name=MANUFACTURER, manufacturer_name=MANUFACTURER, model_name=model_name[:64])
    root = hd.sr.ContainerContentItem(codes.LN.DiagnosticImagingReport)
    root.ContentSequence = [
        *hd.sr.LanguageOfContentItemAndDescendants(_SPANISH),
        *hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device)),
        *hd.sr.AlgorithmIdentification(name=model_name, version=bundle_id),
        *review, section, *conclusions, *notes,
    ]
    scheme = load_codes()["private_scheme"]
    try:
        sr = hd.sr.ComprehensiveSR(
            evidence=[evidence], content=root, series_instance_uid=hd.UID(), series_number=SERIES_NUMBER,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer=MANUFACTURER,
            is_complete=False, is_final=False, is_verified=False,
            series_description=SERIES_DESCRIPTION, manufacturer_model_name=model_name[:64],
            software_versions=bundle_id[:64], specific_character_set="ISO_IR 192",
            coding_schemes=[CodingSchemeIdentificationItem(
                scheme["designator"], name=scheme["name"], version=scheme["version"],
                responsible_organization=MANUFACTURER)] if verdicts else None)
    except (AttributeError, TypeError, ValueError) as exc:
        # highdicom names the attribute, never its value, so the message holds no patient data.
        raise InputError(f"{source_path.name}: cannot reference this DICOM in an SR ({_short(exc)}); "
                         "check its header") from None
    _atomic_write(out_path, lambda tmp: sr.save_as(tmp, enforce_file_format=True))
    return out_path


def read_sr_findings(path: str | Path) -> list[dict]:
    """The coded findings of an SR from :func:`write_sr`, in order: ``{"label", "side", "presence"}``.

    ``presence`` is "uncertain" where a Certainty of Finding = Uncertain modifier is present, else
    "positive"; ``side`` is None without a Laterality modifier. Report lines are not findings.
    """
    table = load_codes()
    labels = {_key_of(c): label for label, c in table["labels"].items() if c}
    out = []
    for item in _section(pydicom.dcmread(path), _FINDINGS):
        if _key(item.ConceptNameCodeSequence) != _key_of(_FINDING):
            continue
        mods = _modifiers(item)
        if item.ValueType == "CODE":
            label = labels.get(_key(item.ConceptCodeSequence))
            if label is None:
                raise ValueError(f"SR finding code {_key(item.ConceptCodeSequence)} is not in codes.json")
        elif item.ValueType == "TEXT" and mods.get(_key_of(_LANGUAGE)) == ("RFC5646", "en"):
            label = str(item.TextValue)  # an English label without a code; report lines are Spanish
        else:
            continue
        uncertain = mods.get(_key_of(table["certainty"]["concept"])) == _key_of(table["certainty"]["uncertain"])
        out.append({"label": label, "side": _side(mods), "presence": "uncertain" if uncertain else "positive"})
    return out


def read_sr_verdicts(path: str | Path) -> dict[str, Any]:
    """The check verdicts of an SR from :func:`write_sr`.

    ``{"gate": "ok"|"mirrored"|"implausible"|"not checked"|None, "gate_reasons": [...], "checks": [{"kind",
    "label", "verdict", "stated_side", "message"}], "review": the REVISAR comment or None}``;
    ``gate`` is None when no gate ran (or the SR has no Conclusions container).
    """
    table = load_codes()
    kinds = {_key_of(c): kind for kind, c in table["checks"].items()}
    verdicts = {_key_of(c): verdict for verdict, c in table["verdicts"].items()}
    ds = pydicom.dcmread(path)
    out: dict[str, Any] = {"gate": None, "gate_reasons": [], "checks": [], "review": None}
    for item in _section(ds, _VERDICTS):
        kind = kinds.get(_key(item.ConceptNameCodeSequence))
        if kind is None or item.ValueType != "CODE":
            continue
        verdict = verdicts.get(_key(item.ConceptCodeSequence))
        notes = [str(c.TextValue) for c in item.get("ContentSequence", [])
                 if c.ValueType == "TEXT" and _key(c.ConceptNameCodeSequence) == _key_of(_COMMENT)]
        if kind == "gate":
            out["gate"] = None if verdict == "not run" else verdict
            out["gate_reasons"] = notes
            continue
        label = next((str(c.TextValue) for c in item.get("ContentSequence", [])
                      if c.ValueType == "TEXT" and _key(c.ConceptNameCodeSequence) == _key_of(_FINDING)), None)
        out["checks"].append({"kind": kind, "label": label, "verdict": verdict, "stated_side": _side(_modifiers(item)),
                              "message": notes[0] if notes else None})
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "TEXT" and str(item.TextValue).startswith(REVIEW_PREFIX):
            out["review"] = str(item.TextValue)
    return out


# ----------------------------------------------------------------------------- building


def _finding_items(findings: Sequence[dict]) -> list[hd.sr.ContentItem]:
    """One CODE (or, for labels without a code, English TEXT) Finding per positive or uncertain finding."""
    table = load_codes()
    items: list[hd.sr.ContentItem] = []
    for finding in findings:
        label, presence = finding.get("label"), finding.get("presence")
        _require(label in table["labels"], "finding label", label)
        _require(presence in PRESENCES, "finding presence", presence)
        if presence not in CODED:
            continue
        code = table["labels"][label]
        mods = [] if code else list(hd.sr.LanguageOfContentItemAndDescendants(_ENGLISH))
        mods += _laterality(finding.get("side"))
        if presence == "uncertain":
            certainty = table["certainty"]
            mods.append(_code(certainty["concept"], certainty["uncertain"], "HAS CONCEPT MOD"))
        item = (_code(_FINDING, code, "CONTAINS") if code
                else hd.sr.TextContentItem(_FINDING, label, relationship_type="CONTAINS"))
        if mods:
            item.ContentSequence = mods
        items.append(item)
    return items


def _verdict_items(checks: Sequence[dict], gate: dict | None) -> list[hd.sr.ContentItem]:
    """One CODE item per check and one for the gate (NOT-RUN when ``gate`` is None)."""
    table = load_codes()
    items = []
    for check in checks:
        kind, verdict, label = check.get("kind"), check.get("verdict"), check.get("label")
        _require(kind in table["checks"] and kind != "gate", "check kind", kind)
        _require(verdict in CHECK_VERDICTS, "check verdict", verdict)
        _require(label is None or label in table["labels"], "check label", label)
        item = _code(table["checks"][kind], table["verdicts"][verdict], "CONTAINS")
        mods = list(hd.sr.LanguageOfContentItemAndDescendants(_ENGLISH))
        if label is not None:
            mods.append(hd.sr.TextContentItem(_FINDING, label, relationship_type="HAS CONCEPT MOD"))
        mods += _laterality(check.get("stated_side"))
        mods += [hd.sr.TextContentItem(_COMMENT, m, relationship_type="HAS PROPERTIES")
                 for m in _nonblank([check.get("message")])]
        item.ContentSequence = mods
        items.append(item)
    verdict = "not run" if gate is None else gate.get("verdict")
    _require(verdict == "not run" or verdict in GATE_VERDICTS, "gate verdict", verdict)
    item = _code(table["checks"]["gate"], table["verdicts"][verdict], "CONTAINS")
    item.ContentSequence = [
        *hd.sr.LanguageOfContentItemAndDescendants(_ENGLISH),
        *(hd.sr.TextContentItem(_COMMENT, r, relationship_type="HAS PROPERTIES")
          for r in _nonblank((gate or {}).get("reasons") or ())),
    ]
    items.append(item)
    return items


def _flagged(checks: Sequence[dict], gate: dict | None) -> list[dict]:
    """The checks, and the gate as ``{"kind": "gate", ...}``, whose verdict is not clean."""
    flagged = [c for c in checks if c.get("verdict") in FLAGGED]
    if gate is not None and gate.get("verdict") in FLAGGED:
        flagged.append({"kind": "gate", "verdict": gate["verdict"], "message": "; ".join(gate.get("reasons") or ())})
    return flagged


def _spanish(flag: dict) -> str:
    """One Spanish phrase for the REVISAR comment."""
    name = _ES.get(flag.get("label") or "", flag.get("label") or "un hallazgo")
    verdict = flag["verdict"]
    if verdict == "conflict":
        side = flag.get("stated_side")
        return f"lateralidad de {name} en conflicto con la imagen" + (f" (informe: {_ES_SIDE[side]})" if side else "")
    if verdict == "possible omission":
        return f"posible omisión de {name}"
    if verdict == "unsupported":
        return f"{name} sin respaldo en la imagen"
    if verdict == "mirrored":
        return "la imagen parece invertida (izquierda-derecha); comprobar la lateralidad"
    return "anatomía no plausible en la imagen; comprobar la entrada"


def _english_flag(flag: dict) -> str:
    """One English line for a flagged result's top-level comment."""
    what = load_codes()["checks"][flag["kind"]]["meaning"].lower()  # "laterality check", "anatomy gate"
    about = f" ({flag['label']})" if flag.get("label") else ""
    return f"Automated {what}: {flag['verdict']}{about}" + (f": {flag['message']}" if flag.get("message") else "")


def _laterality(side: object) -> list[hd.sr.ContentItem]:
    if side is None:
        return []
    lat = load_codes()["laterality"]
    _require(side in ("right", "left", "bilateral"), "side", side)
    return [_code(lat["concept"], lat[side], "HAS CONCEPT MOD")]


def _code(name: Any, value: dict, relationship: str) -> hd.sr.CodeContentItem:
    return hd.sr.CodeContentItem(_concept(name), _concept(value), relationship_type=relationship)


def _concept(entry: Any) -> hd.sr.CodedConcept:
    """A highdicom concept from a codes.json entry or a pydicom Code."""
    if isinstance(entry, dict):
        return hd.sr.CodedConcept(entry["code"], entry["scheme"], entry["meaning"])
    return hd.sr.CodedConcept(entry.value, entry.scheme_designator, entry.meaning)


def _text(name: Any, value: str, english: bool = False) -> hd.sr.TextContentItem:
    item = hd.sr.TextContentItem(name, value, relationship_type="CONTAINS")
    if english:
        item.ContentSequence = list(hd.sr.LanguageOfContentItemAndDescendants(_ENGLISH))
    return item


def _nonblank(texts: Sequence[object]) -> list[str]:
    """The texts that are not None or blank, stripped: an empty TEXT item is invalid DICOM."""
    return [str(t).strip() for t in texts if t is not None and str(t).strip()]


def _require(ok: bool, what: str, value: object) -> None:
    if not ok:
        raise ValueError(f"write_sr: unknown {what} {str(value)[:40]!r}")


# ----------------------------------------------------------------------------- reading


def _key(sequence: Any) -> tuple[str, str]:
    """(scheme, code value) of a code sequence's single item (a long value is in LongCodeValue)."""
    code = sequence[0]
    value = code.get("CodeValue") or code.get("LongCodeValue") or code.get("URNCodeValue")
    return str(code.CodingSchemeDesignator), str(value)


def _key_of(entry: Any) -> tuple[str, str]:
    """(scheme, code value) of a codes.json entry or a pydicom Code."""
    if isinstance(entry, dict):
        return entry["scheme"], entry["code"]
    return entry.scheme_designator, entry.value


def _modifiers(item: pydicom.Dataset) -> dict[tuple[str, str], Any]:
    """The CODE concept modifiers of ``item``: concept name key -> value key."""
    return {_key(c.ConceptNameCodeSequence): _key(c.ConceptCodeSequence) for c in item.get("ContentSequence", [])
            if c.RelationshipType == "HAS CONCEPT MOD" and c.ValueType == "CODE"}


def _side(mods: dict[tuple[str, str], Any]) -> str | None:
    lat = load_codes()["laterality"]
    value = mods.get(_key_of(lat["concept"]))
    return next((s for s in ("right", "left", "bilateral") if _key_of(lat[s]) == value), None)


def _section(ds: pydicom.Dataset, name: Any) -> list[pydicom.Dataset]:
    """The items of the root's first CONTAINER named ``name`` ([] when there is none)."""
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "CONTAINER" and _key(item.ConceptNameCodeSequence) == _key_of(name):
            return list(item.get("ContentSequence", []))
    return []


def _read_source(path: Path) -> pydicom.Dataset:
    """The source header (pixels are not needed); a non-DICOM input is a usage error."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError as exc:
        raise InputError(f"{path.name}: cannot be read ({exc.strerror}); check the path") from None
    if head == _PNG_MAGIC:
        raise UsageError(f"{path.name}: --sr needs a DICOM input (this is a PNG)")
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        raise UsageError(f"{path.name}: --sr needs a DICOM input ({_short(exc)})") from None
    if not ds.get("SOPClassUID"):  # force=True parses any bytes; a real DICOM object always has one
        raise UsageError(f"{path.name}: --sr needs a DICOM input (this is not a DICOM object)")
    missing = [k for k in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if not ds.get(k)]
    if missing:
        raise InputError(f"{path.name}: DICOM header lacks {', '.join(missing)}, so an SR cannot reference it")
    return ds


def _lines(report: str) -> list[str]:
    return [line.strip() for line in report.splitlines() if line.strip()]
