"""label, evaluate and implicit reward on the flow-matching families (tiny SD3, FLUX.1-dev and Z-Image
pipelines)."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from diffusion_dpo.config import load_config
from diffusion_dpo.families import by_name
from diffusion_dpo.models import attach_lora
from diffusion_dpo.recipes import evaluate, label
from diffusion_dpo.sampling import denoiser_of, generate, load_pipeline, native_size, pipeline_family
from diffusion_dpo.tiny import build_tiny_pipeline, write_tiny_pairs

FAMILIES = ["sd3", "flux", "flux2", "flux2_klein", "z_image", "qwen_image", "wan"]
# FLUX's pipeline default is 1024 px (256 for the tiny one); the tests sample the tiny models' 32 px.
SIZE = ["sampling.height=32", "sampling.width=32"]


@pytest.fixture(scope="module", params=FAMILIES)
def world(request, tmp_path_factory):
    """A tiny pipeline of the family, a zero LoRA on its transformer (B = 0: the base exactly), a full
    "fine-tune" (the base's transformer with one weight changed), prompts and held-out pairs."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    base = build_tiny_pipeline(root / "base", family=name)
    family = by_name(name)
    transformer = family.load_denoiser(str(base / "transformer"))
    changed = family.load_denoiser(str(base / "transformer"))
    with torch.no_grad():
        output_layer(changed).weight.add_(0.5)  # the velocity's output layer
    changed.save_pretrained(root / "tuned")
    attach_lora(transformer, rank=2)
    family.save_lora(transformer, root / "zero_lora")
    prompts = root / "prompts.txt"
    prompts.write_text("a red circle on a blue background\na green square on a black background\n")
    write_tiny_pairs(root / "pairs", n_pairs=3, n_ties=1)
    return {"name": name, "root": root, "base": str(base), "zero_lora": str(root / "zero_lora"),
            "tuned": str(root / "tuned"), "prompts": str(prompts), "pairs": str(root / "pairs")}


def output_layer(transformer):
    """The transformer's last linear layer (Z-Image's final layer of its one patch size)."""
    if hasattr(transformer, "proj_out"):
        return transformer.proj_out
    return transformer.all_final_layer["2-1"].linear


def test_sampling_conditions_the_transformer_as_training_does(world):
    """The T5 length the pipeline is called with is the one the family encodes with for training, so the
    text states at sampling equal the family's encode_text (the pipeline's default, 256 or 512, would pad)."""
    from diffusion_dpo.evaluation.implicit_reward import pipeline_components

    pipe = load_pipeline(world["base"], device="cpu")
    family = pipeline_family(pipe)
    assert family.name == world["name"] and denoiser_of(pipe) is pipe.transformer
    options = family.call_options(pipe)
    captions = ["a red circle", "a blue square"]
    trained = family.encode_text(pipeline_components(pipe), captions)
    if world["name"] == "qwen_image":  # the tiny tokenizer's 64 tokens; captions padded to the longest, masked
        assert options == {"max_sequence_length": 64} and native_size(pipe) == 256  # 128 x the tiny VAE's 2
        captions = ["a red circle", "a blue square on a white background"]  # two lengths: a padded one
        trained = family.encode_text(pipeline_components(pipe), captions)
        sampled, mask = pipe.encode_prompt(captions, device="cpu", **options)
        assert trained["hidden"].shape[1] == 64 and torch.equal(trained["mask"][:, :mask.shape[1]], mask.bool())
        torch.testing.assert_close(trained["hidden"][:, :sampled.shape[1]], sampled.detach())
        return
    if world["name"] == "wan":  # UMT5 at the tiny T5 tokenizer's 16 tokens, zero past each caption; images are
        # one-frame videos, at WanPipeline's default height when none is given
        assert options == {"max_sequence_length": 16} and native_size(pipe) == 480
        sampled, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False, **options)
        torch.testing.assert_close(trained["hidden"], sampled.detach())
        return
    if world["name"] == "z_image":  # the tiny Qwen tokenizer's 64 tokens; unpadded captions, no pooled output
        assert options == {"max_sequence_length": 64} and native_size(pipe) == 1024
        sampled, _ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False, **options)
        for hidden, mask, caption in zip(trained["hidden"], trained["mask"], sampled):
            torch.testing.assert_close(hidden[mask], caption.detach())
        return
    assert options == {"max_sequence_length": 16}  # the tiny T5 tokenizer's model_max_length
    if world["name"].startswith("flux2"):  # one chat-templated LM, no pooled output
        torch.testing.assert_close(trained["hidden"], pipe.encode_prompt(captions, **options)[0])
        assert native_size(pipe) == 256  # default_sample_size 128 x the tiny VAE's factor 2
        return
    extra = {"prompt_3": None} if world["name"] == "sd3" else {}
    sampled = pipe.encode_prompt(prompt=captions, prompt_2=None, device="cpu", num_images_per_prompt=1,
                                 **extra, **options, **({"do_classifier_free_guidance": False}
                                                        if world["name"] == "sd3" else {}))
    hidden, pooled = (sampled[0], sampled[2]) if world["name"] == "sd3" else (sampled[0], sampled[1])
    torch.testing.assert_close(trained["hidden"], hidden.detach())
    torch.testing.assert_close(trained["pooled"], pooled.detach())
    assert native_size(pipe) == (32 if world["name"] == "sd3" else 256)


def test_tuned_transformer_and_lora_load_through_the_family(world):
    base = load_pipeline(world["base"], device="cpu")
    tuned = load_pipeline(world["base"], denoiser=world["tuned"], device="cpu")
    zero = load_pipeline(world["base"], lora=world["zero_lora"], device="cpu")
    first = output_layer(base.transformer).weight
    assert torch.allclose(output_layer(tuned.transformer).weight, first + 0.5)
    assert torch.equal(output_layer(zero.transformer).weight, first)
    args = dict(num_inference_steps=2, guidance_scale=3.5, height=32, width=32)
    a, b, c = (generate(p, ["a red circle"], [7], **args)[0] for p in (base, zero, tuned))
    assert a.size == (32, 32)
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()


def test_label_writes_pairs(world, tmp_path):
    cfg = load_config(label.LabelConfig, [], [
        f"model.pretrained={world['base']}", f"model.lora={world['zero_lora']}", f"prompts={world['prompts']}",
        "scorer.name=jpeg_compressibility", "candidates_per_prompt=2", "sampling.num_inference_steps=2",
        "sampling.guidance_scale=3.5", *SIZE, f"output_dir={tmp_path / 'pairs'}"])
    result = label.run(cfg)
    rows = pq.read_table(sorted((tmp_path / "pairs").glob("*.parquet"))).to_pylist()
    assert 1 <= result.pairs_written == len(rows) <= 2  # a prompt whose two scores tie exactly makes no pair
    assert all(r["score_0"] != r["score_1"] and r["seed_0"] != r["seed_1"] for r in rows)
    assert {r["width"] for r in rows} == {32} and all(r["model_0"].endswith(f"lora={world['zero_lora']}")
                                                     for r in rows)
    assert all({r["label_0"], r["label_1"]} == {0.0, 1.0} for r in rows)


def test_evaluate_identical_models_half_and_implicit_reward_half(world, tmp_path):
    """A zero LoRA is the base: every image pair identical (win rate exactly 0.5) and every implicit reward
    0, since both models see each pair's sigma and noise (accuracy 0.5; the tie row skipped)."""
    out = tmp_path / "eval"
    cfg = load_config(evaluate.EvaluateConfig, [], [
        f"model.pretrained={world['base']}", f"model.lora={world['zero_lora']}", f"prompts={world['prompts']}",
        "seeds=2", "scorers=jpeg_compressibility", "sampling.num_inference_steps=2", *SIZE, "n_boot=100",
        "grid_cell=32", f"implicit_reward.source={world['pairs']}", "implicit_reward.noise_draws=2",
        f"output_dir={out}"])
    summary = evaluate.run(cfg)
    report = json.loads((out / "report.json").read_text())
    assert report["scorers"]["jpeg_compressibility"]["win_rate"] == 0.5
    assert summary.implicit_reward.accuracy == 0.5 and report["implicit_reward"]["n_pairs"] == 2
    rows = [json.loads(line) for line in (out / "implicit_reward.jsonl").read_text().splitlines()]
    assert all(r["reward_w"] == r["reward_l"] == 0.0 and r["policy_mse_w"] > 0 for r in rows)


def test_implicit_reward_of_a_changed_transformer_follows_the_formula(world):
    from diffusion_dpo.evaluation.implicit_reward import labelled_pairs, score_pairs

    rows = pq.read_table(sorted(Path(world["pairs"]).glob("*.parquet"))).to_pylist()
    pairs, counts = labelled_pairs(rows, 0, world["pairs"], resolution=32)
    base = load_pipeline(world["base"], device="cpu")
    tuned = load_pipeline(world["base"], denoiser=world["tuned"], device="cpu")
    scores = score_pairs(tuned, base, pairs, beta_dpo=100.0, noise_draws=1, batch_size=1)
    again = score_pairs(tuned, base, pairs, beta_dpo=100.0, noise_draws=1, batch_size=2)
    assert counts["ties"] == 1
    # the reward is beta / 2 times a difference of two close errors, which magnifies the rounding of batched
    # kernels; the 27-layer Qwen3 of tiny klein rounds a little more between batch sizes than the others
    rel = 1e-4 if world["name"] == "flux2_klein" else 1e-5
    assert [s.reward_w for s in scores] == pytest.approx([s.reward_w for s in again], rel=rel)
    for s in scores:
        assert s.policy_mse_w != s.ref_mse_w
        assert s.reward_w == pytest.approx(0.5 * 100.0 * (s.ref_mse_w - s.policy_mse_w), rel=1e-5)
        assert s.correct == float(s.reward_w > s.reward_l) + 0.5 * (s.reward_w == s.reward_l)
