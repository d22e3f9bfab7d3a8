"""Language-model paths of diffusion-dpo: SFT, reward model, DPO and PPO (RLHF) on transformers, peft and
accelerate, sharing ``diffusion_dpo.losses`` with the diffusion trainer.

    diffusion-dpo llm sft|reward|dpo|ppo [--config FILE.yaml] [key=value ...]

Components: ``data`` (rows -> token ids), ``logprobs`` (sequence log-probs), ``rl`` (GAE, KL estimators,
whitening, KL controllers), ``models`` (loading, LoRA, reward/value scorers), ``common`` (the data section,
training and held-out examples). The recipes are ``diffusion_dpo.recipes.llm_sft``, ``llm_reward``,
``llm_dpo`` and ``llm_ppo``, each with a config dataclass, ``run(cfg) -> dict`` and ``main(argv)``, on the
training engine (``diffusion_dpo.engine``); ``diffusion_dpo.cli`` lists them as the methods of ``llm``.
``tiny`` builds tiny models and a synthetic preference world for tests and the offline example.
"""
