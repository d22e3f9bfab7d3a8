"""Prompt sets for evaluation and labeling: a list of :class:`Prompt` (text, style, index).

A spec is one of

- ``hpsv2`` / ``hpsv2:<style>``: the official HPSv2 benchmark prompts (800 per style, styles ``anime``,
  ``concept-art``, ``paintings``, ``photo``), the JSON files ``benchmark/<style>.json`` of the hub dataset
  ``zhwang/HPDv2``. With ``prompts_dir=`` they are read from a local folder holding those four files
  instead of the hub. Without the hub and without ``prompts_dir`` the error points to the two ways out.
- ``hpdv2-train``: the prompts of HPDv2's train split (``train.json`` of the same hub dataset, each prompt
  once, in file order; style ``hpdv2-train``) less every prompt that is also an ``hpsv2`` benchmark prompt,
  so pairs labelled from it never share a prompt with an evaluation on ``hpsv2``. With ``prompts_dir=`` they
  are read from a local copy of the dataset (a folder holding ``train.json`` and ``benchmark/<style>.json``).
- ``hpsv2-offline`` / ``hpsv2-offline:<style>``: our own prompts in the same four styles, shipped in
  ``assets/prompts/hpsv2_offline/<style>.json`` (written for this package, not copied from HPDv2), so
  evaluation and the demo work with no network.
- ``geneval`` / ``geneval:<task>``: GenEval's 553 prompts (github.com/djghosh13/geneval, MIT licence), shipped with their
  metadata in ``assets/prompts/geneval/evaluation_metadata.jsonl``; the style is the task (``single_object``,
  ``two_object``, ``counting``, ``colors``, ``position``, ``color_attr``), so the per-style report is GenEval's
  per-task one. Score them with ``scorers=geneval``.
- ``partiprompts`` / ``partiprompts:<category>``: PartiPrompts' 1632 prompts (github.com/google-research/parti, Apache-2.0),
  shipped in ``assets/prompts/partiprompts/PartiPrompts.tsv``; the style is the category.
- ``ocr``: Flow-GRPO's 1018 OCR test prompts (github.com/yifan123/flow_grpo ``dataset/ocr/test.txt``, MIT licence), shipped
  in ``assets/prompts/ocr/test.txt``, each with the text to render in quotes; style ``ocr``. Score with ``ocr``.
- ``drawbench`` / ``drawbench:<category>``: DrawBench's 200 prompts (Imagen). Not shipped (no licence is
  published with them): fetched once from the hub dataset ``shunk031/DrawBench`` into
  ``~/.cache/diffusion_dpo/prompts/drawbench.tsv`` (``prompts_dir=`` a folder holding a ``drawbench.tsv`` with
  ``Prompt`` and ``Category`` columns instead).
- a folder: every ``*.json`` file in it is one style named after the file (so a downloaded copy of the
  HPDv2 ``benchmark/`` folder works as a path too);
- a file: ``.json`` (a list of strings; the style is the file's stem), ``.tsv`` (PartiPrompts layout: a header
  with a ``Prompt`` column and optionally ``Category``, which becomes the style), anything else plain text
  (one prompt per line, blank lines ignored; the style is the file's stem).

Any spec may end in ``:<style>`` to keep one style (``parti.tsv:Animals``, ``my_dir:photo``). An unknown set
or style, a missing or empty file raise :class:`InputError` naming what is valid.

    prompts = load_prompts("hpsv2-offline:photo")
    prompts[0]  # Prompt(text='...', style='photo', index=0)
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from diffusion_dpo import ASSETS
from diffusion_dpo.errors import InputError
from diffusion_dpo.fileio import read_text

HPS_STYLES = ("anime", "concept-art", "paintings", "photo")
HPS_HUB_DATASET = "zhwang/HPDv2"
OFFLINE_DIR = ASSETS / "prompts" / "hpsv2_offline"
HPD_TRAIN_SET = "hpdv2-train"
BENCHMARK_DIR = ASSETS / "prompts"
DRAWBENCH_HUB_DATASET = "shunk031/DrawBench"
BUILTIN_SETS = ("hpsv2", "hpsv2-offline", HPD_TRAIN_SET, "geneval", "partiprompts", "ocr", "drawbench")


@dataclass(frozen=True)
class Prompt:
    """One prompt. ``index``: its position within its style in the source, stable under subsampling,
    so file names and seeds derived from it do not change when fewer prompts are taken."""

    text: str
    style: str
    index: int


def load_prompts(spec: str, *, prompts_dir: str | None = None) -> list[Prompt]:
    """The prompts named by ``spec`` (see the module docstring), grouped by style in source order.

    ``prompts_dir``: a local folder with the official ``<style>.json`` files, used for ``hpsv2`` instead of
    the hub; for ``hpdv2-train``, a local copy of the HPDv2 dataset (``train.json``, ``benchmark/``).
    """
    spec = str(spec).strip()
    if not spec:
        raise InputError(f"empty prompt spec; use a built-in set ({', '.join(BUILTIN_SETS)}) or a file")
    name, style = _split_style(spec)
    if name == "hpsv2":
        prompts = _official_hps(style, prompts_dir)
    elif name == HPD_TRAIN_SET:
        if style is not None:
            raise InputError(f"prompt set {HPD_TRAIN_SET!r} has no styles; got {spec!r}")
        prompts = _hpd_train_prompts(prompts_dir)
    elif name == "hpsv2-offline":
        prompts = _from_folder(OFFLINE_DIR, HPS_STYLES if style is None else (style,), set_name=name)
    elif name in ("geneval", "partiprompts", "ocr", "drawbench"):
        prompts = _benchmark(name, prompts_dir)
        if style is not None:
            prompts = _keep_style(prompts, style, where=f"set {name!r}")
    else:
        path = Path(name)
        if path.is_dir():
            prompts = _from_folder(path, None if style is None else (style,), set_name=str(path))
        elif path.is_file():
            prompts = _from_file(path)
        else:
            raise InputError(
                f"prompt spec {spec!r} is neither a built-in set ({', '.join(BUILTIN_SETS)}, optionally "
                f"':<style>' with style one of {', '.join(HPS_STYLES)}) nor an existing file or folder"
            )
        if style is not None:
            prompts = _keep_style(prompts, style, where=str(path))
    return prompts


def styles_of(prompts: list[Prompt]) -> list[str]:
    """The distinct styles in order of first appearance."""
    return list(dict.fromkeys(p.style for p in prompts))


def take_per_style(prompts: list[Prompt], n: int | None) -> list[Prompt]:
    """The first ``n`` prompts of each style (all when ``n`` is None or 0): a deterministic subsample."""
    if not n:
        return list(prompts)
    counts: dict[str, int] = {}
    out = []
    for p in prompts:
        if counts.get(p.style, 0) < n:
            out.append(p)
            counts[p.style] = counts.get(p.style, 0) + 1
    return out


def _split_style(spec: str) -> tuple[str, str | None]:
    """``name:style`` -> (name, style); a colon that is part of an existing path (``C:\\x``) is kept."""
    if ":" not in spec or Path(spec).exists():
        return spec, None
    name, style = spec.rsplit(":", 1)
    if not style:
        raise InputError(f"prompt spec {spec!r} ends in ':' with no style after it")
    return name, style


def _check_hps_style(style: str | None, set_name: str) -> tuple[str, ...]:
    if style is None:
        return HPS_STYLES
    if style not in HPS_STYLES:
        raise InputError(f"prompt set {set_name!r} has no style {style!r}; styles: {', '.join(HPS_STYLES)}")
    return (style,)


def _official_hps(style: str | None, prompts_dir: str | None) -> list[Prompt]:
    styles = _check_hps_style(style, "hpsv2")
    if prompts_dir:
        folder = Path(prompts_dir)
        if not folder.is_dir():
            raise InputError(f"prompts_dir {prompts_dir!r} is not a folder (expected the HPDv2 benchmark/ files)")
        return _from_folder(folder, styles, set_name=f"hpsv2 in {prompts_dir}")
    prompts = []
    for s in styles:
        path = _hub_benchmark_file(s)
        prompts.extend(Prompt(t, s, i) for i, t in enumerate(_read_json_list(path)))
    return prompts


def _hub_benchmark_file(style: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(HPS_HUB_DATASET, f"benchmark/{style}.json", repo_type="dataset"))
    except Exception as e:  # offline, no such file, auth: all mean "not reachable" to the user
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise InputError(
            f"cannot fetch the official HPSv2 prompts benchmark/{style}.json from the hub dataset "
            f"{HPS_HUB_DATASET}{offline}: {type(e).__name__}: {e}. Use prompts=hpsv2-offline for the built-in "
            f"offline set, or prompts_dir=<folder holding {', '.join(s + '.json' for s in HPS_STYLES)}>"
        ) from None


def _hpd_train_prompts(prompts_dir: str | None) -> list[Prompt]:
    """HPDv2's train-split prompts, each once, without the benchmark's (the split this set promises)."""
    if prompts_dir:
        folder = Path(prompts_dir)
        if not (folder / "train.json").is_file() or not (folder / "benchmark").is_dir():
            raise InputError(f"prompts_dir {prompts_dir!r}: expected a copy of the hub dataset {HPS_HUB_DATASET} "
                             "holding train.json and benchmark/<style>.json")
        train_file, benchmark = folder / "train.json", _official_hps(None, str(folder / "benchmark"))
    else:
        train_file, benchmark = _hub_dataset_file("train.json"), _official_hps(None, None)
    held_out = {p.text for p in benchmark}
    texts = [t for t in dict.fromkeys(_read_train_prompts(train_file)) if t not in held_out]
    if not texts:
        raise InputError(f"{train_file}: no train prompt left once the HPSv2 benchmark prompts are held out")
    return [Prompt(t, HPD_TRAIN_SET, i) for i, t in enumerate(texts)]


def _read_train_prompts(path: Path) -> list[str]:
    """The ``prompt`` of every row of HPDv2's ``train.json`` (a JSON list of objects), stripped."""
    try:
        rows = json.loads(path.read_text(encoding="utf-8") or "[]")
    except json.JSONDecodeError as e:
        raise InputError(f"HPDv2 train file {path} is not valid JSON: {e}") from None
    if not isinstance(rows, list) or not rows:
        raise InputError(f"HPDv2 train file {path}: expected a non-empty JSON list of rows with a 'prompt'")
    texts = []
    for i, row in enumerate(rows):
        text = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"HPDv2 train file {path}: row {i} has no non-empty 'prompt' string")
        texts.append(text.strip())
    return texts


def _hub_dataset_file(filename: str) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(HPS_HUB_DATASET, filename, repo_type="dataset"))
    except Exception as e:  # offline, no such file, auth: all mean "not reachable" to the user
        raise InputError(
            f"cannot fetch {filename} from the hub dataset {HPS_HUB_DATASET} for prompts={HPD_TRAIN_SET}: "
            f"{type(e).__name__}: {e}. Download the dataset's train.json and benchmark/ folder elsewhere and "
            f"pass prompts_dir=<that folder>"
        ) from None


def overlap_warning(prompts: list[Prompt], captions: set[str], where: str) -> str | None:
    """One line saying how many of ``prompts`` are among ``captions`` (the training pairs' in ``where``), with
    examples; None when none is. A tuned model scored on prompts it was trained on measures recall, not
    what it learnt."""
    shared = [p.text for p in prompts if p.text.strip() in captions]
    if not shared:
        return None
    examples = "; ".join(repr(t[:60]) for t in shared[:3])
    return (f"warning: {len(shared)} of {len(prompts)} evaluation prompts are captions of the {len(captions)} "
            f"distinct training captions in {where} (e.g. {examples}): scores on them are not held out")


def _from_folder(folder: Path, styles: tuple[str, ...] | None, set_name: str) -> list[Prompt]:
    available = sorted(p.stem for p in folder.glob("*.json"))
    if styles is None:
        styles = tuple(available)
        if not styles:
            raise InputError(f"prompt folder {folder} holds no <style>.json files")
    for s in styles:
        if s not in available:
            raise InputError(
                f"prompt set {set_name!r} has no style {s!r}; styles: {', '.join(available) or '(none)'}"
            )
    prompts = []
    for s in styles:
        prompts.extend(Prompt(t, s, i) for i, t in enumerate(_read_json_list(folder / f"{s}.json")))
    return prompts


def _from_file(path: Path) -> list[Prompt]:
    if path.suffix.lower() == ".json":
        return [Prompt(t, path.stem, i) for i, t in enumerate(_read_json_list(path))]
    if path.suffix.lower() == ".tsv":
        return _read_tsv(path)
    lines = [line.strip() for line in read_text(path, "prompt file").splitlines()]
    texts = [line for line in lines if line]
    if not texts:
        raise InputError(f"prompt file {path} is empty (expected one prompt per line)")
    return [Prompt(t, path.stem, i) for i, t in enumerate(texts)]


def _read_json_list(path: Path) -> list[str]:
    try:
        data = json.loads(read_text(path, "prompt file") or "[]")
    except json.JSONDecodeError as e:
        raise InputError(f"prompt file {path} is not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise InputError(f"prompt file {path}: expected a JSON list of strings, got {type(data).__name__}")
    for i, t in enumerate(data):
        if not isinstance(t, str) or not t.strip():
            raise InputError(f"prompt file {path}: item {i} is {t!r}, expected a non-empty string")
    if not data:
        raise InputError(f"prompt file {path} is empty (expected a JSON list of prompt strings)")
    return [t.strip() for t in data]


def _read_tsv(path: Path) -> list[Prompt]:
    rows = list(csv.DictReader(io.StringIO(read_text(path, "prompt file"), newline=""), delimiter="\t"))
    if not rows:
        raise InputError(f"prompt file {path} is empty (expected a header with a Prompt column, then rows)")
    if "Prompt" not in rows[0]:
        raise InputError(f"prompt file {path}: no 'Prompt' column in the header (found {list(rows[0])})")
    counts: dict[str, int] = {}
    prompts = []
    for row_number, row in enumerate(rows, start=2):
        text = (row.get("Prompt") or "").strip()
        if not text:
            raise InputError(f"prompt file {path}, line {row_number}: empty Prompt")
        style = (row.get("Category") or "").strip() or path.stem
        prompts.append(Prompt(text, style, counts.get(style, 0)))
        counts[style] = counts.get(style, 0) + 1
    return prompts


def _keep_style(prompts: list[Prompt], style: str, where: str) -> list[Prompt]:
    kept = [p for p in prompts if p.style == style]
    if not kept:
        raise InputError(f"prompts {where} have no style {style!r}; styles: {', '.join(styles_of(prompts))}")
    return kept


def _benchmark(name: str, prompts_dir: str | None) -> list[Prompt]:
    """The prompts of a benchmark set (see the module docstring)."""
    if name == "geneval":
        from scorers.geneval import load_metadata

        counts: dict[str, int] = {}
        prompts = []
        for text, row in load_metadata(BENCHMARK_DIR / "geneval" / "evaluation_metadata.jsonl").items():
            prompts.append(Prompt(text, row["tag"], counts.get(row["tag"], 0)))
            counts[row["tag"]] = counts.get(row["tag"], 0) + 1
        return prompts
    if name == "partiprompts":
        return _read_tsv(BENCHMARK_DIR / "partiprompts" / "PartiPrompts.tsv")
    if name == "ocr":
        return [Prompt(p.text, "ocr", p.index) for p in _from_file(BENCHMARK_DIR / "ocr" / "test.txt")]
    return _read_tsv(_drawbench_file(prompts_dir))


def _drawbench_file(prompts_dir: str | None) -> Path:
    """A local drawbench.tsv: in ``prompts_dir``, else the cached copy, else fetched from the hub once."""
    if prompts_dir:
        path = Path(prompts_dir) / "drawbench.tsv"
        if not path.is_file():
            raise InputError(f"prompts_dir {prompts_dir!r}: expected a drawbench.tsv (Prompt, Category columns)")
        return path
    cached = Path(os.environ.get("DIFFUSION_DPO_CACHE", Path.home() / ".cache" / "diffusion_dpo")) / "prompts" / \
        "drawbench.tsv"
    if cached.is_file():
        return cached
    print(f"DrawBench is not shipped (no licence is published with it): fetching it once from the hub dataset "
          f"{DRAWBENCH_HUB_DATASET} into {cached}", flush=True)
    try:
        from datasets import load_dataset

        rows = load_dataset(DRAWBENCH_HUB_DATASET, split="test")
        table = [(str(r.get("prompts") or r.get("Prompts") or r.get("prompt")).strip(),
                  str(r.get("category") or r.get("Category") or "drawbench").strip()) for r in rows]
    except Exception as e:  # offline, renamed, auth: all mean "not reachable" to the user
        raise InputError(f"cannot fetch DrawBench from the hub dataset {DRAWBENCH_HUB_DATASET}: {type(e).__name__}: "
                         f"{e}. Put a drawbench.tsv (Prompt and Category columns) in a folder and pass "
                         "prompts_dir=<that folder>") from None
    cached.parent.mkdir(parents=True, exist_ok=True)
    lines = ["Prompt\tCategory"] + [f"{p.replace(chr(9), ' ')}\t{c}" for p, c in table if p and p != "None"]
    cached.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return cached
