"""radixpert-serve without a network: configuration, the durable queue, routing, the CLI's one-line errors."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from radixpert.errors import UsageError
from radixpert.serve.config import RoutingRule, load_config
from radixpert.serve.queue import Queue
from radixpert.serve.scp import decodable_syntaxes, routed

GOOD = """
[dicom]
ae_title = "RADIXPERT"
allowed_calling_aes = ["PACS", "CR01"]
[queue]
spool = "{spool}"
[model]
bundle = "{bundle}"
[[destinations]]
name = "pacs"
type = "dicom"
ae_title = "PACS"
host = "127.0.0.1"
port = 4242
[[destinations]]
name = "web"
type = "dicomweb"
url = "http://127.0.0.1:8042/dicom-web"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "serve.toml"
    path.write_text(text.format(spool=tmp_path / "spool", bundle=tmp_path / "bundle"), encoding="utf-8")
    return path


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "radixpert.serve.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_config_loads_with_overrides(tmp_path):
    config = load_config(write(tmp_path, GOOD), {"dicom.port": 11113, "http.port": None})
    assert config.dicom.port == 11113 and config.http.port == 8080
    assert [d.name for d in config.destinations] == ["pacs", "web"]
    assert config.http.host == "127.0.0.1" and config.dicom.host == "127.0.0.1"  # loopback by default


@pytest.mark.parametrize("edit, words", [
    (("[queue]", "[queue]\nmax_jobz = 3"), "unknown key queue.max_jobz"),
    (('port = 4242', 'port = "4242"'), "destinations.port must be int"),
    (('allowed_calling_aes = ["PACS", "CR01"]', "allowed_calling_aes = []"), "allowed_calling_aes is empty"),
    (('ae_title = "RADIXPERT"', 'ae_title = "A_TITLE_FAR_TOO_LONG"'), "dicom.ae_title"),
    (('type = "dicomweb"', 'type = "ftp"'), "type must be one of"),
    (("[dicom]", "[dicom]\nsop_classes = [\"CT\"]"), "sop_classes: unknown"),
    (("[model]", "[model]\non_implausible = \"ignore\""), "on_implausible"),
    (("[queue]", "[http]\nhost = \"0.0.0.0\"\n[queue]"), "not a loopback address"),
    (("[dicom]", "[dicom\n"), "not valid TOML"),
])
def test_config_errors_are_one_line(tmp_path, edit, words):
    path = write(tmp_path, GOOD.replace(*edit, 1))
    with pytest.raises(UsageError, match=words.replace("[", r"\[")) as err:
        load_config(path)
    assert "\n" not in str(err.value)


def test_check_config_lists_remote_aes_and_refuses_off_loopback_without_token(tmp_path):
    path = write(tmp_path, GOOD)
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "manifest.json").write_text("{}")
    done = cli("check-config", "--config", str(path))
    assert done.returncode == 0, done.stderr
    for name in ("PACS", "CR01", "pacs", "web", "http://127.0.0.1:8042/dicom-web", "configuration valid"):
        assert name in done.stdout
    off = cli("check-config", "--config", str(path), "--http-host", "0.0.0.0")
    assert off.returncode == 2 and off.stderr.count("\n") == 1 and "token" in off.stderr
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    ok = cli("check-config", "--config", str(path), "--http-host", "0.0.0.0", "--http-token-file", str(token))
    assert ok.returncode == 0 and "token required" in ok.stdout
    missing = cli("check-config", "--config", str(path), "--bundle", str(tmp_path / "nowhere"))
    assert missing.returncode == 4 and "Traceback" not in missing.stderr


ROOT = Path(__file__).resolve().parent.parent


def test_example_configuration_and_systemd_unit_are_valid(tmp_path):
    """The shipped serve.toml passes check-config (only the site paths overridden); the unit runs it."""
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "manifest.json").write_text("{}")
    example = ROOT / "examples" / "serve" / "serve.toml"
    done = cli("check-config", "--config", str(example), "--bundle", str(tmp_path / "bundle"),
               "--spool", str(tmp_path / "spool"))
    assert done.returncode == 0, done.stderr
    assert "ORTHANC" in done.stdout and "1 routing rule" in done.stdout
    unit = (ROOT / "examples" / "serve" / "radixpert-serve.service").read_text()
    for line in ("ExecStartPre=/opt/radixpert/venv/bin/radixpert-serve check-config --config /etc/radixpert/serve.toml",
                 "ExecStart=/opt/radixpert/venv/bin/radixpert-serve --config /etc/radixpert/serve.toml",
                 "KillSignal=SIGTERM", "UMask=0077", "[Install]"):
        assert line in unit


def test_docs_reference_every_configuration_key():
    """docs/serve.md's table names every key the loader accepts, so the reference cannot fall behind."""
    import dataclasses

    from radixpert.serve import config as c

    docs = (ROOT / "docs" / "serve.md").read_text()
    for section, kind in c._SECTIONS.items():
        for f in dataclasses.fields(kind):
            assert f"`{section}.{f.name}`" in docs or f"`{section}.{f.name}`," in docs, f"{section}.{f.name}"
    for kind in (c.RoutingRule, c.Destination):
        for f in dataclasses.fields(kind):
            assert f"`{f.name}`" in docs, f.name


def test_help_documents_the_node():
    done = cli("--help")
    assert done.returncode == 0
    for words in ("--config", "check-config", "SIGTERM", "Exit codes", "--http-token-file", "/metrics"):
        assert words in done.stdout


def test_queue_deduplicates_bounds_and_resumes(tmp_path):
    q = Queue(tmp_path)
    assert q.admit("1.2.3", None, "PACS", "a.dcm", max_jobs=2, reprocess=False) == ("accepted", 1)
    assert q.admit("1.2.3", None, "PACS", "b.dcm", max_jobs=2, reprocess=False) == ("duplicate", 1)
    assert q.admit("1.2.3", None, "PACS", "c.dcm", max_jobs=2, reprocess=True) == ("accepted", 2)
    assert q.admit("1.2.4", None, "PACS", "d.dcm", max_jobs=2, reprocess=False) == ("full", None)
    claimed, failed = q.claim(1, max_starts=3)
    assert [j.id for j in claimed] == [1] and not failed
    q.close()
    q = Queue(tmp_path)  # a node killed while job 1 ran
    assert q.recover() == 1
    assert q.counts()["jobs"]["received"] == 2
    for _ in range(2):  # two more starts that never finish
        q.claim(2, max_starts=3)
        q.recover()
    claimed, failed = q.claim(2, max_starts=3)
    assert [j.id for j in failed] == [1] and [j.id for j in claimed] == [2]
    assert "stopped 3 times" in q.job(1)["reason"]


def test_deliveries_back_off_go_dead_and_retry(tmp_path):
    q = Queue(tmp_path)
    q.admit("1.2.3", None, "PACS", "a.dcm", max_jobs=5, reprocess=False)
    q.claim(1, 3)
    q.finish(1, "done", result={"report": "x"}, sr="1.dcm", destinations=["pacs", "folder"])
    assert {d["destination"] for d in q.due("pacs") + q.due("folder")} == {"pacs", "folder"}
    delivery = q.due("pacs")[0]
    before = time.time()
    assert q.delivery_failed(delivery["id"], "refused", max_attempts=3, backoff_s=10, max_backoff_s=15) == "retrying"
    assert q.due("pacs") == []  # backing off
    waits = []
    for _ in range(2):
        q.delivery_failed(delivery["id"], "refused", max_attempts=3, backoff_s=10, max_backoff_s=15)
        waits.append(q.job(1)["deliveries"][1]["next_at"] - before)
    assert 14 < waits[0] < 16  # 10 * 2, capped at 15
    assert q.job(1)["deliveries"][1]["state"] == "dead"
    assert q.retry(1) == {"deliveries": 1, "jobs": 0}
    assert q.due("pacs")[0]["state"] == "pending"
    q.delivered(q.due("pacs")[0]["id"])
    assert q.counts()["deliveries"] == {"folder/pending": 1, "pacs/sent": 1}


def test_routing_rules():
    rules = [RoutingRule(modality=["CR", "DX"], view_position=["PA", "AP", ""])]
    assert routed([], {"modality": "CT"})
    assert routed(rules, {"modality": "DX", "body_part": "CHEST", "view_position": "PA"})
    assert routed(rules, {"modality": "CR", "body_part": "", "view_position": ""})  # "" matches a missing attribute
    assert not routed(rules, {"modality": "DX", "body_part": "CHEST", "view_position": "LATERAL"})
    assert not routed(rules, {"modality": "CT", "body_part": "CHEST", "view_position": "PA"})


def test_negotiated_syntaxes_are_the_readers():
    names = {ts.name for ts in decodable_syntaxes()}
    assert {"Explicit VR Little Endian", "Implicit VR Little Endian", "RLE Lossless",
            "JPEG 2000 Image Compression (Lossless Only)"} <= names


def test_corrupt_jpeg2000_is_refused_in_one_line_not_aborted(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from serve_inputs import bad_inputs

    path, _ = bad_inputs(tmp_path)["corrupt pixel data"]
    code = ("import sys\nfrom radixpert.errors import InputError\nfrom radixpert.imageio import read_display\n"
            f"try:\n    read_display({str(path)!r})\nexcept InputError as e:\n    print('refused', e); sys.exit(3)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3 and "pixel data cannot be decoded" in done.stdout, done.stderr[-300:]
