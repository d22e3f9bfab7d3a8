"""Tiny FLUX.2 pipelines, built from configs, offline: the layout of FLUX.2-dev (Flux2Pipeline: a Mistral-class
causal LM as text encoder, guidance embedded) and FLUX.2-klein (Flux2KleinPipeline: a Qwen3 causal LM,
classifier-free guidance) at a size that trains in seconds on a CPU. ``tiny.build_tiny_pipeline`` calls this.

The text encoders are deep enough (30 and 27 layers, 16 wide) for the hidden states the pipelines stack
(layers 10, 20, 30 and 9, 18, 27), so the conditioning is 48 wide. The VAE is an AutoencoderKLFlux2 with
4 latent channels (16 after the 2x2 patchify) and batch-norm statistics set away from (0, 1) so the
normalisation is exercised.
"""

from __future__ import annotations

from pathlib import Path

# The tiny chat template renders the user turns only (no system message), so a 16-token sequence holds
# the caption; the content may be a string (Qwen3's messages) or a list of typed parts (Mistral-3's).
CHAT_TEMPLATE = (
    "{%- for m in messages if m['role'] == 'user' -%}[INST] "
    "{%- if m['content'] is string %} {{ m['content'] }}{% else %}{% for p in m['content'] %} {{ p['text'] }}"
    "{% endfor %}{% endif %} [/INST]{%- endfor -%}"
)
SPECIALS = ["<pad>", "<unk>", "[INST]", "[/INST]"]


def write_chat_tokenizer(path: str | Path, words, max_length: int = 16) -> Path:
    """Save a word-level fast tokenizer with a chat template: ``<pad>`` 0, ``<unk>`` 1, the instruction
    markers, each of ``words`` one token (lower-cased; anything else is ``<unk>``)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + list(dict.fromkeys(w.lower() for w in words)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                        model_max_length=max_length, chat_template=CHAT_TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIALS[2:]})
    tokenizer.save_pretrained(str(path))
    return Path(path)


def _text_encoder(family: str, vocab_size: int):
    if family == "flux2":
        from transformers import MistralConfig, MistralForCausalLM

        return MistralForCausalLM(MistralConfig(
            vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=30,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64, pad_token_id=0))
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=27, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=64, pad_token_id=0))


def tiny_flux2_pipeline(family: str, path: Path, words, resolution: int):
    """A Flux2Pipeline (``family`` "flux2") or Flux2KleinPipeline ("flux2_klein") with random weights
    (seed the global generator first); ``resolution`` px images, latents resolution / 2 before the patchify."""
    import torch
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Flux2KleinPipeline,
        Flux2Pipeline,
        Flux2Transformer2DModel,
    )
    from transformers import PreTrainedTokenizerFast

    folder = write_chat_tokenizer(path / "_chat_tokenizer_build", words)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(folder))
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    text_encoder = _text_encoder(family, len(tokenizer))
    vae = AutoencoderKLFlux2(
        block_out_channels=(32, 32), latent_channels=4, norm_num_groups=16, sample_size=resolution,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    with torch.no_grad():
        vae.bn.running_mean.uniform_(-0.5, 0.5)
        vae.bn.running_var.uniform_(0.25, 4.0)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=family == "flux2")
    # FLUX.2's scheduler config: shifted by mu (compute_empirical_mu) on every call
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096,
                                                time_shift_type="exponential")
    pipeline = Flux2Pipeline if family == "flux2" else Flux2KleinPipeline
    return pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                    transformer=transformer)
