"""``radixpert-serve``: run the DICOM node, or check its configuration."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click

from radixpert.errors import ModelError, cli_errors

# Command-line options and the configuration keys they override.
OVERRIDES = {
    "bundle": "model.bundle", "spool": "queue.spool", "ae_title": "dicom.ae_title", "dicom_host": "dicom.host",
    "dicom_port": "dicom.port", "http_host": "http.host", "http_port": "http.port", "http_token": "http.token",
    "http_token_file": "http.token_file", "threads": "model.threads", "batch": "model.batch",
    "reprocess": "queue.reprocess", "log_format": "logging.format", "log_level": "logging.level",
}


def _options(command: Any) -> Any:
    options = [
        click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
                     help="The node's TOML file (docs/serve.md); options below override it."),
        click.option("--bundle", type=click.Path(file_okay=False), default=None, help="Bundle folder (model.bundle)."),
        click.option("--spool", type=click.Path(file_okay=False), default=None,
                     help="Spool folder: received images, the queue, SRs (queue.spool)."),
        click.option("--ae-title", default=None, help="Our AE title (dicom.ae_title)."),
        click.option("--dicom-host", default=None, help="Address the DICOM port binds (dicom.host) [default: 127.0.0.1]."),
        click.option("--dicom-port", type=click.IntRange(0, 65535), default=None, help="DICOM port (dicom.port)."),
        click.option("--http-host", default=None, help="Address the HTTP port binds (http.host) [default: 127.0.0.1]; "
                                                       "any other address needs a token."),
        click.option("--http-port", type=click.IntRange(0, 65535), default=None, help="HTTP port (http.port)."),
        click.option("--http-token", default=None, help="Token for every HTTP route but /healthz (http.token); "
                                                        "prefer --http-token-file, which other users cannot read in ps."),
        click.option("--http-token-file", type=click.Path(dir_okay=False), default=None,
                     help="File holding the HTTP token (http.token_file)."),
        click.option("--threads", type=click.IntRange(1, 256), default=None, help="CPU threads (model.threads)."),
        click.option("--batch", type=click.IntRange(1, 64), default=None,
                     help="Scans decoded together (model.batch) [default: 1]."),
        click.option("--reprocess/--no-reprocess", default=None,
                     help="Make a new job for a SOP Instance UID received before (queue.reprocess) [default: no]."),
        click.option("--log-format", type=click.Choice(["text", "json"]), default=None,
                     help="text, or JSON lines (logging.format)."),
        click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None,
                     help="logging.level [default: info]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _load(config_path: str | None, values: dict[str, Any]):
    from radixpert.serve.config import load_config

    return load_config(config_path, {OVERRIDES[k]: v for k, v in values.items() if k in OVERRIDES})


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@_options
@click.pass_context
@cli_errors()
def main(ctx: click.Context, config_path: str | None, **values: Any) -> None:
    """Run a DICOM node: receive radiographs, write draft reports, send the coded SR back.

    \b
      radixpert-serve --config serve.toml                run the node (systemd: docs/serve.md)
      radixpert-serve check-config --config serve.toml   validate the file, list the remote AEs

    It answers C-ECHO and C-STORE (CR and DX radiographs) from the allowed calling AEs, spools
    every accepted instance and records it in a durable queue (SQLite, WAL) before answering
    success, writes the draft with one loaded model, and delivers the SR by C-STORE, STOW-RS or
    to a folder, with retries. HTTP: /healthz, /readyz, /metrics, /api/jobs and a review page at /.
    Logs carry job ids and SOP Instance UIDs only. SIGTERM: stop accepting, finish the job in
    hand, flush, exit 0; a restart resumes every unfinished job.

    \b
    Exit codes: 0 stopped cleanly (or configuration valid); 2 usage or configuration error (also a
    port in use or a spool used by another node); 4 bundle missing or invalid; 1 internal error
    (RADIXPERT_DEBUG=1 shows the traceback).
    Not for clinical use: every report is a draft for a radiologist to read and sign.
    """
    ctx.ensure_object(dict)
    ctx.obj.update(config_path=config_path, values=values)
    if ctx.invoked_subcommand is None:
        sys.exit(serve(_load(config_path, values)))


@main.command("check-config")
@_options
@click.pass_context
@cli_errors()
def check_config(ctx: click.Context, config_path: str | None, **values: Any) -> None:
    """Validate the configuration and the bundle, and list the AEs and destinations (exit 0 when valid)."""
    from rich.console import Console
    from rich.table import Table

    parent = ctx.obj or {}
    merged = {k: v for k, v in (parent.get("values") or {}).items() if v is not None}
    merged.update({k: v for k, v in values.items() if v is not None})
    config = _load(config_path or parent.get("config_path"), merged)
    if not (Path(config.model.bundle) / "manifest.json").exists():
        raise ModelError(f"model.bundle {config.model.bundle} has no manifest.json; give a folder from radixpert-export")
    out = Console(highlight=False, soft_wrap=True)
    d = config.dicom
    out.print(f"node {d.ae_title} on {d.host}:{d.port}, HTTP on {config.http.host}:{config.http.port}"
              f"{' (token required)' if config.http_token() else ''}; spool {config.spool}")
    table = Table("remote", "role", "AE title / address", title="Remote AEs and destinations")
    for ae in d.allowed_calling_aes:
        table.add_row("sender", "may send (C-ECHO, C-STORE)", "any AE" if ae == "*" else ae)
    for dest in config.destinations:
        table.add_row(dest.name, f"receives SRs ({dest.type})", dest.describe().split(": ", 1)[1])
    out.print(table)
    if config.routing:
        out.print(f"{len(config.routing)} routing rule(s); instances matching none are acknowledged and ignored")
    if not config.destinations:
        out.print("warning: no destinations: SRs stay in the spool and the API")
    out.print("configuration valid")


def serve(config) -> int:
    """Run the node until SIGTERM or SIGINT; 0 after a clean stop."""
    from radixpert.serve import logs
    from radixpert.serve.node import Node

    log = logs.setup(config.logging.format, config.logging.level)
    stop = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        logs.event(log, "signal received", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    node = Node(config, log)
    try:
        node.start()
        while not stop.wait(1.0):
            pass
    finally:
        node.stop()
    return 0


if __name__ == "__main__":
    main()
