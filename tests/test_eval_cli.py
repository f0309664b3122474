"""radixpert-eval: score, bundle (with a stand-in runtime), label; outputs and one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import ClassVar

import pytest
from radixpert.evaluation import cli as eval_cli

REFS = {
    "a": "Derrame pleural derecho. Sin neumotórax.",
    "b": "Nódulo en el lóbulo superior izquierdo.",
    "c": "Sin hallazgos patológicos significativos.",
    "d": "Cardiomegalia. Neumotórax izquierdo.",
}
PREDS = {
    "a": "Derrame pleural derecho. Sin neumotórax.",  # exact
    "b": "Nódulo en el lóbulo superior derecho.",  # swapped side
    "c": "Cardiomegalia.",  # extra finding, missed normal
}


@pytest.fixture()
def run(capsys):
    """Call main() as the console script does; returns (exit code, stdout, stderr)."""

    def invoke(args: list[str]) -> tuple[int, str, str]:
        try:
            eval_cli.main(args)
            code = 0
        except SystemExit as exc:
            code = exc.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return invoke


@pytest.fixture()
def ref_csv(tmp_path) -> Path:
    path = tmp_path / "ref.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ImageID", "DicomPath", "Report"])
        for key, text in REFS.items():
            writer.writerow([f"{key}.png", f"dicom/{key}.dcm", text])
    return path


def write_preds(path: Path, preds: dict[str, str], refused: tuple[str, ...] = ()) -> Path:
    with path.open("w", encoding="utf-8") as handle:
        for key, text in preds.items():
            handle.write(json.dumps({"input": f"/scans/dicom/{key}.dcm", "report": text, "timings": {}}) + "\n")
        for key in refused:
            handle.write(json.dumps({"input": f"/scans/{key}.dcm", "error": {"code": "input", "message": "truncated"}}) + "\n")
    return path


def test_help_explains_each_metric_in_one_line(run):
    code, out, _ = run(["--help"])
    assert code == 0
    for name in ("BLEU-1..4", "ROUGE-L", "METEOR", "CIDEr-D", "finding P/R/F1", "laterality acc.", "swap rate"):
        lines = [line for line in out.splitlines() if line.strip().startswith(name)]
        assert len(lines) == 1 and len(lines[0].split(maxsplit=1)) == 2, name
    for command in ("score", "bundle", "ablation"):
        assert run([command, "--help"])[0] == 0


def test_score_writes_json_markdown_and_per_study_csv(run, tmp_path, ref_csv):
    pred = write_preds(tmp_path / "pred.jsonl", PREDS, refused=("d",))
    code, out, err = run(["score", "--pred", str(pred), "--ref", str(ref_csv), "--out", str(tmp_path / "eval")])
    assert code == 0, err
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["studies"] == 3 and metrics["refused"] == 1
    clinical = metrics["clinical"]
    assert clinical["laterality_checked"] == 2  # effusion (a) and nodule (b)
    assert clinical["laterality_accuracy"] == pytest.approx(0.5)
    assert clinical["swap_rate"] == pytest.approx(0.5) and clinical["swaps"] == 1
    assert clinical["per_label"]["cardiomegaly"]["fp"] == 1
    assert set(metrics["language"]) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "meteor", "cider_d"}
    assert metrics["settings"]["meteor"]["alpha"] == 0.9
    rows = list(csv.DictReader((tmp_path / "eval" / "per_study.csv").open(encoding="utf-8")))
    by_id = {row["study_id"]: row for row in rows}
    assert by_id["b.png"]["swapped"] == "nodule"
    assert by_id["c.png"]["extra"] == "cardiomegaly" and by_id["c.png"]["missed"] == "normal"
    assert float(by_id["a.png"]["rouge_l"]) == pytest.approx(1.0)
    markdown = (tmp_path / "eval" / "metrics.md").read_text()
    assert "| laterality_accuracy | 0.5000 |" in markdown and "| swap_rate | 0.5000 |" in markdown
    assert "| nodule |" in markdown and "laterality_accuracy" in out


def test_score_default_out_is_beside_the_predictions(run, tmp_path, ref_csv):
    pred = write_preds(tmp_path / "run.jsonl", {"a": REFS["a"]})
    assert run(["score", "--pred", str(pred), "--ref", str(ref_csv)])[0] == 0
    assert (tmp_path / "run-eval" / "metrics.json").exists()


@pytest.mark.parametrize("case,code,needle", [
    ("unmatched", 3, "no reference row"),
    ("duplicate", 3, "two predictions"),
    ("not json", 3, "is not JSON"),
    ("no file", 3, "not found"),
    ("no column", 3, "lacks column"),
])
def test_score_errors_are_one_line(run, tmp_path, ref_csv, case, code, needle):
    pred = tmp_path / "pred.jsonl"
    args = ["score", "--pred", str(pred), "--ref", str(ref_csv), "--out", str(tmp_path / "eval")]
    if case == "unmatched":
        write_preds(pred, {"zzz": "Cardiomegalia."})
    elif case == "duplicate":
        pred.write_text("\n".join(json.dumps({"input": p, "report": "x"}) for p in ("a.png", "x/a.dcm")) + "\n")
    elif case == "not json":
        pred.write_text("{not json\n")
    elif case == "no column":
        write_preds(pred, PREDS)
        args += ["--report-column", "Informe"]
    got, _, err = run(args)
    assert got == code
    assert needle in err and len(err.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def phantom_table(tmp_path_factory) -> tuple[Path, Path]:
    from radixpert.train.data import patient_split, read_table, save_split

    from radixpert.phantom import write_dataset

    csv_path = write_dataset(tmp_path_factory.mktemp("phantoms"), n=12, seed=4, size=256, workers=1, progress=False)
    split_path = csv_path.parent / "split.json"
    save_split(split_path, patient_split(read_table(csv_path), seed=0), 0, csv_path)
    return csv_path, split_path


class FakeReporter:
    """Stands in for the runtime: echoes the reference report, with sides swapped on every other scan."""

    reports: ClassVar[dict[str, str]] = {}
    speculative = False
    speculative_exact = True

    def __init__(self, bundle, **options):
        from types import SimpleNamespace

        self.calls = 0
        self.checker = SimpleNamespace(evidence_outputs=None)  # a bundle without an encoder head

    def report_many(self, paths):
        from types import SimpleNamespace

        from radixpert.errors import InputError

        for path in paths:
            self.calls += 1
            if self.calls == 2:
                yield InputError(f"{path.name}: truncated file")
                continue
            text = self.reports[path.stem]
            if self.calls % 2:
                text = text.replace("derech", "@").replace("izquierd", "derech").replace("@", "izquierd")
            checked = SimpleNamespace(checks=[], gate={"verdict": "ok", "reasons": [], "measures": {}})
            yield SimpleNamespace(report=text, checked=checked)

    def close(self):
        pass


def test_bundle_runs_the_runtime_on_a_split_and_scores(run, tmp_path, phantom_table, monkeypatch):
    import radixpert.runtime.pipeline
    from radixpert.train.data import load_split, read_table

    import radixpert.bundle

    csv_path, split_path = phantom_table
    studies = read_table(csv_path)
    FakeReporter.reports = {Path(s.image_path).stem: s.report for s in studies}
    monkeypatch.setattr(radixpert.runtime.pipeline, "Reporter", FakeReporter)
    monkeypatch.setattr(radixpert.bundle, "load_bundle", lambda path, verify=False: object())
    out = tmp_path / "eval"
    code, _, err = run(["bundle", "--bundle", str(tmp_path / "b"), "--data", str(csv_path), "--split", "all",
                             "--limit", "8", "--out", str(out)])
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["studies"] == 7 and metrics["refused"] == 1
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and "error" in lines[1]
    # the predictions file is what `score` reads: rescoring gives the same numbers
    assert run(["score", "--pred", str(out / "predictions.jsonl"), "--ref", str(csv_path), "--out", str(tmp_path / "re")])[0] == 0
    again = json.loads((tmp_path / "re" / "metrics.json").read_text())
    assert again["language"] == metrics["language"] and again["clinical"] == metrics["clinical"]
    # a split file selects that split's studies
    code, _, err = run(["bundle", "--bundle", str(tmp_path / "b"), "--data", str(csv_path), "--split", "train",
                        "--split-file", str(split_path), "--out", str(tmp_path / "train")])
    assert code == 0, err
    scored = json.loads((tmp_path / "train" / "metrics.json").read_text())
    assert scored["studies"] + scored["refused"] == len(load_split(split_path)["train"])


def test_same_as_counts_the_reports_identical_to_another_run(run, tmp_path, phantom_table, monkeypatch):
    import radixpert.bundle
    import radixpert.runtime.pipeline
    from radixpert.train.data import read_table

    csv_path, _ = phantom_table
    FakeReporter.reports = {Path(s.image_path).stem: s.report for s in read_table(csv_path)}
    monkeypatch.setattr(radixpert.runtime.pipeline, "Reporter", FakeReporter)
    monkeypatch.setattr(radixpert.bundle, "load_bundle", lambda path, verify=False: object())
    common = ["bundle", "--bundle", str(tmp_path / "b"), "--data", str(csv_path), "--split", "all", "--limit", "8"]
    assert run([*common, "--out", str(tmp_path / "first")])[0] == 0
    earlier = tmp_path / "first" / "predictions.jsonl"
    rows = [json.loads(line) for line in earlier.read_text().splitlines()]
    changed = rows[4]
    changed["report"] += " Otra frase."
    earlier.write_text("".join(json.dumps(row) + "\n" for row in rows))
    code, out, err = run([*common, "--same-as", str(earlier), "--out", str(tmp_path / "second")])
    assert code == 0, err
    same = json.loads((tmp_path / "second" / "metrics.json").read_text())["decoding"]["same_as"]
    assert (same["compared"], same["identical"], same["differ"]) == (7, 6, [changed["input"]])  # 1 refused
    assert "identical to" in out and "6 of 7" in out
    (tmp_path / "bad.jsonl").write_text("not json\n")
    code, _, err = run([*common, "--same-as", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "third")])
    assert code == 2 and "is not a predictions.jsonl" in err and "Traceback" not in err


def test_bundle_split_needs_a_split_file(run, tmp_path, phantom_table):
    code, _, err = run(["bundle", "--bundle", str(tmp_path), "--data", str(phantom_table[0]), "--split", "test"])
    assert code == 2 and "--split-file" in err


def test_label_shows_findings(run):
    code, out, _ = run(["label", "Derrame pleural izquierdo sin neumotórax."])
    assert code == 0
    record = json.loads(out)
    assert record["Labels"] == ["pleural effusion"] and record["Localizations"] == ["loc left"]
    assert record["findings"]["pneumothorax"]["status"] == "negative"


def test_bundle_subcommand_runs_without_torch(tmp_path, phantom_table):
    """The evaluation side of `bundle` (table, split, scores) imports no torch, as the runtime install has none."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import sys
        from types import SimpleNamespace

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked")

        sys.meta_path.insert(0, Block())
        import radixpert.bundle, radixpert.runtime.pipeline
        from radixpert.evaluation.cli import main

        class Reporter:
            checker = SimpleNamespace(evidence_outputs=None)
            speculative, speculative_exact = False, True
            def __init__(self, bundle, **kwargs):
                pass
            def report_many(self, paths):
                for path in paths:
                    yield SimpleNamespace(report="Derrame pleural derecho.", checked=SimpleNamespace(
                        checks=[], gate={{"verdict": "ok", "reasons": [], "measures": {{}}}}))
            def close(self):
                pass

        radixpert.runtime.pipeline.Reporter = Reporter
        radixpert.bundle.load_bundle = lambda path, verify=False: None
        main(["bundle", "--bundle", "b", "--data", {str(phantom_table[0])!r}, "--split", "all", "--limit", "3",
              "--out", {str(tmp_path / "eval")!r}])
        assert "torch" not in sys.modules
    """)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    assert (tmp_path / "eval" / "metrics.json").exists()


def test_scoring_without_the_eval_extra_says_what_to_install(monkeypatch, tmp_path, capsys):
    from radixpert.evaluation import cli

    (tmp_path / "p.jsonl").write_text("")
    (tmp_path / "r.csv").write_text("ImageID,Report\n")
    monkeypatch.setattr(cli, "METRIC_LIBRARIES", ("radixpert_no_such_metric",))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["score", "--pred", str(tmp_path / "p.jsonl"), "--ref", str(tmp_path / "r.csv")])
    assert exit_info.value.code == 2
    assert "radixpert-edge[eval]" in capsys.readouterr().err
