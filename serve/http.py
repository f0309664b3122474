"""The node's HTTP side (FastAPI on uvicorn): health, readiness, metrics, the jobs API and a review page.

Bound to 127.0.0.1 by default. With a token (required off loopback), every route but
``/healthz`` needs ``Authorization: Bearer <token>`` or ``?token=<token>`` (the review page and
its overlay images, for a browser); without it they answer 401.
"""

from __future__ import annotations

import html
import secrets
import threading
import time
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from radixpert.serve.queue import JOB_STATES


def build_app(node: Any) -> FastAPI:
    """The routes, reading ``node.queue``, ``node.metrics``, ``node.ready`` and ``node.config``."""
    app = FastAPI(title="Radixpert Edge node", docs_url=None, redoc_url=None, openapi_url=None)
    token = node.token

    @app.middleware("http")
    async def require_token(request: Request, call_next: Any) -> Response:
        if token and request.url.path != "/healthz":
            given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
            given = given or request.query_params.get("token", "")
            if not secrets.compare_digest(given.encode(), token.encode()):
                return JSONResponse({"detail": "a valid token is required"}, status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        ready = node.ready.is_set()
        return JSONResponse({"ready": ready, "model": "loaded" if ready else "loading"}, status_code=200 if ready else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(node.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/api/jobs")
    def jobs(limit: int = 100, state: str | None = None, after: int = 0) -> dict[str, Any]:
        if state is not None and state not in JOB_STATES:
            raise HTTPException(400, f"state must be one of {', '.join(JOB_STATES)}")
        return {"jobs": node.queue.jobs(limit=max(1, min(limit, 10000)), state=state, after=after),
                "counts": node.queue.counts()}

    @app.get("/api/jobs/{job_id}")
    def job(job_id: int) -> dict[str, Any]:
        found = node.queue.job(job_id)
        if found is None:
            raise HTTPException(404, f"no job {job_id}")
        return found

    @app.get("/api/jobs/{job_id}/overlay.png")
    def overlay(job_id: int) -> FileResponse:
        path = Path(node.config.spool) / "overlay" / f"{job_id}.png"
        if node.queue.job(job_id) is None or not path.exists():
            raise HTTPException(404, f"no overlay for job {job_id}")
        return FileResponse(path, media_type="image/png")

    @app.post("/api/jobs/{job_id}/retry")
    def retry(job_id: int) -> dict[str, Any]:
        if node.queue.job(job_id) is None:
            raise HTTPException(404, f"no job {job_id}")
        changed = node.queue.retry(job_id)
        node.wake()
        return {"job": job_id, "requeued": changed}

    @app.get("/", response_class=HTMLResponse)
    def review(request: Request) -> str:
        suffix = f"?token={html.escape(request.query_params['token'])}" if token and "token" in request.query_params else ""
        return render_review(node.queue.jobs(limit=node.config.http.page_jobs), node.queue.counts(),
                             node.config.http.refresh_s, node.config.dicom.ae_title, suffix)

    return app


def render_review(jobs: list[dict[str, Any]], counts: dict[str, Any], refresh_s: int, ae_title: str,
                  suffix: str = "") -> str:
    """The review page: the latest drafts with overlay, report, findings and verdicts (server-rendered)."""
    page = Template(resources.files("radixpert.serve").joinpath("review.html").read_text(encoding="utf-8"))
    cards = "\n".join(_card(job, suffix) for job in jobs) or '<p class="empty">No jobs yet.</p>'
    summary = " · ".join(f"{state}: {n}" for state, n in counts["jobs"].items())
    return page.substitute(refresh=int(refresh_s), ae_title=html.escape(ae_title), summary=html.escape(summary),
                           updated=time.strftime("%Y-%m-%d %H:%M:%S"), cards=cards)


def _card(job: dict[str, Any], suffix: str) -> str:
    e = html.escape
    result = job.get("result") or {}
    state = job["state"]
    parts = [f'<section class="job {e(state)}" id="job-{job["id"]}">',
             f'<h2>Job {job["id"]} <span class="state">{e(state)}</span></h2>',
             f'<p class="uid">SOP Instance UID {e(job["sop_instance_uid"])}</p>']
    if job.get("has_overlay"):
        parts.append(f'<img src="/api/jobs/{job["id"]}/overlay.png{suffix}" alt="overlay of job {job["id"]}">')
    if job.get("reason"):
        parts.append(f'<p class="reason">{e(job["reason"])}</p>')
    if result.get("report"):
        parts.append(f'<blockquote class="report">{e(result["report"])}</blockquote>')
    findings = result.get("findings") or []
    if findings:
        items = "".join(f"<li>{e(str(f.get('label')))}"
                        f"{' (' + e(str(f.get('side'))) + ')' if f.get('side') else ''}"
                        f" — {e(str(f.get('presence')))}</li>" for f in findings)
        parts.append(f'<ul class="findings">{items}</ul>')
    if result.get("gate"):
        parts.append(f'<p class="gate">Anatomy gate: {e(str(result["gate"].get("verdict")))}</p>')
    checks = [c for c in result.get("checks") or [] if c.get("verdict") not in ("consistent",)]
    if checks:
        items = "".join(f"<li>{e(str(c.get('verdict')))}: {e(str(c.get('message')))}</li>" for c in checks)
        parts.append(f'<ul class="checks">{items}</ul>')
    parts.append("</section>")
    return "\n".join(parts)


class HttpServer:
    """uvicorn in a thread (its signal handlers stay off: the node handles SIGTERM)."""

    def __init__(self, app: FastAPI, host: str, port: int):
        config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False, lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="radixpert-http", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise OSError("the HTTP server did not start (is the port in use?)")
            time.sleep(0.05)

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
