"""The scoring server and the remote scorer: the same scores as in process from two clients at once,
concurrent requests batched into one scorer call, the token, a corrupt image and an oversized request
answered without harm, a dead server as a clear error, and grpo training against a server that dies mid-run
and resumes once it is back."""

import base64
import io
import json
import threading
import urllib.error
import urllib.request

import pytest
import torch
from PIL import Image
from run_files import metrics, same, weights

from diffusion_dpo import cli
from diffusion_dpo.config import load_config
from diffusion_dpo.errors import InputError, RunError
from diffusion_dpo.labeling.scoring import ScorerConfig, scorer_identity
from diffusion_dpo.labeling.scoring import load_scorer as load_scorer_section
from diffusion_dpo.recipes import grpo
from diffusion_dpo.recipes.grpo_config import GrpoConfig
from diffusion_dpo.recipes.serve import ServeConfig, build_server
from diffusion_dpo.tiny import build_tiny_pipeline
from scorers import load_scorer
from scorers.server import Batcher, ScoreServer

TOKEN = "s3cret"
PROMPTS = ["a large red circle on a blue background", "a small green square on a white background"]


def png64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def post(url: str, body: bytes, token: str | None = TOKEN) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url + "/score", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def images(n: int, seed: int, size: int = 32) -> list:
    pixels = torch.randint(0, 256, (n, size, size, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return [Image.fromarray(p.numpy()) for p in pixels]


@pytest.fixture
def served():
    """A brightness server on a free port: small batches, a 0.2 MB request limit."""
    server = ScoreServer(load_scorer("brightness"), token=TOKEN, batch_size=8, max_request_mb=0.2).start()
    yield server
    server.close()


@pytest.mark.parametrize("name", ["brightness", "jpeg_incompressibility", "shapes"])
def test_two_clients_at_once_get_the_in_process_scores(name):
    server = ScoreServer(load_scorer(name), token=TOKEN, batch_size=4, max_wait_ms=20).start()
    try:
        remote = load_scorer("remote", url=server.url, token=TOKEN, batch_size=3)
        assert remote.needs_prompts == (name == "shapes") and remote.served == name
        local = load_scorer(name)
        inputs = [(images(5, seed=1), PROMPTS[0]), (torch.rand(4, 3, 24, 24, generator=torch.Generator().manual_seed(2)),
                                                     PROMPTS[1])]
        got = [None, None]

        def client(i):
            got[i] = remote.score(*inputs[i])

        threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for (batch, prompt), scores in zip(inputs, got):
            assert torch.equal(scores, local.score(batch, prompt))  # PNG is lossless: bit for bit
    finally:
        server.close()


class Recording:
    """A brightness scorer that records how many images each call got; the first call waits for ``release``."""

    name, needs_prompts, report_scale = "recording", False, 1.0

    def __init__(self):
        self.inner, self.calls = load_scorer("brightness"), []
        self.entered, self.release = threading.Event(), threading.Event()

    def score(self, images, prompts):
        self.entered.set()
        if not self.calls:
            self.release.wait(30)
        self.calls.append(len(images))
        return self.inner.score(images, prompts)


def test_requests_queued_together_are_scored_in_one_call():
    """While the worker scores request A, requests B and C queue; then both go into one call (4 + 3 images
    <= batch_size 8), and each gets its own slice back."""
    scorer = Recording()
    batcher = Batcher(scorer, batch_size=8, max_wait_s=0.0)
    results = {}
    parts = {"a": images(2, 1), "b": images(4, 2), "c": images(3, 3)}

    def submit(key):
        results[key] = batcher.score(parts[key], [""] * len(parts[key]))

    first = threading.Thread(target=submit, args=("a",))
    first.start()
    assert scorer.entered.wait(30)  # A taken by the worker, which now waits in the scorer
    others = [threading.Thread(target=submit, args=(k,)) for k in "bc"]
    for t in others:
        t.start()
    while batcher.jobs.qsize() < 2:
        threading.Event().wait(0.01)
    scorer.release.set()
    for t in [first, *others]:
        t.join()
    batcher.stop()
    assert scorer.calls == [2, 7]
    for key, part in parts.items():
        assert results[key] == scorer.inner.score(part).tolist()


def test_token_is_required_and_health_is_open(served):
    body = json.dumps({"images": [png64(images(1, 0)[0])]}).encode()
    assert post(served.url, body, token=None)[0] == 401
    status, answer = post(served.url, body, token="wrong")
    assert status == 401 and "wrong token" in answer["error"]
    assert post(served.url, body)[0] == 200
    with urllib.request.urlopen(served.url + "/health", timeout=30) as answer:
        assert json.loads(answer.read()) == {"status": "ok"}
    with pytest.raises(InputError, match="401"):
        load_scorer("remote", url=served.url)
    info = load_scorer("remote", url=served.url, token=TOKEN).info
    assert info["scorer"] == "brightness" and info["batch_size"] == 8 and info["max_request_mb"] == 0.2


def test_a_corrupt_image_is_a_400_naming_it_and_the_server_goes_on(served):
    good = png64(images(1, 0)[0])
    corrupt = base64.b64encode(b"\x89PNG\r\n\x1a\n this is not the rest of a png").decode()
    status, answer = post(served.url, json.dumps({"images": [good, corrupt]}).encode())
    assert status == 400 and answer["error"].startswith("image 1 is not a readable")
    status, answer = post(served.url, json.dumps({"images": [good, "%%%"]}).encode())
    assert status == 400 and answer["error"].startswith("image 1 is not valid base64")
    assert post(served.url, b"not json")[0] == 400
    jpeg = io.BytesIO()
    images(1, 5)[0].save(jpeg, format="JPEG", quality=80)
    status, answer = post(served.url, json.dumps({"images": [base64.b64encode(jpeg.getvalue()).decode()]}).encode())
    assert status == 200 and answer["scores"] == load_scorer("brightness").score(Image.open(jpeg)).tolist()
    status, answer = post(served.url, json.dumps({"images": [good]}).encode())
    assert status == 200 and answer["scores"] == load_scorer("brightness").score(images(1, 0)).tolist()


def test_an_oversized_request_is_a_413_and_the_server_goes_on(served):
    big = json.dumps({"images": [png64(images(1, 0, size=256)[0])]}).encode()  # random pixels: ~260 kB of PNG
    assert len(big) > 0.2e6
    status, answer = post(served.url, big)
    assert status == 413 and "max_request_mb=0.2" in answer["error"]
    remote = load_scorer("remote", url=served.url, token=TOKEN)
    with pytest.raises(InputError, match="413"):
        remote.score(images(1, 0, size=256))
    assert remote.score(images(2, 0)).tolist() == load_scorer("brightness").score(images(2, 0)).tolist()


def test_a_dead_server_is_a_clear_error(served):
    url = served.url
    remote = load_scorer("remote", url=url, token=TOKEN, retries=1, backoff=0.01)
    served.close()
    with pytest.raises(RunError, match=f"{url} stopped answering.*resume=auto"):
        remote.score(images(1, 0))
    with pytest.raises(InputError, match=f"no scoring server answers at {url}"):
        load_scorer("remote", url=url, retries=0)
    with pytest.raises(InputError, match="option url="):
        load_scorer("remote", url="localhost:8000")


def test_serve_config_refuses_an_open_server_on_the_network(monkeypatch):
    monkeypatch.delenv("DIFFUSION_DPO_SCORER_TOKEN", raising=False)
    with pytest.raises(InputError, match="needs a token"):
        build_server(load_config(ServeConfig, [], ["host=0.0.0.0", "scorer.name=brightness"]))
    server = build_server(load_config(ServeConfig, [], ["port=0", "scorer.name=jpeg_compressibility",
                                                        "scorer.options.quality=90"]))
    try:
        assert server.info()["options"] == {"quality": 90} and server.token is None
    finally:
        server.close()


def test_score_and_label_take_scorer_url_and_token(served, tmp_path, capsys):
    """`score scorer.name=remote scorer.url=... scorer.token=...` prints the in-process scores; the url and
    token are not part of what a label run's scores mean (a resume may name another server)."""
    path = tmp_path / "a.png"
    images(1, 3)[0].save(path)
    assert cli.main(["score", "scorer.name=remote", f"scorer.url={served.url}", f"scorer.token={TOKEN}",
                     str(path)]) == 0
    expected = load_scorer("brightness").score(Image.open(path)).item()
    assert capsys.readouterr().out == f"{path}\t{expected:.6f}\n"
    section = ScorerConfig(name="remote", options={"timeout": 5, "quality": 1}, url=served.url, token=TOKEN)
    assert scorer_identity(section) == {"name": "remote", "options": {"quality": 1}}
    section.options = {"timeout": 5}
    assert load_scorer_section(section, None).url == served.url
    section.options = {"quality": 1}
    with pytest.raises(InputError, match="quality") as refused:
        load_scorer_section(section, None)
    assert TOKEN not in str(refused.value)  # the token is never printed
    with pytest.raises(InputError, match="both given"):
        ScorerConfig(name="remote", options={"url": served.url}, url=served.url).load_options()
    assert cli.main(["score", "scorer.name=brightness", f"scorer.url={served.url}", str(path)]) == 2
    assert "are for scorer.name=remote" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- grpo

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    (root / "prompts.txt").write_text("a red circle\na blue square\na green triangle\na black cat\n")
    return {"prompts": str(root / "prompts.txt"), "sd": str(build_tiny_pipeline(root / "sd", family="sd"))}


def grpo_config(world, out, *overrides: str) -> GrpoConfig:
    base = [f"model.pretrained={world['sd']}", f"prompts.source={world['prompts']}", "online.prompts_per_step=2",
            "online.group_size=2", "sampling.num_inference_steps=2", "online.train_steps=1", "optim.batch_size=4",
            "optim.max_steps=2", "optim.learning_rate=1e-2", "checkpoint_every=0", "tensorboard=false",
            f"output_dir={out}"]
    return load_config(GrpoConfig, [], [*base, *overrides])


class DiesOnCall(Recording):
    """Brightness until its ``call``-th call, which shuts its server down before answering."""

    def __init__(self, call: int):
        super().__init__()
        self.release.set()
        self.call, self.server = call, None

    def score(self, images, prompts):
        if len(self.calls) + 1 == self.call:
            self.server.httpd.shutdown()
            self.server.httpd.server_close()
            raise OSError("the test killed this server")
        return super().score(images, prompts)


def test_grpo_trains_against_a_server_that_dies_and_comes_back(world, tmp_path):
    """Step 3's scoring kills the server: the run stops with a RunError naming the url, resume=auto continues
    from step 2's checkpoint once a server is back on the same port, and the result equals an undisturbed
    run with the scorer in process, bit for bit."""
    torch.set_num_threads(1)
    dying = DiesOnCall(call=3)
    server = dying.server = ScoreServer(dying, token=TOKEN).start()
    port = server.httpd.server_address[1]
    remote = ["scorer.name=remote", f"scorer.url={server.url}", f"scorer.token={TOKEN}", "scorer.options.retries=1",
              "scorer.options.backoff=0.01", "optim.max_steps=4", "checkpoint_every=2"]
    with pytest.raises(RunError, match=f"{server.url} stopped answering"):
        grpo.run(grpo_config(world, tmp_path / "remote", *remote))
    server.batcher.stop()
    back = ScoreServer(load_scorer("brightness"), port=port, token=TOKEN).start()
    try:
        result = grpo.run(grpo_config(world, tmp_path / "remote", *remote, "resume=auto"))
    finally:
        back.close()
    assert result.steps == 4 and result.resumed_from.endswith("step-2")
    grpo.run(grpo_config(world, tmp_path / "local", "scorer.name=brightness", "optim.max_steps=4",
                         "checkpoint_every=2"))
    assert same(weights(tmp_path / "remote" / "final"), weights(tmp_path / "local" / "final"))
    rewards = [[r["reward_mean"] for r in metrics(tmp_path / run) if "reward_mean" in r] for run in ("remote", "local")]
    assert rewards[0][-2:] == rewards[1][-2:] and len(rewards[1]) == 4
