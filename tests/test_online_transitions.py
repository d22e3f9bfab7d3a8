"""DDIM (eta > 0) and flow-SDE transitions: hand-worked means and stds, log-probs against
torch.distributions.Normal, the deterministic limits against diffusers' own schedulers."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from torch.distributions import Normal

from diffusion_dpo.errors import InputError
from diffusion_dpo.online import transitions as tr

T = torch.tensor


def test_gaussian_logprob_matches_normal_mean_and_sum():
    g = torch.Generator().manual_seed(0)
    x, mean = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    std = T([0.5, 1.0, 2.0]).view(3, 1, 1, 1)
    by_hand = Normal(mean, std.expand_as(mean)).log_prob(x)
    assert torch.allclose(tr.gaussian_logprob(x, mean, std), by_hand.mean(dim=(1, 2, 3)), atol=1e-6)
    assert torch.allclose(tr.gaussian_logprob(x, mean, std, "sum"), by_hand.sum(dim=(1, 2, 3)), atol=1e-4)
    with pytest.raises(InputError, match="reduction"):
        tr.gaussian_logprob(x, mean, std, "max")
    with pytest.raises(InputError, match="std 0"):
        tr.gaussian_logprob(x, mean, torch.zeros(3, 1, 1, 1))


def test_ddim_transition_hand_worked_epsilon_and_v():
    # abar_t 0.64, abar_prev 0.81, eta 1, x 1, model output 0.5
    # std^2 = (0.19 / 0.36) * (1 - 0.64 / 0.81) = 0.1107682, std = 0.3328185; sqrt(0.19 - std^2) = 0.2814815
    # epsilon: x0 = (1 - 0.6 * 0.5) / 0.8 = 0.875, mean = 0.9 * 0.875 + 0.2814815 * 0.5 = 0.9282407
    # v:       x0 = 0.8 * 1 - 0.6 * 0.5 = 0.5, eps = 0.8 * 0.5 + 0.6 * 1 = 1,
    #          mean = 0.45 + 0.2814815 = 0.7314815
    x, out, a, a_prev = T([[1.0]]), T([[0.5]]), T(0.64), T(0.81)
    mean, std = tr.ddim_transition(x, out, a, a_prev, 1.0, "epsilon")
    assert mean.item() == pytest.approx(0.9282407, abs=1e-6)
    assert std.item() == pytest.approx(0.3328185, abs=1e-6)
    mean_v, std_v = tr.ddim_transition(x, out, a, a_prev, 1.0, "v_prediction")
    assert mean_v.item() == pytest.approx(0.7314815, abs=1e-6)
    assert std_v.item() == pytest.approx(0.3328185, abs=1e-6)
    # eta 0: std 0 and mean = 0.9 * 0.875 + sqrt(0.19) * 0.5 = 1.0054446 (the deterministic DDIM step)
    mean0, std0 = tr.ddim_transition(x, out, a, a_prev, 0.0)
    assert (mean0.item(), std0.item()) == (pytest.approx(0.7875 + math.sqrt(0.19) * 0.5, abs=1e-6), 0.0)
    # the log-prob of x_prev = 1.2 under N(0.9282407, 0.3328185^2)
    logp = tr.ddim_logprob(T([[1.2]]), x, out, a, a_prev, 1.0)
    assert logp.item() == pytest.approx(Normal(0.9282407, 0.3328185).log_prob(T(1.2)).item(), abs=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_schedule_matches_diffusers_step(prediction_type, eta):
    scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, prediction_type=prediction_type)
    schedule = tr.DDIMSchedule.from_scheduler(scheduler, 4, eta=eta)
    assert schedule.timesteps.tolist() == [750, 500, 250, 0]
    g = torch.Generator().manual_seed(1)
    x, out, z = (torch.randn(2, 4, 3, 3, generator=g) for _ in range(3))
    for i, t in enumerate(scheduler.timesteps):
        mean, std = schedule.mean_std(x, out, torch.full((2,), i))
        expected = scheduler.step(out, t, x, eta=eta, variance_noise=z).prev_sample
        assert torch.allclose(mean + std * z, expected, atol=1e-5), (i, int(t))


def test_ddim_schedule_checks():
    with pytest.raises(InputError, match="prediction_type"):
        tr.DDIMSchedule(T([0.5]), T([0.9]), T([500]), 1.0, "sample")
    with pytest.raises(InputError, match=r"\(0, 1\]"):
        tr.DDIMSchedule(T([0.5]), T([1.5]), T([500]))


def test_flow_sde_transition_hand_worked():
    # t 0.5 -> 0.25 (dt = -0.25), a 0.7: sigma_t = 0.7 * sqrt(0.5 / 0.5) = 0.7
    # x 1, v 2: mean = 1 + [2 + 0.49 / 1 * (1 + 0.5 * 2)] * -0.25 = 1 - 2.98 / 4 = 0.255
    # std = 0.7 * sqrt(0.25) = 0.35
    mean, std = tr.flow_sde_transition(T([[1.0]]), T([[2.0]]), T(0.5), T(0.25), T(0.7))
    assert (mean.item(), std.item()) == (pytest.approx(0.255, abs=1e-6), pytest.approx(0.35, abs=1e-6))
    logp = tr.flow_sde_logprob(T([[0.4]]), T([[1.0]]), T([[2.0]]), T(0.5), T(0.25), T(0.7))
    assert logp.item() == pytest.approx(Normal(0.255, 0.35).log_prob(T(0.4)).item(), abs=1e-6)
    # sigma_t = 0 is the Euler step of the ODE: 1 + 2 * -0.25 = 0.5
    mean0, std0 = tr.flow_sde_transition(T([[1.0]]), T([[2.0]]), T(0.5), T(0.25), T(0.0))
    assert (mean0.item(), std0.item()) == (0.5, 0.0)


def test_flow_schedule_sde_sigmas_and_diffusers_euler_limit():
    scheduler = FlowMatchEulerDiscreteScheduler()
    schedule = tr.FlowSDESchedule.from_scheduler(scheduler, 4, noise_level=0.5)
    s = schedule.sigmas.tolist()
    assert len(s) == 5 and s[0] == 1.0 and s[-1] == 0.0
    # at t = 1 the denominator 1 - t uses the second sigma (0.667): 0.5 * sqrt(1 / 0.333)
    expected = [0.5 * math.sqrt(1 / (1 - s[1]))] + [0.5 * math.sqrt(t / (1 - t)) for t in s[1:4]]
    assert schedule.sde_sigmas().tolist() == pytest.approx(expected, rel=1e-5)
    euler = tr.FlowSDESchedule(schedule.sigmas, schedule.timesteps, noise_level=0.0)
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    for i, t in enumerate(scheduler.timesteps):
        mean, _ = euler.mean_std(x, v, torch.full((2,), i))
        assert torch.allclose(mean, scheduler.step(v, t, x).prev_sample, atol=1e-6), i


def test_flow_schedule_checks():
    with pytest.raises(InputError, match="decrease strictly"):
        tr.FlowSDESchedule(T([1.0, 0.5, 0.6, 0.0]), T([1.0, 0.5, 0.6]))
    with pytest.raises(InputError, match="exactly 0"):
        tr.FlowSDESchedule(T([1.0, 0.5]), T([1.0]))
    with pytest.raises(InputError, match=r"\[T \+ 1\]"):
        tr.FlowSDESchedule(T([1.0, 0.5, 0.0]), T([1.0]))


def test_draw_transition_uses_each_samples_generator():
    mean, std = torch.zeros(2, 3), T([[1.0], [2.0]])
    x = tr.draw_transition(mean, std, [torch.Generator().manual_seed(s) for s in (5, 6)])
    assert torch.equal(x[1], 2 * torch.randn(3, generator=torch.Generator().manual_seed(6)))
    with pytest.raises(InputError, match="one per sample"):
        tr.draw_transition(mean, std, [torch.Generator()])


def test_flow_sde_mean_equals_the_expanded_form():
    # the same drift written per coefficient: x (1 + s^2 dt / (2t)) + v (1 + s^2 (1 - t) / (2t)) dt
    g = torch.Generator().manual_seed(3)
    x, v = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    t, t_next, s = T([[0.8], [0.3]]), T([[0.6], [0.1]]), T([[0.9], [0.4]])
    dt = t_next - t
    expanded = x * (1 + s**2 * dt / (2 * t)) + v * (1 + s**2 * (1 - t) / (2 * t)) * dt
    mean, std = tr.flow_sde_transition(x, v, t, t_next, s)
    assert torch.allclose(mean, expanded, atol=1e-6)
    assert torch.allclose(std, s * torch.sqrt(t - t_next))


def test_flux_without_dynamic_shifting_samples_at_the_pipelines_sigmas():
    """FluxPipeline hands every scheduler sigmas linspace(1, 1/T, T); a schnell-style config (no dynamic
    shifting, shift 1) at T = 4 samples at 1, .75, .5, .25 — not the scheduler's own 1, .667, .334, .001."""
    from types import SimpleNamespace

    from diffusion_dpo.families.flux import FluxFamily
    from diffusion_dpo.families.sd3 import SD3Family
    from diffusion_dpo.online.rollout import sampling_schedule

    def schedule(family, scheduler):
        comps = SimpleNamespace(family=family, noise_scheduler=scheduler)
        return sampling_schedule(comps, num_inference_steps=4, eta=0.0, noise_level=0.7, latent_hw=(8, 8))

    flux = schedule(FluxFamily(), FlowMatchEulerDiscreteScheduler(shift=1.0))
    assert torch.allclose(flux.sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert torch.allclose(flux.timesteps, torch.tensor([1000.0, 750.0, 500.0, 250.0]))
    # SD3's pipeline lets the scheduler space them: unchanged
    sd3 = schedule(SD3Family(), FlowMatchEulerDiscreteScheduler(shift=1.0))
    assert torch.allclose(sd3.sigmas, torch.tensor([1.0, 0.667, 0.334, 0.001, 0.0]), atol=1e-3)


def test_detached_uncond_moves_the_weights_through_the_conditional_branch_only():
    """u + w (c - u) with u = a x and c = a x + b (a toy denoiser): d/da = x + w (x - x) = x with u attached;
    with u detached only w * d(c)/da = w x remains."""
    from types import SimpleNamespace

    from diffusion_dpo.families.sd import SDFamily
    from diffusion_dpo.online.rollout import Conditioning, guided_predict

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor(2.0))

    def forward(denoiser, x, t, text, image):
        return denoiser.a * x + text["bias"].view(-1, 1, 1, 1)

    family = SDFamily()  # its guidance u + w (c - u), with the toy denoiser's call
    family.forward = forward
    schedule = SimpleNamespace(timesteps=torch.tensor([999.0]))
    cond = Conditioning(text={"bias": torch.tensor([1.0])}, uncond={"bias": torch.tensor([0.0])}, image={},
                        guidance_scale=4.0)
    x = torch.full((1, 1, 1, 1), 3.0)
    grads = {}
    for detach in (False, True):
        toy = Toy()
        guided_predict(family, toy, schedule, cond, detach_uncond=detach)(x, torch.tensor([0])).sum().backward()
        grads[detach] = float(toy.a.grad)
    assert grads[False] == 3.0 and grads[True] == 12.0


def test_cps_step_by_hand_and_its_deterministic_limits():
    """[CPS] at t = .75 -> t_next = .5, a = 1/3 (sin(pi/6) = 1/2): x = 1, v = 2 give x0_hat = 1 - 1.5 = -0.5,
    noise_hat = 1 + .5 = 1.5, std = .25, mean = .5 (-0.5) + sqrt(.25 - .0625) 1.5 = -0.25 + 0.649519."""
    t, t_next = torch.tensor(0.75), torch.tensor(0.5)
    mean, std = tr.cps_transition(torch.ones(1, 1), torch.full((1, 1), 2.0), t, t_next, 1 / 3)
    assert abs(float(std) - 0.25) < 1e-6 and abs(float(mean) - (-0.25 + 0.6495191)) < 1e-6
    euler, zero = tr.cps_transition(torch.ones(1, 1), torch.full((1, 1), 2.0), t, t_next, 0.0)
    assert float(zero) == 0.0 and abs(float(euler) - (1 + 2 * (0.5 - 0.75))) < 1e-6
    schedule = tr.FlowSDESchedule(torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]),
                                  torch.tensor([1000.0, 750.0, 500.0, 250.0]), noise_level=1 / 3, sde="cps")
    assert torch.allclose(schedule.step_stds(), torch.tensor([0.375, 0.25, 0.125, 0.0]))  # the last: onto 0


def test_a_window_makes_the_other_steps_deterministic_and_unrecorded():
    """Noise only on steps 1-2 of 4: outside them the step is the Euler ODE (mean = x + v dt, std 0), the
    trajectory records log-prob 0 there, and with the same generators the window's steps match the full
    SDE's draws given the same input."""
    from diffusion_dpo.online.trajectory import sample_trajectory
    from diffusion_dpo.online.windows import window_mask

    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    full = tr.FlowSDESchedule(sigmas, sigmas[:-1] * 1000, noise_level=0.7)
    windowed = tr.FlowSDESchedule(sigmas, sigmas[:-1] * 1000, noise_level=0.7, window=window_mask(4, 1, 2))
    stds = windowed.step_stds()
    assert stds[0] == 0 and stds[3] == 0 and torch.equal(stds[1:3], full.step_stds()[1:3])
    x, v = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    mean, std = windowed.mean_std(x, v, torch.tensor([0, 3]))
    assert torch.allclose(mean[0], x[0] + v[0] * -0.25) and torch.allclose(mean[1], x[1] + v[1] * -0.25)
    assert float(std.max()) == 0.0
    traj = sample_trajectory(lambda z, i: 0.1 * z, windowed, torch.randn(2, 1, 2, 2),
                             [torch.Generator().manual_seed(s) for s in (1, 2)])
    assert torch.equal(traj.logprobs[:, [0, 3]], torch.zeros(2, 2)) and bool((traj.logprobs[:, 1:3] != 0).all())


def test_window_starts_fixed_random_sliding():
    from diffusion_dpo.online.windows import window_start

    sliding = [window_start("sliding", i, size=2, eligible=10, stride=2, shift_every=3) for i in range(18)]
    assert sliding == [0] * 3 + [2] * 3 + [4] * 3 + [6] * 3 + [8] * 3 + [0] * 3
    assert window_start("fixed", 7, size=2, eligible=10, start=5) == 5
    drawn = [window_start("random", i, size=2, eligible=10, seed=3) for i in range(50)]
    assert min(drawn) >= 0 and max(drawn) <= 8 and len(set(drawn)) > 3
    assert drawn == [window_start("random", i, size=2, eligible=10, seed=3) for i in range(50)]
    with pytest.raises(InputError, match="does not fit"):
        window_start("fixed", 0, size=11, eligible=10)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "flow"])
def test_predicted_x0_inverts_the_forward_process(kind):
    """Noise x0 to a step, hand the exact target (eps, v or the velocity) as the prediction: predicted_x0
    gives x0 back, for every step of the schedule."""
    if kind == "flow":
        schedule = tr.FlowSDESchedule(torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]),
                                      torch.tensor([1000.0, 750.0, 500.0, 250.0]))
    else:
        scheduler = DDIMScheduler(prediction_type=kind)
        schedule = tr.DDIMSchedule.from_scheduler(scheduler, 4, eta=1.0)
    x0, noise = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    step = torch.arange(4)
    x = schedule.noised(x0, noise, step)
    if kind == "flow":
        target = noise - x0
    elif kind == "epsilon":
        target = noise
    else:
        a = schedule.alpha_bars[step].view(-1, 1, 1, 1)
        target = a.sqrt() * noise - (1 - a).sqrt() * x0
    torch.testing.assert_close(schedule.predicted_x0(x, target, step), x0, atol=1e-4, rtol=1e-4)
