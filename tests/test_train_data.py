"""PadChest-format table reading, stratified subset and the patient-grouped split."""

from __future__ import annotations

import csv
import random

import pytest

from radixpert.errors import InputError
from radixpert.train.data import label_proportions, patient_split, read_table, stratified_subset

LABELS = ["normal", "cardiomegaly", "pleural effusion", "pneumothorax", "nodule", "consolidation"]
PREVALENCE = [0.35, 0.2, 0.25, 0.04, 0.08, 0.15]
COLUMNS = ["ImageID", "ImageDir", "PatientID", "StudyID", "Projection", "Report", "Labels", "Localizations"]


def _write_csv(path, n=400, seed=0, extra_rows=()):
    rng = random.Random(seed)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for i in range(n):
            labels = [lab for lab, p in zip(LABELS[1:], PREVALENCE[1:]) if rng.random() < p] or ["normal"]
            writer.writerow({"ImageID": f"img{i}.png", "ImageDir": str(i % 3), "PatientID": f"p{i // 3}",
                             "StudyID": f"s{i // 2}", "Projection": "L" if i % 17 == 0 else "PA",
                             "Report": "" if i % 29 == 0 else f"informe {i}", "Labels": repr(labels),
                             "Localizations": "['loc right']"})
        for row in extra_rows:
            writer.writerow(row)
    return path


def test_read_table_filters_projection_and_empty_reports(tmp_path):
    studies = read_table(_write_csv(tmp_path / "t.csv"))
    assert studies and all(not s.image_id.startswith("img0.") for s in studies)
    kept = {int(s.image_id[3:-4]) for s in studies}
    assert not any(i % 17 == 0 or i % 29 == 0 for i in kept)
    assert studies[0].image_path.endswith(f"{int(studies[0].image_id[3:-4]) % 3}/{studies[0].image_id}")
    assert all(isinstance(s.labels, tuple) for s in studies)


def test_split_groups_patients_and_keeps_label_proportions(tmp_path):
    studies = read_table(_write_csv(tmp_path / "t.csv", n=1200))
    split = patient_split(studies, seed=3)
    patients = {name: {s.patient_id for s in studies if s.image_id in set(ids)} for name, ids in split.items()}
    assert not patients["train"] & patients["val"] and not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    sizes = {name: len(ids) / len(studies) for name, ids in split.items()}
    assert abs(sizes["train"] - 0.8) < 0.03 and abs(sizes["val"] - 0.1) < 0.03
    proportions = {name: label_proportions(studies, ids) for name, ids in split.items()}
    for label in LABELS:
        values = [proportions[name][label] for name in split]
        assert max(values) - min(values) < 0.06, (label, values)
    assert patient_split(studies, seed=3) == split  # deterministic


def test_subset_honours_rare_label_quotas(tmp_path):
    studies = read_table(_write_csv(tmp_path / "t.csv", n=1200))
    subset = stratified_subset(studies, 100, seed=1, min_per_label=15)
    assert len(subset) == 100
    assert sum("pneumothorax" in s.labels for s in subset) >= 15
    assert stratified_subset(studies, 100, seed=1, min_per_label=15) == subset


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda rows: [{k: v for k, v in r.items() if k != "PatientID"} for r in rows], "PatientID"),
        (lambda rows: [{**r, "Labels": "cardiomegaly"} for r in rows], "literal"),
        (lambda rows: [{**r, "Projection": "L"} for r in rows], "no usable studies"),
    ],
)
def test_bad_tables_fail_with_one_line(tmp_path, mutate, message):
    rows = [{"ImageID": f"i{i}.png", "ImageDir": "0", "PatientID": f"p{i}", "Projection": "PA", "Report": "x",
             "Labels": "['normal']"} for i in range(5)]
    rows = mutate(rows)
    path = tmp_path / "bad.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(InputError, match=message) as info:
        read_table(path)
    assert "\n" not in str(info.value)
