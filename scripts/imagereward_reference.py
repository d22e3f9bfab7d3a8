"""Reference ImageReward scores for tests/test_scorers_reward_models.py, made with the authors' package.

The `image-reward` package (1.5) needs transformers 4.x (its BLIP code imports helpers that transformers 5
removed), timm 0.6 and fairscale, so it runs in a separate environment:

    python -m venv /tmp/refenv
    echo "$(python -c 'import site; print(site.getsitepackages()[0])')" > /tmp/refenv/lib/python3.11/site-packages/zz.pth
    /tmp/refenv/bin/pip install --no-deps transformers==4.45.2 tokenizers==0.20.3 timm==0.6.13 \
        fairscale==0.4.13 huggingface_hub==0.25.2 image-reward==1.5
    /tmp/refenv/bin/python scripts/imagereward_reference.py      # writes tests/data/imagereward_reference.json

(The .pth line lets that environment use this one's torch; its own transformers comes first.) The script
builds the reference ``ImageReward`` module with a tiny ViT, a tiny BERT and the MLP head, gives it the
seeded weights of tests/reward_fixtures.py, and scores the fixture images and prompts with the package's
own ``score`` (its preprocessing, tokenisation to 35 tokens and normalisation). The JSON holds the
tensor shapes (the test regenerates the same weights from them) and the scores.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
OUT = REPO / "tests" / "data" / "imagereward_reference.json"


def import_reference():
    """The package's ImageReward module, without its __init__ (which imports OpenAI's `clip` for the
    CLIP and aesthetic baselines we do not need)."""
    spec = importlib.util.find_spec("ImageReward")
    if spec is None:
        sys.exit("the image-reward package is not installed in this environment (see this script's docstring)")
    root = Path(spec.submodule_search_locations[0])
    for name, folder in [("ImageReward", root), ("ImageReward.models", root / "models")]:
        module = types.ModuleType(name)
        module.__path__ = [str(folder)]
        sys.modules[name] = module
    import ImageReward.ImageReward as reference  # noqa: E402

    return reference


def main() -> None:
    import torch
    from reward_fixtures import (
        PROMPTS,
        TINY_MED_CONFIG,
        TINY_VIT,
        seeded_state,
        tiny_images,
        write_bert_vocab,
    )
    from transformers import BertTokenizer

    reference = import_reference()
    from ImageReward.models.BLIP.med import BertConfig, BertModel
    from ImageReward.models.BLIP.vit import VisionTransformer

    model = reference.ImageReward.__new__(reference.ImageReward)
    torch.nn.Module.__init__(model)
    model.device = "cpu"
    model.blip = torch.nn.Module()
    model.blip.visual_encoder = VisionTransformer(**TINY_VIT)
    model.blip.text_encoder = BertModel(config=BertConfig(**TINY_MED_CONFIG), add_pooling_layer=False)
    with tempfile.TemporaryDirectory() as folder:
        tokenizer = BertTokenizer.from_pretrained(str(write_bert_vocab(folder)))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    model.blip.tokenizer = tokenizer
    model.preprocess = reference._transform(TINY_VIT["img_size"])
    model.mlp = reference.MLP(TINY_MED_CONFIG["hidden_size"])
    model.mean, model.std = 0.16717362830052426, 1.0333394966054072

    shapes = {k: list(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    model.load_state_dict(seeded_state(shapes), strict=False)
    model.eval()
    with torch.no_grad():
        scores = [model.score(prompt, image) for prompt, image in zip(PROMPTS, tiny_images())]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"made_by": "scripts/imagereward_reference.py with image-reward 1.5",
                               "shapes": shapes, "scores": scores}, indent=1) + "\n")
    print(OUT, scores)


if __name__ == "__main__":
    main()
