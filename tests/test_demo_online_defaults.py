"""The online demo's keys: each (method, family) takes its measured defaults where a key is left null, and
every online.* key reaches the grpo run it configures."""

from diffusion_dpo.config import load_config


def test_demo_online_defaults_follow_method_and_family():
    """online.* keys left null take their (method, family)'s measured defaults; given keys win."""
    from diffusion_dpo.recipes import demo
    from diffusion_dpo.recipes.demo_online import FAMILY_ONLINE_DEFAULTS, resolve_online_defaults

    def resolved(*overrides):
        return resolve_online_defaults(load_config(demo.DemoConfig, [], list(overrides))).online

    sd, flow = resolved("method=grpo"), resolved("method=grpo", "family=flow")
    assert (sd.model.lora_rank, sd.optim.learning_rate, sd.kl_coef) == (8, 1e-3, 0.04)
    assert (flow.model.lora_rank, flow.optim.learning_rate, flow.kl_coef) == (32, 3e-4, 0.0)
    for o, steps, prompts, window, group, images in ((sd, 10, 4, 2, 8, 1536), (flow, 20, 8, 4, 16, 3072)):
        # GRPO: a window and a shared start; on the flow base groups of 16 for 24 steps
        assert (o.sde_window_size, o.train_steps, o.updates_per_epoch, o.shared_start_noise) == (window,) * 3 + (True,)
        assert (o.sampling.num_inference_steps, o.prompts_per_step, o.group_size) == (steps, prompts, group)
        assert o.prompts_per_step * o.group_size * o.optim.max_steps == images
    nft, nft_flow = resolved("method=nft"), resolved("method=nft", "family=flow")
    assert (nft.sde_window_size, nft.train_steps, nft.shared_start_noise, nft.optim.max_steps) == (0, 3, False, 48)
    assert (nft.group_size, nft.kl_coef, nft_flow.group_size, nft_flow.kl_coef) == (8, 1e-4, 16, 0.3)
    assert nft_flow.prompts_per_step * nft_flow.group_size * nft_flow.optim.max_steps == 3072
    assert resolved("method=grpo", "family=flow", "online.group_size=4").group_size == 4
    assert resolved("method=online_dpo", "family=flow").beta_dpo == 500.0
    assert resolved("method=grpo", "family=flow", "online.kl_coef=0.01").kl_coef == 0.01
    assert set(FAMILY_ONLINE_DEFAULTS) == {(m, f) for m in ("grpo", "online_dpo", "nft") for f in ("sd", "flow", "video")}


def test_demo_online_keys_reach_the_grpo_run(tmp_path):
    """The demo's online.* keys set the grpo keys they are named after: the window's mode and start, the
    always-trained first steps, the trained fraction, nft's group noise and beta, the advantage scope, the flow SDE; online.kl_coef
    is grpo's kl_coef or nft's nft_kl_coef; online.ema_decay is ema.decay with final/ written from the EMA
    (the weights the demo evaluates)."""
    from diffusion_dpo.recipes import demo
    from diffusion_dpo.recipes.demo_online import grpo_config, resolve_online_defaults

    def run_config(*overrides):
        cfg = resolve_online_defaults(load_config(demo.DemoConfig, [], list(overrides)))
        return grpo_config(cfg, "base", tmp_path / "train.txt", tmp_path / "tune", None)

    g = run_config("method=grpo", "online.sde_window_size=2", "online.sde_window=fixed", "online.sde_window_start=1",
                   "online.first_steps=1", "online.kl_coef=0.5", "online.ema_decay=0.9", "online.trained_fraction=0.5")
    assert (g.online.sde_window, g.online.sde_window_start, g.online.first_steps) == ("fixed", 1, 1)
    assert g.online.trained_fraction == 0.5 and g.eligible_steps() == 5  # the first half of the 10 steps
    assert g.online.kl_coef == 0.5 and (g.ema.decay, g.ema.final) == (0.9, True)
    n = run_config("method=nft", "family=flow", "online.kl_coef=0.25", "online.nft_group_noise=true", "online.nft_beta=0.1",
                   "online.advantage_scope=group_batch_std", "online.sampling.sde=cps")
    assert (n.online.nft_kl_coef, n.online.nft_group_noise, n.online.nft_beta, n.online.advantage_scope, n.ema.decay,
            n.ema.final, n.sampling.sde) == (0.25, True, 0.1, "group_batch_std", 0, False, "cps")


def test_the_flow_base_evaluates_sixteen_images_per_held_out_prompt(tmp_path):
    """eval_seeds left null is the family's, for the offline and the online demo alike: 16 images per
    held-out prompt on the flow base (its gains are smaller), 4 on sd and video; a given value wins. The
    evaluation the demo runs takes it."""
    from pathlib import Path

    from diffusion_dpo.recipes import demo
    from diffusion_dpo.recipes.demo_common import evaluate_config
    from diffusion_dpo.recipes.demo_online import resolve_online_defaults

    def seeds(*overrides):
        cfg = load_config(demo.DemoConfig, [], list(overrides))
        resolve = resolve_online_defaults if cfg.method != "offline_dpo" else demo.resolve_defaults
        return evaluate_config(resolve(cfg), "base", "tuned", Path("held_out.txt"), tmp_path, None).seeds

    for method in ("offline_dpo", "grpo", "nft", "online_dpo"):
        got = [seeds(f"method={method}", f"family={f}") for f in ("sd", "flow", "video")]
        assert got == [4, 16, 4], method
    assert seeds("family=flow", "eval_seeds=4") == 4 and seeds("method=grpo", "eval_seeds=2") == 2
