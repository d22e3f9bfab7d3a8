"""Loading, wrapping and saving the language models of the LLM recipes (transformers + peft).

A model path is a hub id or a local folder, either a full model or a LoRA adapter folder written by these
recipes (``adapter_config.json``); an adapter is loaded onto its base and merged, so the output of one stage
(SFT with LoRA, say) is the input of the next.

Reward and value models are sequence-classification models (one output) read at every position by
:class:`TokenScorer`; the reward is the score at the last real token. Transformers' own pooling finds that
token by comparing ids with the pad id, which goes wrong when pad and EOS are the same token (the EOS that
ends every completion would count as padding); the attention mask does not have that problem.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from diffusion_dpo.config import option
from diffusion_dpo.errors import InputError
from scorers.hub import from_hub, load_pretrained, looks_local

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
NORMALIZATION_FILE = "reward_normalization.json"
VALUE_HEAD_FILE = "value_head.safetensors"


@dataclass
class LoraSection:
    enabled: bool = option(
        False, "train LoRA adapters (peft) instead of all weights; final/ then holds the adapter"
    )
    r: int = option(16, "LoRA rank")
    alpha: int = option(32, "LoRA alpha (the update is scaled by alpha / r)")
    dropout: float = option(
        0.0, "dropout on the LoRA input (0 keeps policy and reference log-probs consistent)"
    )
    target_modules: list[str] = option(
        ["all-linear"], "module names to adapt; 'all-linear' = every linear layer except the output head"
    )


@dataclass
class ModelConfig:
    name_or_path: str = option(
        DEFAULT_MODEL,
        "hub id or local folder of the model (a LoRA adapter folder "
        "written by these recipes is merged onto its base)",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto",
        "dtype of frozen weights (reference, reward model, base under LoRA); 'auto' = bfloat16 on GPU, "
        "float32 on CPU. Trained weights are float32; mixed_precision sets the compute dtype",
    )
    gradient_checkpointing: bool = option(
        False, "recompute activations in the backward pass (less memory, ~30% slower)"
    )
    attn_implementation: str | None = option(
        None,
        "transformers attention backend ('sdpa', 'eager', 'flash_attention_2'); null = the library default",
    )
    lora: LoraSection = option(LoraSection, "LoRA adapters")


def frozen_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_tokenizer(path: str, option: str = "model.name_or_path"):
    """The model's tokenizer, right padding; a tokenizer without a pad token pads with EOS. ``option``: the
    config key ``path`` came from, named in the error when it cannot be loaded."""
    from transformers import AutoTokenizer

    tok = load_pretrained(AutoTokenizer, path, option=option, what="tokenizer")
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise InputError(f"the tokenizer of {path} has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def _is_adapter(path: str) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def _from_pretrained(auto_cls, name: str, option: str, what: str, kwargs: dict):
    """``auto_cls.from_pretrained(name, **kwargs)`` for a folder or a hub id, with the errors of scorers.hub."""
    if looks_local(name):
        return load_pretrained(auto_cls, name, option=option, what=what, **kwargs)
    # transformers 5 does not hand local_files_only on to its look-up of a hub adapter, which then retries an
    # unreachable hub for half a minute before the cache-only attempt can fail.
    return from_hub(lambda local_only: auto_cls.from_pretrained(
        name, local_files_only=local_only, adapter_kwargs={"local_files_only": local_only}, **kwargs),
        what, f"hub id {name!r}", option)


def _load(auto_cls, path: str, dtype: torch.dtype, attn: str | None, option: str, **kwargs):
    """``auto_cls`` from a hub id or folder (an adapter folder: its base, with the adapter merged in)."""
    kwargs = {"dtype": dtype, **({"attn_implementation": attn} if attn else {}), **kwargs}
    if not _is_adapter(path):
        return _from_pretrained(auto_cls, path, option, "model", kwargs)
    from peft import PeftConfig, PeftModel

    try:
        base = PeftConfig.from_pretrained(path).base_model_name_or_path
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read the LoRA adapter folder {path} (option {option}=): {e}") from None
    model = _from_pretrained(auto_cls, base, f"base_model_name_or_path in {path}/adapter_config.json",
                             f"base model of the adapter {path}", kwargs)
    try:
        return PeftModel.from_pretrained(model, path).merge_and_unload()
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load the LoRA adapter {path} (option {option}=) onto its base: {e}") from None


def load_causal_lm(
    path: str, dtype: torch.dtype = torch.float32, attn: str | None = None, option: str = "model.name_or_path"
):
    """A causal LM from a hub id or folder; ``option`` is the config key ``path`` came from (for errors)."""
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM, path, dtype, attn, option)


def load_score_model(
    path: str,
    pad_token_id: int,
    dtype: torch.dtype = torch.float32,
    attn: str | None = None,
    option: str = "model.name_or_path",
    trained_head: bool = False,
) -> tuple[nn.Module, float]:
    """A sequence-classification model with one output (a new, randomly initialised head when ``path`` is a
    causal LM), and the bias from reward-model normalisation (0.0 when the folder has none). ``option`` is
    the config key ``path`` came from (for errors). ``trained_head``: ``path`` must be a reward model, whose
    score head was trained; a causal LM (transformers would make a random head) is refused."""
    from transformers import AutoModelForSequenceClassification

    check_info = trained_head and not _is_adapter(path)
    if trained_head and not check_info:
        task = json.loads((Path(path) / "adapter_config.json").read_text()).get("task_type")
        if task != "SEQ_CLS":
            raise InputError(_not_a_reward_model(path, option, f"its LoRA adapter is for {task}, not SEQ_CLS"))
    model = _load(AutoModelForSequenceClassification, path, dtype, attn, option, num_labels=1,
                  **({"output_loading_info": True} if check_info else {}))
    if check_info:
        model, info = model
        new = sorted(k for k in info["missing_keys"] if k.split(".")[0] in ("score", "classifier"))
        if new:
            raise InputError(_not_a_reward_model(path, option, f"transformers would initialise its "
                                                 f"{', '.join(new)} at random"))
    model.config.pad_token_id = pad_token_id
    norm = Path(path) / NORMALIZATION_FILE
    bias = json.loads(norm.read_text())["bias"] if norm.is_file() else 0.0
    return model, float(bias)


def _not_a_reward_model(path: str, option: str, why: str) -> str:
    return (f"{option}={path} is not a reward model: it has no trained score head ({why}); train one from it "
            "with `diffusion-dpo llm reward` and give that run's final/ folder")


def add_lora(model, cfg: LoraSection, task_type: str):
    """Wrap ``model`` with fresh LoRA adapters (task_type "CAUSAL_LM" or "SEQ_CLS"; SEQ_CLS also trains the
    score head in full)."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.target_modules[0] if cfg.target_modules == ["all-linear"] else cfg.target_modules
    config = LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, task_type=task_type
    )
    return get_peft_model(model, config)


def prepare_trainable(model, cfg: ModelConfig, task_type: str):
    """Dropout off (policy and reference log-probs must agree, and DPO/PPO/RM losses assume a deterministic
    model), LoRA if asked, gradient checkpointing if asked."""
    disable_dropout(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora.enabled:
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
        model = add_lora(model, cfg.lora, task_type)
    return model


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def disable_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper (adapters stay active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def last_token(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """values [B, T] read at each row's last real token (right or left padding). Returns [B]."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (positions * attention_mask.long()).argmax(-1)
    return values[torch.arange(values.shape[0], device=values.device), last]


class TokenScorer(nn.Module):
    """A one-output sequence-classification model read at every position: forward -> scores [B, T] float32.

    The reward of a sequence is ``last_token(scores, attention_mask)``; a value model uses every position.
    ``bias`` is added to every score (reward-model normalisation).
    """

    def __init__(self, model: nn.Module, bias: float = 0.0):
        super().__init__()
        self.model = model
        self.bias = bias

    def forward(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        hf = hf_model(self.model)
        backbone = getattr(hf, hf.base_model_prefix)
        hidden = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        return hf.score(hidden).squeeze(-1).float() + self.bias


class PolicyWithValueHead(nn.Module):
    """A causal LM and, optionally, a linear value head on its last hidden state.

    forward -> (logits [B, T, V], values [B, T] float32 or None). One module so that accelerate/DDP wraps
    policy and head together.
    """

    def __init__(self, lm: nn.Module, value_head: bool):
        super().__init__()
        self.lm = lm
        self.value_head = None
        if value_head:
            hidden = hf_model(lm).config.get_text_config().hidden_size
            self.value_head = nn.Linear(hidden, 1)
            nn.init.zeros_(self.value_head.weight)  # values start at 0 rather than at noise
            nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, position_ids=None):
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            output_hidden_states=self.value_head is not None,
        )
        if self.value_head is None:
            return out.logits, None
        hidden = out.hidden_states[-1]
        return out.logits, self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    pad_token_id: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    do_sample: bool = True,
    synced: bool = False,
) -> torch.Tensor:
    """Sample continuations of left-padded prompts [B, Tq]. Returns the new tokens only, [B, Tr] with
    Tr <= max_new_tokens; after a row's EOS the tokens are padding (use ``rl.response_mask``). ``synced``: a
    process whose rows have all ended keeps running forwards (without sampling) until every process's have,
    as a sharded model needs: each forward gathers its layers from all processes."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        use_cache=True,
    )
    out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                         synced_gpus=synced)
    return out[:, input_ids.shape[1] :]


def save_pretrained(model: nn.Module, tokenizer, path: Path) -> None:
    """save_pretrained of ``model`` (unwrapped; a LoRA adapter for a peft model) and its tokenizer into
    ``path``."""
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
