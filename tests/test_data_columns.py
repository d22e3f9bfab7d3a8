"""Foreign preference schemas read through ``data.columns``: one small local copy of each documented public
dataset's shape, read with the shipped settings (assets/configs/data/*.yaml), pair by pair.

Every image is an 8x8 solid colour whose red channel is 10 * k, so a batch's pixels say which image
(k) came out as winner and loser: pixel = 10k / 127.5 - 1."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from PIL import Image

from diffusion_dpo.data import (
    ColumnMap,
    DataConfig,
    ImageFetcher,
    PreferencePairs,
    UnreachableImage,
    decode_image,
    open_pairs,
)
from diffusion_dpo.errors import InputError
from diffusion_dpo.tiny import encode_image

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "configs" / "data"


def png(k: int) -> bytes:
    return encode_image(Image.new("RGB", (8, 8), (10 * k, 100, 200)))


def ids(batch) -> list[tuple[int, int]]:
    """(winner k, loser k) of each pair in a batch."""
    red = ((batch["pixel_values"][:, :, 0, 0, 0] + 1) * 127.5).round().long() // 10
    return [tuple(pair) for pair in red.tolist()]


def by_row(batches) -> dict[int, tuple[int, int, str]]:
    """row id -> (winner k, loser k, caption) over a list of batches."""
    out = {}
    for batch in batches:
        for row, (w, loser), caption in zip(batch["row_indices"].tolist(), ids(batch), batch["captions"]):
            out[row] = (w, loser, caption)
    return out


def shipped(name: str, source, tmp_path, **overrides) -> DataConfig:
    """The data settings of assets/configs/data/<name>.yaml, on a local source, at 8 px, no augmentation."""
    data = yaml.safe_load((SHIPPED / f"{name}.yaml").read_text())["data"]
    data = {k: v for k, v in data.items() if k not in ("source", "split")}
    columns = ColumnMap(**data.pop("columns"))
    base = dict(resolution=8, caption_dropout=0.0, random_flip=False, cache_dir=str(tmp_path / "hf-cache"),
                image_cache_dir=str(tmp_path / "images"), fetch_backoff=0.01)
    return DataConfig(source=str(source), columns=columns, **{**base, **data, **overrides})


def image_parquet(path: Path, columns: dict, image_columns: tuple[str, ...]) -> Path:
    """A parquet file whose ``image_columns`` are datasets Image features (as the hub stores them)."""
    features = datasets.Features({
        name: datasets.Image() if name in image_columns else datasets.Value(
            "string" if isinstance(values[0], str) else "int64")
        for name, values in columns.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_dict(
        {k: [{"bytes": v, "path": None} for v in vs] if k in image_columns else vs
         for k, vs in columns.items()},
        features=features)
    ds.to_parquet(str(path))
    return path


def test_every_shipped_config_names_its_command():
    names = sorted(p.stem for p in SHIPPED.glob("*.yaml"))
    assert names == ["hpdv2", "open_image_preferences", "pickapic_v2_urls", "rapidata_700k"]
    for name in names:
        first = (SHIPPED / f"{name}.yaml").read_text().splitlines()[0]
        assert first.startswith("# accelerate launch --num_processes 16 -m diffusion_dpo train --config sd15_train ")
        assert f"--config data/{name} " in first


# ----------------------------------------------------------------------------- open-image-preferences

def test_open_image_preferences_chosen_rejected(tmp_path):
    """prompt / chosen / rejected Image features, no label column: chosen wins every pair."""
    source = image_parquet(tmp_path / "oip" / "train-0.parquet", {
        "prompt": ["a fox", "a lighthouse", "a bowl"],
        "chosen": [png(1), png(3), png(5)], "rejected": [png(2), png(4), png(6)],
        "chosen_model": ["dev"] * 3, "rejected_model": ["sd"] * 3,
    }, ("chosen", "rejected"))
    cfg = shipped("open_image_preferences", source.parent, tmp_path)
    pairs = PreferencePairs(cfg, seed=0)
    assert pairs.num_pairs == 3
    assert by_row([next(pairs.batches(3))]) == {0: (1, 2, "a fox"), 1: (3, 4, "a lighthouse"),
                                                 2: (5, 6, "a bowl")}
    rows = open_pairs(source, columns=cfg.columns, cache_dir=cfg.cache_dir)
    assert rows[1]["jpg_0"]["bytes"] == png(3) and (rows[1]["label_0"], rows[1]["label_1"]) == (1.0, 0.0)


def test_missing_mapped_column_names_source_key_and_columns(tmp_path):
    source = image_parquet(tmp_path / "oip.parquet", {"prompt": ["a"], "chosen": [png(1)], "other": [png(2)]},
                           ("chosen", "other"))
    cfg = shipped("open_image_preferences", source, tmp_path)
    with pytest.raises(InputError) as e:
        PreferencePairs(cfg, seed=0)
    msg = str(e.value)
    assert str(source) in msg and "lacks column 'rejected' (config key 'data.columns.image_1')" in msg
    assert "it has: prompt, chosen, other" in msg
    not_a_list = ColumnMap(caption="prompt", labels="ranks", images="prompt", ranks="prompt")
    with pytest.raises(InputError, match="'data.columns.images' names column 'prompt', which holds string"):
        open_pairs(source, columns=not_a_list, cache_dir=cfg.cache_dir)
    with pytest.raises(InputError, match="'data.columns.labels': expected one of pair, scores, winner"):
        open_pairs(source, columns=ColumnMap(labels="rank"), cache_dir=cfg.cache_dir)
    with pytest.raises(InputError, match="column 'human_preference' \\(config key 'data.columns.ranks'\\)"):
        open_pairs(source, columns=ColumnMap(caption="prompt", labels="ranks", images="chosen",
                                             ranks="human_preference"), cache_dir=cfg.cache_dir)


# ------------------------------------------------------------------------------------------ Rapidata

def test_rapidata_votes_higher_wins_equal_is_a_tie(tmp_path):
    """votes 7:3 -> image1 wins, 2:8 -> image2 wins, 5:5 -> tie (dropped, counted; kept with keep_ties)."""
    source = image_parquet(tmp_path / "rapidata.parquet", {
        "prompt": ["p0", "p1", "p2"], "image1": [png(1), png(3), png(5)], "image2": [png(2), png(4), png(6)],
        "votes_image1": [7, 2, 5], "votes_image2": [3, 8, 5], "model1": ["flux"] * 3, "model2": ["mj"] * 3,
    }, ("image1", "image2"))
    pairs = PreferencePairs(shipped("rapidata_700k", source, tmp_path), seed=0)
    assert pairs.num_pairs == 2 and pairs.stats()["ties_dropped"] == 1
    assert by_row([next(pairs.batches(2))]) == {0: (1, 2, "p0"), 1: (4, 3, "p1")}
    kept = PreferencePairs(shipped("rapidata_700k", source, tmp_path, keep_ties=True), seed=0)
    batch = next(kept.batches(3))
    assert by_row([batch])[2] == (5, 6, "p2") and batch["is_tie"].tolist() == [r == 2 for r in
                                                                               batch["row_indices"].tolist()]


def test_winner_column_values_and_a_bad_value(tmp_path):
    """One column names the winner; its values are configurable; an unknown value is a bad_label row
    whose message names the column and the value."""
    source = image_parquet(tmp_path / "w.parquet", {
        "text": ["a", "b", "c", "d"], "left": [png(1), png(3), png(5), png(7)],
        "right": [png(2), png(4), png(6), png(8)], "preferred": ["right", "left", "both", "neither"],
    }, ("left", "right"))
    columns = ColumnMap(caption="text", image_0="left", image_1="right", labels="winner", winner="preferred",
                        winner_0=["left"], winner_1=["right"], winner_tie=["both"])
    cfg = DataConfig(source=str(source), columns=columns, resolution=8, caption_dropout=0.0,
                     random_flip=False, cache_dir=str(tmp_path / "c"), max_bad_fraction=0.5)
    pairs = PreferencePairs(cfg, seed=0)
    stats = pairs.stats()
    assert pairs.num_pairs == 2 and stats["ties_dropped"] == 1 and stats["bad_rows"] == {"bad_label": 1}
    assert stats["first_bad"].startswith(f"row 3 of {source}: column preferred is 'neither'; expected one of")
    assert by_row([next(pairs.batches(2))]) == {0: (2, 1, "a"), 1: (3, 4, "b")}


# --------------------------------------------------------------------------------------------- HPDv2

def write_ranked_jsonl(root: Path, rows: list[tuple[str, list[int], list[float]]],
                       names=("image_path", "rank")) -> Path:
    """A JSONL file of ranked rows; image k is written to img/<k>.png and named by a relative path."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    with open(root / "pairs.jsonl", "w") as f:
        for prompt, ks, ranks in rows:
            for k in ks:
                (root / f"img/{k}.png").write_bytes(png(k))
            row = {"prompt": prompt, names[0]: [f"img/{k}.png" for k in ks], names[1]: ranks}
            f.write(json.dumps(row) + "\n")
    return root / "pairs.jsonl"


def test_hpdv2_train_preference_flags(tmp_path):
    """Train annotations: two images, human_preference 1 for the preferred one (higher_better)."""
    source = write_ranked_jsonl(tmp_path, [("p0", [1, 2], [0, 1]), ("p1", [3, 4], [1, 0])],
                                names=("file_path", "human_preference"))
    pairs = PreferencePairs(shipped("hpdv2", source, tmp_path), seed=0)
    assert pairs.num_pairs == 2
    assert by_row([next(pairs.batches(2))]) == {0: (2, 1, "p0"), 1: (3, 4, "p1")}


HPD_TEST_ROWS = [("p0", [1, 2, 3], [1, 2, 2]), ("p1", [4, 5, 6], [3, 1, 2])]
# C(3, 2) = 3 pairs per row, (i, j) with i < j in that order; lower rank wins; equal ranks are a tie:
#   0: (img1, img2) 1 wins   1: (img1, img3) 1 wins   2: (img2, img3) tie
#   3: (img4, img5) 5 wins   4: (img4, img6) 6 wins   5: (img5, img6) 5 wins
HPD_TEST_PAIRS = {0: (1, 2, "p0"), 1: (1, 3, "p0"), 3: (5, 4, "p1"), 4: (6, 4, "p1"), 5: (5, 6, "p1")}


def hpd_test_config(source, tmp_path, **kw) -> DataConfig:
    """The documented override of hpdv2.yaml for the test split: image_path + rank, lower is better."""
    cfg = shipped("hpdv2", source, tmp_path, **kw)
    cfg.columns = ColumnMap(**{**cfg.columns.__dict__, "images": "image_path", "ranks": "rank",
                               "rank_order": "lower_better"})
    return cfg


def test_hpdv2_ranks_expand_into_all_pairs_ties_dropped(tmp_path):
    source = write_ranked_jsonl(tmp_path, HPD_TEST_ROWS)
    pairs = PreferencePairs(hpd_test_config(source, tmp_path), seed=0)
    assert pairs.num_pairs == 5 and pairs.stats()["ties_dropped"] == 1 and pairs.stats()["rows_seen"] == 6
    assert by_row([next(pairs.batches(5))]) == HPD_TEST_PAIRS
    rows = open_pairs(source, columns=pairs.cfg.columns)
    assert [r["source_row"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert rows[4]["jpg_1"] == {"bytes": None, "path": str(tmp_path / "img/6.png")}

    bad = write_ranked_jsonl(tmp_path / "bad", [("p", [1, 2, 3], [1, 2])] + HPD_TEST_ROWS * 10)
    stats = PreferencePairs(hpd_test_config(bad, tmp_path, max_bad_fraction=0.5), seed=0).stats()
    assert stats["bad_rows"] == {"bad_label": 1}
    assert "column rank is [1, 2]; expected a list of numbers, one per image of column image_path (3" in (
        stats["first_bad"])


def test_ranked_pairs_resume_exactly_and_split_across_processes(tmp_path):
    """The expanded pair index is fixed, so a resumed loader continues with the same batches and two
    processes take disjoint shares of it; a stream expands rows the same way and resumes exactly."""
    source = write_ranked_jsonl(tmp_path, HPD_TEST_ROWS * 4)  # 24 pairs, 20 usable
    cfg = hpd_test_config(source, tmp_path, random_flip=True, caption_dropout=0.3)
    reference = [b["row_indices"].tolist() for b in _take(PreferencePairs(cfg, seed=4).batches(3), 9)]
    stopped = PreferencePairs(cfg, seed=4)
    _take(stopped.batches(3), 4)
    resumed = PreferencePairs(cfg, seed=4)
    resumed.load_state_dict(json.loads(json.dumps(stopped.state_dict())))
    assert [b["row_indices"].tolist() for b in _take(resumed.batches(3), 5)] == reference[4:]
    other = hpd_test_config(source, tmp_path, random_flip=True, caption_dropout=0.3)
    other.columns.rank_order = "higher_better"
    with pytest.raises(InputError, match="saved with columns="):
        PreferencePairs(other, seed=4).load_state_dict(stopped.state_dict())

    shares = [set(PreferencePairs(cfg, seed=4, process_index=k, num_processes=2).epoch_share(0).tolist())
              for k in range(2)]
    assert len(shares[0]) == len(shares[1]) == 10 and not shares[0] & shares[1]
    assert shares[0] | shares[1] == {r for r in range(24) if r % 6 != 2}

    streamed = hpd_test_config(source, tmp_path, streaming=True, shuffle_buffer=0)
    first = PreferencePairs(streamed, seed=4)
    batches = _take(first.batches(5), 2)
    assert [ids(b) for b in batches] == [[HPD_TEST_PAIRS[r][:2] for r in (0, 1, 3, 4, 5)]] * 2
    assert first.stats()["ties_dropped"] == 2
    it = PreferencePairs(streamed, seed=4)
    gen = it.batches(2)
    _take(gen, 1)
    state = json.loads(json.dumps(it.state_dict()))
    gen.close()
    again = PreferencePairs(streamed, seed=4)
    again.load_state_dict(state)
    # The state was saved between two pairs of source row 0 (its tie still to come).
    assert [ids(b) for b in _take(again.batches(2), 2)] == [[(5, 4), (6, 4)], [(5, 6), (1, 2)]]


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


# ------------------------------------------------------------------------------- Pick-a-Pic with URLs

class _Server:
    """A local HTTP server: /img/<k>.png serves png(k); /flaky/<k>.png answers 503 on its first request;
    /slow.png never answers (closes after 1 s); anything else is 404. Counts requests per path."""

    def __init__(self):
        self.requests: dict[str, int] = {}
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                with lock:
                    server.requests[self.path] = server.requests.get(self.path, 0) + 1
                    count = server.requests[self.path]
                if self.path == "/slow.png":
                    time.sleep(1.0)  # the client has given up by now: answer nothing
                    return
                if self.path.startswith("/flaky/") and count == 1:
                    self.send_error(503)
                    return
                if self.path.startswith(("/img/", "/flaky/")):
                    body = png(int(self.path.rsplit("/", 1)[1].split(".")[0]))
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_error(404)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server():
    s = _Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/gone.png"  # nothing listens: connection refused


def test_fetcher_retries_caches_and_gives_up(server, tmp_path):
    fetcher = ImageFetcher(tmp_path / "cache", retries=2, timeout=0.3, backoff=0.01)
    assert fetcher.fetch(f"{server.url}/flaky/4.png", "w") == png(4)
    assert server.requests["/flaky/4.png"] == 2  # a 503, then the retry
    assert fetcher.fetch(f"{server.url}/flaky/4.png", "w") == png(4)
    assert server.requests["/flaky/4.png"] == 2  # the second read is the cache's
    with pytest.raises(UnreachableImage, match=r"row 7 column jpg_1: cannot fetch .*/missing.png: HTTP 404"):
        fetcher.fetch(f"{server.url}/missing.png", "row 7 column jpg_1")
    assert server.requests["/missing.png"] == 1  # a 404 is final: no retry
    with pytest.raises(UnreachableImage, match="after 3 attempt"):
        fetcher.fetch(f"{server.url}/slow.png", "w")
    assert server.requests["/slow.png"] == 3
    with pytest.raises(UnreachableImage, match="after 3 attempt"):
        fetcher.fetch(closed_port_url(), "w")
    assert decode_image(f"{server.url}/img/2.png", "w", fetcher=fetcher).getpixel((0, 0)) == (20, 100, 200)


def test_pickapic_urls_bad_rows_counted_and_cached(server, tmp_path):
    """caption / image_0_url / image_1_url / label_0 / label_1. Rows 2-4 name a 404, a refused and a
    too-slow URL: counted unreachable_image rows. A second read of the good rows sends no request."""
    u = server.url
    rows = [("c0", f"{u}/img/1.png", f"{u}/img/2.png", 1.0, 0.0),
            ("c1", f"{u}/img/3.png", f"{u}/flaky/4.png", 0.0, 1.0),
            ("c2", f"{u}/img/5.png", f"{u}/missing.png", 1.0, 0.0),
            ("c3", closed_port_url(), f"{u}/img/6.png", 1.0, 0.0),
            ("c4", f"{u}/slow.png", f"{u}/img/7.png", 1.0, 0.0),
            ("c5", f"{u}/img/8.png", f"{u}/img/9.png", 0.0, 1.0)]
    names = ("caption", "image_0_url", "image_1_url", "label_0", "label_1")
    (tmp_path / "p").mkdir()
    datasets.Dataset.from_dict({n: [r[i] for r in rows] for i, n in enumerate(names)}).to_parquet(
        str(tmp_path / "p" / "train-0.parquet"))
    fetch = dict(fetch_retries=1, fetch_timeout=0.3, max_bad_fraction=0.6)

    first_two = shipped("pickapic_v2_urls", tmp_path / "p", tmp_path, max_rows=2, **fetch)
    good = PreferencePairs(first_two, seed=0)
    assert by_row([next(good.batches(2))]) == {0: (1, 2, "c0"), 1: (4, 3, "c1")}
    assert server.requests["/flaky/4.png"] == 2
    before = dict(server.requests)
    again = PreferencePairs(first_two, seed=0)
    assert by_row([next(again.batches(2))]) == {0: (1, 2, "c0"), 1: (4, 3, "c1")}
    assert server.requests == before  # all from the image cache

    # Streamed in stored order, the batch of 3 good pairs is filled only after rows 2-4 failed.
    streamed = PreferencePairs(shipped("pickapic_v2_urls", tmp_path / "p", tmp_path, streaming=True,
                                       shuffle_buffer=0, **fetch), seed=0)
    batch = next(streamed.batches(3))
    assert ids(batch) == [(1, 2), (4, 3), (9, 8)] and batch["captions"] == ["c0", "c1", "c5"]
    stats = streamed.stats()
    assert stats["bad_rows"] == {"unreachable_image": 3} and stats["pairs_decoded"] == 6
    assert "column jpg_1: cannot fetch" in stats["first_bad"] and "HTTP 404" in stats["first_bad"]
    assert server.requests["/missing.png"] == 1 and server.requests["/slow.png"] == 2  # timeout retried once
    assert all(server.requests[p] == before[p] for p in before)  # rows 0 and 1 again from the cache


def test_mapped_rows_feed_relabel(tmp_path):
    """Relabel mode reads open_pairs rows: a mapped source (ranked JSONL, images named by path) gives rows
    whose images it stores as bytes and scores; here a scorer preferring the redder image."""
    from diffusion_dpo.labeling.relabel import relabel_rows

    class Redness:
        def score(self, images, prompts):
            return torch.tensor([float(image.getpixel((0, 0))[0]) for image in images])

    source = write_ranked_jsonl(tmp_path, HPD_TEST_ROWS)
    rows = open_pairs(source, columns=hpd_test_config(source, tmp_path).columns)
    table, _ = relabel_rows(Redness(), list(enumerate(rows)), str(source), scorer_name="redness",
                            min_margin=0.0, image_format="png")
    out = table.to_pylist()
    assert [r["jpg_1"] for r in out] == [png(k) for k in (2, 3, 3, 5, 6, 6)]
    # Redder = larger k wins: image_1 in every pair (image_0 has the smaller k).
    assert [(r["label_0"], r["label_1"]) for r in out] == [(0.0, 1.0)] * 6
