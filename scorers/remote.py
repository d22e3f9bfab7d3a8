"""``remote``: a scorer served by ``diffusion-dpo serve`` (scorers.server), behind the same interface.

    scorer = load_scorer("remote", url="http://gpu-box:8000", token="s3cret")
    scores = scorer.score(images, prompts)     # float32 [N] on the CPU, as the served scorer gives them

Images travel as PNG (lossless), so the scores equal the served scorer's in-process scores for the same
images; a float tensor is rounded to 8-bit pixels first, as every scorer here does. ``batch_size`` is the
images per request. Building the scorer asks the server's /info (so a wrong url or token fails at once, as
an InputError); a server that stops answering mid-run raises a RunError after ``retries`` tries spaced by
``backoff`` seconds doubling each time, naming the url and what to do.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import time
import urllib.error
import urllib.request

import torch

from scorers.base import Scorer, to_pil
from scorers.errors import InputError, RunError

TOKEN_VARIABLE = "DIFFUSION_DPO_SCORER_TOKEN"


class _Unreachable(Exception):
    """No answer after every try (connection refused, timeout, 5xx); the message says what happened."""


class RemoteScorer(Scorer):
    """Scores from a scoring server at ``url`` (http:// or https://).

    Options: ``url``; ``token`` (the server's bearer token; default: the DIFFUSION_DPO_SCORER_TOKEN
    environment variable, else none); ``timeout`` (seconds per request, default 120); ``retries`` (tries
    after the first on a connection error, timeout or 5xx answer, default 3); ``backoff`` (seconds before
    the first retry, doubled for each next one, default 1); ``batch_size`` (images per request, default 32).
    ``device``/``dtype`` are accepted for a uniform interface: the server decides where it scores.
    """

    name = "remote"

    def __init__(self, url: str | None = None, *, token: str | None = None, timeout: float = 120.0,
                 retries: int = 3, backoff: float = 1.0, **common):
        common["device"], common["dtype"] = "cpu", None
        super().__init__(**common)
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise InputError(f"remote scorer: option url={url!r}: expected the server's address, e.g. "
                             "http://localhost:8000 (start one with: diffusion-dpo serve scorer.name=...)")
        for key, value, low in (("timeout", timeout, 1e-3), ("retries", retries, 0), ("backoff", backoff, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
                raise InputError(f"remote scorer: option {key}={value!r}: expected a number >= {low:g}")
        if isinstance(retries, float) and not retries.is_integer():
            raise InputError(f"remote scorer: option retries={retries!r}: expected a whole number of tries")
        self.url = url.rstrip("/")
        self.token = token if token is not None else (os.environ.get(TOKEN_VARIABLE) or None)
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        try:
            self.info = self._request("GET", "/info")
        except _Unreachable as e:
            raise InputError(f"remote scorer: no scoring server answers at {self.url} ({e}); start one there with "
                             "`diffusion-dpo serve scorer.name=... port=...`, or correct the url") from None
        self.needs_prompts = bool(self.info.get("needs_prompts", True))
        self.report_scale = float(self.info.get("report_scale", 1.0))
        self.served = str(self.info.get("scorer", "?"))

    def _score_batch(self, images, prompts: list[str]) -> torch.Tensor:
        encoded = []
        for image in to_pil(images):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG", compress_level=1)  # lossless; level 1: speed over size
            encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
        body = {"images": encoded, "prompts": prompts if self.needs_prompts else None}
        try:
            answer = self._request("POST", "/score", body)
        except _Unreachable as e:
            raise RunError(f"the scoring server at {self.url} stopped answering ({e}); start it again (diffusion-dpo "
                           "serve ...) and continue the run with resume=auto") from None
        scores = answer.get("scores") if isinstance(answer, dict) else None
        if not isinstance(scores, list) or len(scores) != len(encoded):
            raise RunError(f"the scoring server at {self.url} answered {str(answer)[:200]!r}; expected "
                           f"{{'scores': [{len(encoded)} numbers]}} (is it a diffusion-dpo scoring server?)")
        return torch.tensor(scores, dtype=torch.float64)

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        """The server's JSON answer; a 4xx answer is an InputError with the server's message; a connection
        error, timeout or 5xx answer is tried again ``retries`` times, then raises _Unreachable."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url + path, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                message = _error_message(e)
                if e.code < 500:
                    hint = (f" (set scorer.token, or the {TOKEN_VARIABLE} environment variable, to the server's "
                            "token)") if e.code == 401 else ""
                    raise InputError(f"the scoring server at {self.url} refused {method} {path} with {e.code}: "
                                     f"{message}{hint}") from None
                problem = f"HTTP {e.code}: {message}"
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
                problem = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        raise _Unreachable(f"{problem}; tried {self.retries + 1} times")


def _error_message(error: urllib.error.HTTPError) -> str:
    """The ``error`` field of a JSON error answer, else its first 200 characters."""
    try:
        text = error.read().decode(errors="replace")
    except OSError:
        return error.reason or ""
    try:
        return str(json.loads(text)["error"])
    except (ValueError, KeyError, TypeError):
        return text[:200]
