"""``diffusion-dpo serve``: any scorer behind HTTP, for ``scorer.name=remote scorer.url=...`` elsewhere.

    diffusion-dpo serve scorer.name=pickscore scorer.options.batch_size=64 host=0.0.0.0 port=8000 token=s3cret
    diffusion-dpo grpo ... scorer.name=remote scorer.url=http://gpu-box:8000 scorer.token=s3cret

The server (scorers.server) batches the images of concurrent requests into one scorer call (``batch_size``
images, waiting at most ``max_wait_ms`` for them), checks the bearer ``token``, refuses a body over
``max_request_mb`` with 413 and a corrupt image with 400 naming its index, and keeps serving. Endpoints:
GET /health, GET /info, POST /score (docs/score.md, "Serving a scorer"). Ctrl-C or SIGTERM stops it.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import threading
from dataclasses import dataclass
from typing import Optional

from diffusion_dpo.config import option, parse_args
from diffusion_dpo.errors import InputError
from diffusion_dpo.labeling.scoring import ScorerConfig, command_line_keys, scorer_options, shown

TOKEN_VARIABLE = "DIFFUSION_DPO_SCORER_TOKEN"


@dataclass
class ServeConfig:
    scorer: ScorerConfig = option(ScorerConfig, "the scorer to serve and its options (scorer.name, "
                                  "scorer.options.*)")
    device: Optional[str] = option(None, "device to score on when scorer.options names none (cpu, cuda, cuda:1); "
                                   "null: the scorer's default (cuda when available, else cpu)")
    host: str = option("127.0.0.1", "address to listen on: 127.0.0.1 this machine only, 0.0.0.0 every "
                       "interface (then a token is required)")
    port: int = option(8000, "TCP port to listen on; 0: a free port (the printed url names it)",
                       lambda v: 0 <= v <= 65535, "a port number in 0..65535")
    token: Optional[str] = option(None, "bearer token clients must send; null: the DIFFUSION_DPO_SCORER_TOKEN "
                                  "environment variable, else none (allowed only on a loopback host)")
    batch_size: int = option(32, "images of concurrent requests gathered into one scorer call",
                             lambda v: v >= 1, "a positive number of images")
    max_wait_ms: float = option(10.0, "how long the first queued request waits for others to join its batch, "
                                "in milliseconds", lambda v: v >= 0, "a number of milliseconds >= 0")
    max_request_mb: float = option(64.0, "largest request body accepted, in MB (10^6 bytes, base64 images "
                                   "included); larger ones get 413", lambda v: v > 0, "a positive number of MB")
    verbose: bool = option(False, "log every request to stderr")

    def check(self) -> None:
        if self.scorer.name == "remote":
            raise InputError("config key 'scorer.name': serve runs a scorer here; remote would forward to "
                             "another server (serve that server's scorer instead)")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) only reaches this machine."""
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def build_server(cfg: ServeConfig):
    """The scorer ``cfg`` names, loaded, behind a scorers.server.ScoreServer (not yet serving)."""
    import scorers
    from scorers.server import ScoreServer

    token = cfg.token if cfg.token is not None else (os.environ.get(TOKEN_VARIABLE) or None)
    if token is None and not is_loopback(cfg.host):
        raise InputError(f"config key 'token': host={cfg.host} reaches other machines, so the server needs a token "
                         f"(token=... or the {TOKEN_VARIABLE} environment variable)")
    options = scorer_options(cfg.scorer.name, cfg.scorer.load_options(), cfg.device)
    try:
        scorer = scorers.load_scorer(cfg.scorer.name, **options)
    except InputError as e:
        raise InputError(command_line_keys(str(e), cfg.scorer.name)) from None
    except (OSError, TypeError) as e:  # missing weights, an option the scorer does not take
        raise InputError(f"cannot load scorer {cfg.scorer.name!r} with options {shown(options)}: {e}") from None
    return ScoreServer(scorer, host=cfg.host, port=cfg.port, token=token, batch_size=cfg.batch_size,
                       max_wait_ms=cfg.max_wait_ms, max_request_mb=cfg.max_request_mb,
                       options=dict(cfg.scorer.options), verbose=cfg.verbose)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM (kill, a job scheduler) stops the server as Ctrl-C does


def run(cfg: ServeConfig) -> None:
    """Serve until Ctrl-C or SIGTERM; the first line printed names the url."""
    server = build_server(cfg)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    access = "a bearer token" if server.token else "no token"
    print(f"serving {server.scorer.name} at {server.url} (needs {access}; batch_size {cfg.batch_size}, "
          f"max_request_mb {cfg.max_request_mb:g}); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", flush=True)
    finally:
        server.close()


def main(argv: list[str]) -> int:
    cfg = parse_args(ServeConfig, argv, prog="diffusion-dpo serve", description=__doc__.split("\n\n")[0])
    run(cfg)
    return 0
