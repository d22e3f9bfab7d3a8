"""Any scorer behind HTTP, so a reward can live in its own environment or on its own GPU.

    server = ScoreServer(load_scorer("pickscore"), port=8000, token="s3cret", batch_size=32)
    server.serve_forever()        # or server.start() to serve from background threads, server.close() to stop

Endpoints (JSON in and out, ``Authorization: Bearer <token>`` on all but /health when a token is set):

    GET  /health   {"status": "ok"}                         liveness, open to all (load balancers, scripts)
    GET  /info     {"scorer", "options", "version", "needs_prompts", "report_scale", "batch_size",
                    "max_request_mb"}
    POST /score    {"images": [base64 PNG/JPEG/WebP bytes, ...], "prompts": [str, ...] | str | null}
                -> {"scores": [float, ...]}                 one float per image, in order

Errors answer ``{"error": message}``: 400 for a request that does not fit (a corrupt image names its index),
401 for a missing or wrong token, 404 for another path, 411 without a Content-Length, 413 for a body over
``max_request_mb``, 500 when the scorer itself failed (its traceback goes to the server's stderr). None of
them stops the server.

Batching: each request thread decodes its images and queues them; one worker thread takes the queued
requests together until they hold ``batch_size`` images or ``max_wait_ms`` has passed since the first, scores
them in one ``scorer.score`` call and hands each request its slice. The scorer is only ever called from
that worker, so a scorer need not be thread-safe. Imports only the standard library, torch and PIL.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from scorers.errors import InputError

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
MB = 1_000_000  # bytes; max_request_mb counts in decimal megabytes
# A body this many times over the limit is not read before the 413 (the connection is closed instead);
# smaller ones are read and dropped so the client, still sending, gets the answer rather than a reset.
_DRAIN_FACTOR = 8


def version() -> str:
    """The installed diffusion-dpo version (the scorers ship inside it), or "unknown" from a bare checkout."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        return package_version("diffusion-dpo")
    except PackageNotFoundError:
        return "unknown"


class RequestError(Exception):
    """A request the server answers with ``status`` and ``message`` (and keeps serving)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class _Job:
    """One request's decoded images [n] and prompts [n], waiting for the worker."""

    images: list
    prompts: list[str]
    done: threading.Event = field(default_factory=threading.Event)
    scores: list[float] | None = None
    error: RequestError | None = None


def decode_images(encoded: Any) -> list:
    """``encoded`` (a non-empty list of base64 strings of PNG, JPEG or WebP files) as loaded PIL images.
    A RequestError(400) names the first item that is not such an image."""
    from PIL import Image

    if not isinstance(encoded, list) or not encoded:
        raise RequestError(400, "'images' must be a non-empty list of base64-encoded PNG, JPEG or WebP files")
    images = []
    for i, item in enumerate(encoded):
        if not isinstance(item, str):
            raise RequestError(400, f"image {i} is a {type(item).__name__}; expected a base64 string")
        try:
            data = base64.b64decode(item, validate=True)
        except (binascii.Error, ValueError) as e:
            raise RequestError(400, f"image {i} is not valid base64: {e}") from None
        try:
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
                image.load()
                images.append(image.copy())
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise RequestError(400, f"image {i} is not a readable {'/'.join(IMAGE_FORMATS)} image: "
                                    f"{type(e).__name__}: {e}") from None
    return images


def check_request_prompts(prompts: Any, n: int, required: bool, scorer: str) -> list[str]:
    """The request's ``prompts`` as ``n`` strings (one string for all, or one each; none when the scorer
    reads no prompt)."""
    if prompts is None:
        if required:
            raise RequestError(400, f"scorer {scorer} reads prompts: send 'prompts' (one string per image, or "
                                    "one string for all)")
        return [""] * n
    if isinstance(prompts, str):
        return [prompts] * n
    if not isinstance(prompts, list) or len(prompts) != n or not all(isinstance(p, str) for p in prompts):
        raise RequestError(400, f"'prompts' must be a string or a list of {n} strings (one per image)")
    return prompts


class Batcher:
    """Gathers the queued jobs into batches of up to ``batch_size`` images (waiting at most ``max_wait_s``
    after the first) and scores each batch in one call of ``scorer.score``, on one worker thread."""

    def __init__(self, scorer, batch_size: int, max_wait_s: float):
        self.scorer, self.batch_size, self.max_wait_s = scorer, batch_size, max_wait_s
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="scorer-batcher", daemon=True)
        self.thread.start()

    def score(self, images: list, prompts: list[str]) -> list[float]:
        """Scores [n] of one request's images, scored together with whatever other requests are queued."""
        job = _Job(images, prompts)
        self.jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.scores

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join()

    def _work(self) -> None:
        while (first := self.jobs.get()) is not None:
            batch, count = [first], len(first.images)
            deadline = time.monotonic() + self.max_wait_s
            stop = False
            while count < self.batch_size:
                left = deadline - time.monotonic()
                try:  # what is queued already joins even after the wait is over
                    job = self.jobs.get(timeout=left) if left > 0 else self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
                count += len(job.images)
            self._run(batch)
            if stop:
                return

    def _run(self, batch: list[_Job]) -> None:
        """Score ``batch`` in one call; if that fails, score each job alone, so one request's bad input
        fails that request only."""
        try:
            scores = self._scores([im for job in batch for im in job.images], [p for job in batch for p in job.prompts])
        except RequestError as e:
            if len(batch) > 1:
                for job in batch:
                    self._run([job])
                return
            batch[0].error = e
            batch[0].done.set()
            return
        start = 0
        for job in batch:
            job.scores = scores[start:start + len(job.images)]
            start += len(job.images)
            job.done.set()

    def _scores(self, images: list, prompts: list[str]) -> list[float]:
        try:
            return [float(v) for v in self.scorer.score(images, prompts)]
        except InputError as e:
            raise RequestError(400, str(e)) from None
        except Exception as e:  # the scorer's own failure: report it, keep serving
            traceback.print_exc(file=sys.stderr)
            raise RequestError(500, f"scorer {self.scorer.name} failed: {type(e).__name__}: {e}") from None


class _Handler(BaseHTTPRequestHandler):
    server: "_HTTPServer"
    server_version = "diffusion-dpo-scorer"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        if self.server.app.verbose:
            super().log_message(format, *args)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer(self._get)

    def do_POST(self) -> None:  # noqa: N802
        self._answer(self._post)

    def _answer(self, handle) -> None:
        try:
            status, body = 200, handle()
        except RequestError as e:
            status, body = e.status, {"error": str(e)}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="scorer"')
        self.end_headers()
        self.wfile.write(data)

    def _authorize(self) -> None:
        token = self.server.app.token
        if token is None:
            return
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            what = "a wrong token" if given else "no token"
            raise RequestError(401, f"this server needs 'Authorization: Bearer <token>'; the request had {what}")

    def _get(self) -> dict:
        if self.path == "/health":
            return {"status": "ok"}
        if self.path == "/info":
            self._authorize()
            return self.server.app.info()
        raise RequestError(404, f"no endpoint GET {self.path}; the endpoints are GET /health, GET /info, POST /score")

    def _post(self) -> dict:
        if self.path != "/score":
            raise RequestError(404, f"no endpoint POST {self.path}; the endpoints are GET /health, GET /info, "
                                    "POST /score")
        self._authorize()
        body = self._body()
        try:
            request = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise RequestError(400, f"the body is not JSON: {e}") from None
        if not isinstance(request, dict):
            raise RequestError(400, "the body must be a JSON object with 'images' (and 'prompts')")
        app = self.server.app
        images = decode_images(request.get("images"))
        prompts = check_request_prompts(request.get("prompts"), len(images), app.scorer.needs_prompts, app.scorer.name)
        return {"scores": app.batcher.score(images, prompts)}

    def _body(self) -> bytes:
        """The request body, at most max_request_mb; a larger one is refused with 413."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError(411, "POST /score needs a Content-Length header")
        size, limit = int(length), self.server.app.max_request_bytes
        if size > limit:
            if size <= _DRAIN_FACTOR * limit:
                left = size
                while left > 0 and (chunk := self.rfile.read(min(MB, left))):
                    left -= len(chunk)
            else:
                self.close_connection = True
            raise RequestError(413, f"request body of {size / MB:.2f} MB is over this server's max_request_mb="
                                    f"{limit / MB:g}; send fewer images per request (the remote scorer's "
                                    "scorer.options.batch_size) or start the server with a larger max_request_mb")
        return self.rfile.read(size)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # a restarted server gets its port back at once
    app: "ScoreServer"


class ScoreServer:
    """``scorer`` served over HTTP at ``host:port`` (port 0: a free port, see :attr:`url`).

    ``token``: the bearer token clients must send (None: open to anyone who can reach the port).
    ``batch_size``: images gathered into one scorer call; ``max_wait_ms``: how long the first queued request
    waits for others; ``max_request_mb``: the largest request body accepted (decimal MB, base64 included);
    ``options``: what /info reports as the scorer's options (the token is never among them).
    """

    def __init__(self, scorer, *, host: str = "127.0.0.1", port: int = 0, token: str | None = None,
                 batch_size: int = 32, max_wait_ms: float = 10.0, max_request_mb: float = 64.0,
                 options: dict | None = None, verbose: bool = False):
        if batch_size < 1 or max_wait_ms < 0 or max_request_mb <= 0:
            raise InputError(f"batch_size={batch_size}, max_wait_ms={max_wait_ms}, max_request_mb={max_request_mb}: "
                             "expected a positive batch size and request limit and a wait of 0 ms or more")
        self.scorer, self.token, self.options, self.verbose = scorer, token or None, dict(options or {}), verbose
        self.batch_size, self.max_request_bytes = batch_size, int(max_request_mb * MB)
        try:
            self.httpd = _HTTPServer((host, port), _Handler)
        except OSError as e:
            raise InputError(f"cannot listen on {host}:{port}: {e} (choose another port, or port=0 for a free one)") from None
        self.httpd.app = self
        self.batcher = Batcher(scorer, batch_size, max_wait_ms / 1000.0)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def info(self) -> dict:
        return {"scorer": self.scorer.name, "options": self.options, "version": version(),
                "needs_prompts": bool(self.scorer.needs_prompts), "report_scale": float(self.scorer.report_scale),
                "batch_size": self.batch_size, "max_request_mb": self.max_request_bytes / MB}

    def serve_forever(self) -> None:
        """Serve until :meth:`close` (from another thread) or Ctrl-C."""
        self.httpd.serve_forever(poll_interval=0.1)

    def start(self) -> "ScoreServer":
        """Serve from a background thread; returns self."""
        self._thread = threading.Thread(target=self.serve_forever, name="scorer-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting requests, free the port and stop the batching worker."""
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
            self._thread = None
        self.httpd.server_close()
        self.batcher.stop()
