"""A hub id that cannot be loaded says why (not cached and offline, hub unreachable, no such repo), names the id
and the config key that takes a local folder instead, for every loader of pipelines and models.

Each case runs in a fresh interpreter with an empty HF_HOME, so the hub client's settings (read at import)
and its cache are the test's own; the hub endpoint is either absent (offline) or a server on 127.0.0.1.
"""

import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Runs in the child: each loader on an id that is not cached; prints {loader: error message}.
CHILD = r"""
import json, sys
from diffusion_dpo import models, sampling
from diffusion_dpo.errors import InputError
from diffusion_dpo.llm import models as llm_models

repo = sys.argv[1]
loaders = {
    "load_components": lambda: models.load_components(repo),
    "load_pipeline": lambda: sampling.load_pipeline(repo, device="cpu", option="tuned.pretrained"),
    "load_tokenizer": lambda: llm_models.load_tokenizer(repo),
    "load_causal_lm": lambda: llm_models.load_causal_lm(repo),
    "load_score_model": lambda: llm_models.load_score_model(repo, pad_token_id=0, option="reward.model"),
}
out = {}
for name, load in loaders.items():
    try:
        load()
        out[name] = "loaded"
    except InputError as e:
        out[name] = str(e)
print(json.dumps(out))
"""

OPTIONS = {
    "load_components": "model.pretrained",
    "load_pipeline": "tuned.pretrained",
    "load_tokenizer": "model.name_or_path",
    "load_causal_lm": "model.name_or_path",
    "load_score_model": "reward.model",
}


def _run_child(tmp_path, repo: str, **env: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_")) and "proxy" not in k.lower()}
    clean.update(HF_HOME=str(tmp_path / "hf-home"), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env)
    done = subprocess.run([sys.executable, "-c", CHILD, repo], env=clean, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_offline_and_not_cached_names_the_id_and_the_option(tmp_path):
    messages = _run_child(tmp_path, "someone/not-cached", HF_HUB_OFFLINE="1")
    assert set(messages) == set(OPTIONS)
    for loader, message in messages.items():
        assert "'someone/not-cached' is not in the local hub cache" in message, (loader, message)
        assert "offline mode is on" in message, (loader, message)
        assert f"{OPTIONS[loader]}=PATH" in message, (loader, message)
        assert "model_index.json" not in message, (loader, message)


class _NoSuchRepo(http.server.BaseHTTPRequestHandler):
    """Answers every request as the hub does for a repo that does not exist."""

    def _answer(self):
        body = json.dumps({"error": "Repository not found"}).encode()
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("X-Error-Message", "Repository not found")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_POST = _answer

    def log_message(self, *args):
        pass


@pytest.fixture
def no_such_repo_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NoSuchRepo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_repo_the_hub_does_not_have_says_no_such_repo(tmp_path, no_such_repo_hub):
    messages = _run_child(tmp_path, "someone/no-such-repo", HF_ENDPOINT=no_such_repo_hub)
    assert set(messages) == set(OPTIONS)
    for loader, message in messages.items():
        assert "'someone/no-such-repo': no such repo on the hub" in message, (loader, message)
        assert f"{OPTIONS[loader]}=PATH" in message, (loader, message)


def test_an_unreachable_hub_says_so(tmp_path):
    # Port 9 (discard) on this machine refuses connections: the probe fails at once, no retries.
    messages = _run_child(tmp_path, "someone/not-cached", HF_ENDPOINT="http://127.0.0.1:9")
    for loader, message in messages.items():
        assert "is not in the local hub cache, and the hub (127.0.0.1) cannot be reached" in message, (loader,
                                                                                                       message)
        assert f"{OPTIONS[loader]}=PATH" in message, (loader, message)
