"""Reference HPSv3 scores for tests/test_scorers_reward_models.py, made with the authors' `hpsv3` package.

`hpsv3` 1.0.0 pins transformers 4.45.2, so it runs in the separate environment described in
scripts/imagereward_reference.py (add ``hpsv3==1.0.0 qwen-vl-utils`` to its pip line), then:

    /tmp/refenv/bin/python scripts/hpsv3_reference.py       # writes tests/data/hpsv3_reference.json

The script builds the package's ``Qwen2VLRewardModelBT`` on the tiny Qwen2-VL of tests/reward_fixtures.py
(with the package's ranknet head and <|Reward|> token, as its ``create_model_and_processor`` sets them up),
gives it the seeded weights, and scores the fixture images and prompts the way ``HPSv3RewardInferencer``
does: the package's ``process_vision_info`` resizing to 256 * 28 * 28 pixels, its instruction, the
processor's chat template, right padding, mu of the head at <|Reward|>. The package's __init__ and trainer
pull in training-only packages (trl, datasets, omegaconf, fire), which are stubbed out here.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
OUT = REPO / "tests" / "data" / "hpsv3_reference.json"
PIXELS = 256 * 28 * 28


def import_reference():
    """The package's reward model class, collator strings and vision-info helper."""
    spec = importlib.util.find_spec("hpsv3")
    if spec is None:
        sys.exit("the hpsv3 package is not installed in this environment (see this script's docstring)")
    package = types.ModuleType("hpsv3")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["hpsv3"] = package
    for name in ("trl", "datasets", "omegaconf"):  # imported by the training code only
        stub = types.ModuleType(name)
        stub.RewardTrainer = stub.Dataset = stub.OmegaConf = object
        stub.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules.setdefault(name, stub)
    from hpsv3.dataset import data_collator_qwen, utils
    from hpsv3.model.qwen2vl_trainer import Qwen2VLRewardModelBT

    return Qwen2VLRewardModelBT, data_collator_qwen, utils


def main() -> None:
    import torch
    from reward_fixtures import (
        PROMPTS,
        QWEN_SPECIAL,
        TINY_QWEN_TEXT,
        TINY_QWEN_VISION,
        seeded_state,
        tiny_images,
        tiny_qwen2_vl_processor,
    )
    from transformers import Qwen2VLConfig

    model_class, collator, vision_utils = import_reference()
    processor = tiny_qwen2_vl_processor(max_pixels=PIXELS)
    processor.tokenizer.padding_side = "right"
    tokenizer = processor.tokenizer
    base_vocab = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|Reward|>"]})
    reward_id = tokenizer.convert_tokens_to_ids("<|Reward|>")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL}
    eos = tokenizer.convert_tokens_to_ids("<eos>")
    config = Qwen2VLConfig(**TINY_QWEN_TEXT, vocab_size=base_vocab, bos_token_id=eos, eos_token_id=eos,
                           pad_token_id=0, rope_theta=10000.0, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                           vision_config=TINY_QWEN_VISION, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], attn_implementation="sdpa")
    model = model_class(config, output_dim=2, reward_token="special", special_token_ids=[reward_id],
                        rm_head_type="ranknet", rm_head_kwargs=None)
    model.resize_token_embeddings(len(tokenizer))
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(seeded_state(shapes), strict=True)
    model.eval()

    messages = [[{"role": "user", "content": [
        {"type": "image", "image": image, "min_pixels": PIXELS, "max_pixels": PIXELS},
        {"type": "text", "text": collator.INSTRUCTION.format(text_prompt=prompt) + collator.prompt_with_special_token},
    ]}] for prompt, image in zip(PROMPTS, tiny_images())]
    images, _ = vision_utils.process_vision_info(messages)
    batch = processor(text=processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                      images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        mu_sigma = model(return_dict=True, **batch)["logits"]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"made_by": "scripts/hpsv3_reference.py with hpsv3 1.0.0 (transformers 4.45.2)",
                               "shapes": shapes, "mu_sigma": mu_sigma.tolist()}, indent=1) + "\n")
    print(OUT, mu_sigma.tolist())


if __name__ == "__main__":
    main()
