"""Benchmark the LLM recipes: DPO training tokens/s with a frozen reference model vs pre-computed reference
log-probs, and PPO rollout + update time per iteration.

Models are built from configs with random weights and a word-level tokenizer (nothing is downloaded), so the
figures are the cost of the computation, not of a particular checkpoint:

    tiny   Llama, hidden 32, 2 layers        (the tests' model)                         CPU
    small  Llama, hidden 256, 4 layers       (~3M parameters)                           CPU
    0.5b   Qwen2.5-0.5B's architecture: hidden 896, 24 layers, 14 heads (2 KV), vocab 151936   GPU

    python scripts/bench_llm.py --preset tiny --threads 1
    python scripts/bench_llm.py --preset 0.5b            # on a GPU (bf16 autocast)

It prints a markdown table (and writes it with --out). DPO tokens/s counts every non-pad token of chosen and
rejected sequences per second of training (the pre-computation pass is reported separately, inside the wall
time). PPO times are means over the iterations after the first.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from diffusion_dpo.config import load_config  # noqa: E402
from diffusion_dpo.llm import common, tiny  # noqa: E402
from diffusion_dpo.recipes import llm_dpo as dpo  # noqa: E402
from diffusion_dpo.recipes import llm_ppo as ppo  # noqa: E402

PRESETS = {
    # name: (architecture, vocab words, prompt words, completion words, DPO batch, PPO batch, new tokens)
    "tiny": (
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
        ),
        0,
        12,
        12,
        16,
        16,
        12,
    ),
    "small": (
        dict(
            hidden_size=256,
            intermediate_size=1024,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
        ),
        2000,
        32,
        32,
        8,
        16,
        32,
    ),
    "0.5b": (
        dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_theta=1000000.0,
        ),
        151936 - 6,
        128,
        128,
        8,
        32,
        128,
    ),
}


def build(preset: str, root: Path) -> tuple[Path, list[str]]:
    """A random-weight model folder of the preset and the words of its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    arch, n_words, *_ = PRESETS[preset]
    words = tiny.WORDS if n_words == 0 else tiny.WORDS + [f"w{i}" for i in range(n_words - len(tiny.WORDS))]
    path = root / preset
    tok = tiny.write_word_tokenizer(path, words)
    ids = dict(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    if preset == "0.5b":
        model = Qwen2ForCausalLM(Qwen2Config(**arch, **ids))
    else:
        model = LlamaForCausalLM(LlamaConfig(**arch, **ids))
    model.save_pretrained(path)
    return path, words


def write_data(root: Path, words: list[str], preset: str, n: int) -> dict[str, Path]:
    _, _, p_len, c_len, *_ = PRESETS[preset]
    rng = random.Random(0)

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    pairs = [{"prompt": text(p_len), "chosen": text(c_len), "rejected": text(c_len)} for _ in range(n)]
    prompts = [{"prompt": text(p_len)} for _ in range(n)]
    return {
        "pairs": tiny.write_rows(root / "pairs.jsonl", pairs),
        "prompts": tiny.write_rows(root / "prompts.jsonl", prompts),
    }


def peak_memory_gib() -> float | None:
    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return peak


def bench_dpo(model: Path, data: Path, out: Path, kind: str, batch: int, steps: int, length: int) -> dict:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = load_config(
        dpo.DPOConfig,
        [],
        [
            f"model.name_or_path={model}",
            f"data.source={data}",
            "data.eval_fraction=0",
            f"reference.kind={kind}",
            f"data.max_length={length}",
            f"data.max_prompt_length={length}",
            f"optim.batch_size={batch}",
            f"optim.max_steps={steps}",
            "optim.learning_rate=0.000001",
            "log_every=2",
            "tensorboard=false",
            f"output_dir={out}",
        ],
    )
    summary = dpo.run(cfg)
    rows = [r for r in common.read_metrics(out) if "tokens_per_s" in r][1:]  # the first log includes warm-up
    return {
        "tokens_per_s": sum(r["tokens_per_s"] for r in rows) / len(rows),
        "wall_s": summary["wall_s"],
        "peak_gib": peak_memory_gib(),
    }


def bench_ppo(model: Path, data: Path, out: Path, batch: int, new_tokens: int, iterations: int) -> dict:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cfg = load_config(
        ppo.PPOConfig,
        [],
        [
            f"model.name_or_path={model}",
            f"data.source={data}",
            "reward.function=diffusion_dpo.llm.tiny:count_good",
            "value.kind=model",
            f"rollout.batch_size={batch}",
            f"rollout.max_new_tokens={new_tokens}",
            f"optim.batch_size={max(1, batch // 4)}",
            "ppo.epochs=4",
            f"ppo.iterations={iterations}",
            "data.max_prompt_length=512",
            "tensorboard=false",
            f"output_dir={out}",
        ],
    )
    ppo.run(cfg)
    rows = common.read_metrics(out)[1:]
    rollout = sum(r["rollout_s"] for r in rows) / len(rows)
    update = sum(r["update_s"] for r in rows) / len(rows)
    length = sum(r["response_length"] for r in rows) / len(rows)
    return {
        "rollout_s": rollout,
        "update_s": update,
        "generated_tokens_per_s": batch * length / rollout,
        "response_length": length,
        "peak_gib": peak_memory_gib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--dpo-steps", type=int, default=20)
    parser.add_argument("--ppo-iterations", type=int, default=6)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    _, _, p_len, c_len, dpo_batch, ppo_batch, new_tokens = PRESETS[args.preset]
    device = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU, {torch.get_num_threads()} threads"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        model, words = build(args.preset, root)
        data = write_data(root, words, args.preset, n=max(dpo_batch * args.dpo_steps, ppo_batch * 2))
        print(f"built {args.preset} in {time.perf_counter() - t0:.1f}s on {device}", flush=True)
        length = p_len + c_len + 4
        results = {
            "preset": args.preset,
            "device": device,
            "dpo_copy": bench_dpo(
                model, data["pairs"], root / "dpo-copy", "copy", dpo_batch, args.dpo_steps, length
            ),
            "dpo_precomputed": bench_dpo(
                model, data["pairs"], root / "dpo-pre", "precomputed", dpo_batch, args.dpo_steps, length
            ),
            "ppo": bench_ppo(
                model, data["prompts"], root / "ppo", ppo_batch, new_tokens, args.ppo_iterations
            ),
        }
    c, p, r = results["dpo_copy"], results["dpo_precomputed"], results["ppo"]

    def gib(x):
        return "-" if x is None else f"{x:.2f}"

    table = [
        "| preset | device | DPO tok/s, frozen reference | DPO tok/s, precomputed | DPO wall s (copy / pre) "
        "| DPO peak GiB (copy / pre) | PPO rollout s | PPO update s | generated tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {args.preset} | {device} | {c['tokens_per_s']:.0f} | {p['tokens_per_s']:.0f} | "
        f"{c['wall_s']:.1f} / {p['wall_s']:.1f} | {gib(c['peak_gib'])} / {gib(p['peak_gib'])} | "
        f"{r['rollout_s']:.3f} | {r['update_s']:.3f} | {r['generated_tokens_per_s']:.0f} |",
    ]
    print("\n".join(table))
    print(
        f"(DPO batch {dpo_batch} pairs of {p_len}+{c_len} words, {args.dpo_steps} steps; "
        f"PPO batch {ppo_batch} prompts, up to {new_tokens} new tokens, "
        f"4 epochs of minibatch {max(1, ppo_batch // 4)}, value model)"
    )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
