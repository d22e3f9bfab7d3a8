"""Components of online reward tuning for diffusion models (GRPO, online DPO), independent of the
model family.

    transitions   Gaussian denoising transitions with log-probs: DDIM with eta > 0, the flow-matching SDE
    trajectory    sampling a trajectory with per-step log-probs; recomputing a recorded step's log-prob
    advantages    per-prompt group (or whole-batch) normalisation of rewards
    objective     the clipped importance-ratio loss per transition, its metrics, the KL to the reference
    step_choice   which K of the T transitions of each sample to train on
    monitors      image statistics that reveal reward hacking (brightness, saturation, JPEG size, black)
"""
