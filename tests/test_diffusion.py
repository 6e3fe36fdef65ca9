import math

import numpy as np
import pytest
import torch
from torch import nn

from conftest import nearly_equal
from model.diffusion import Diffusion, Objective, ScheduleConfig, _build_table, cosine_betas
from model.engine import SampleSpec, SamplerEngine, generate
from model.noise import gaussian
from model.unet import PRESETS, UNet, UNetConfig


class ExactEps(nn.Module):
    """eps_theta for data x0 ~ N(mu, s^2 I), exact: E[eps | x_t] = sqrt(1-ab)(x - sqrt(ab) mu) / (ab s^2 + 1 - ab).
    With s = 0 the data is the single point mu."""

    def __init__(self, diffusion: Diffusion, mu: torch.Tensor, s: float, size: int = 4):
        super().__init__()
        self.config = UNetConfig(image_size=size, base_channels=8, channel_mult=(1,), num_groups=8)
        self.ab = diffusion.alphas_cumprod
        self.mu, self.s = mu.double(), s
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        ab = self.ab[t.long()].view(-1, 1, 1, 1)
        x = x.double()
        return (torch.sqrt(1 - ab) * (x - torch.sqrt(ab) * self.mu) / (ab * self.s**2 + 1 - ab)).float()


class AffineEps(nn.Module):
    """A fixed, known eps_theta(x, t) = 0.3 x + sin(t / 100), to check the update formula itself."""

    def __init__(self, size: int = 4):
        super().__init__()
        self.config = UNetConfig(image_size=size, base_channels=8, channel_mult=(1,), num_groups=8)
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        return 0.3 * x + torch.sin(t.float() / 100).view(-1, 1, 1, 1)


def test_linear_schedule_values():
    d = Diffusion()
    assert d.betas.dtype == torch.float64 and d.T == 1000
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(d.alphas_cumprod, torch.cumprod(1 - d.betas, 0))
    assert d.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=0.01)  # x_T is almost pure noise


def test_cosine_schedule():
    b = cosine_betas(1000)
    ab = torch.cumprod(1 - b, 0)

    def f(t: float) -> float:  # Nichol & Dhariwal's f(t); alphabar_t = f(t) / f(0)
        return math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2

    assert ab[499].item() == pytest.approx(f(500) / f(0), rel=1e-6)
    assert b.max().item() <= 0.999
    d = Diffusion(ScheduleConfig(kind="cosine"))  # the schedule the config names is the one built
    assert torch.equal(d.betas, b) and d.alphas_cumprod[499].item() == pytest.approx(f(500) / f(0), rel=1e-6)
    with pytest.raises(ValueError, match="unknown schedule"):
        ScheduleConfig.from_dict({"kind": "quadratic"})


def test_closed_form_matches_iterated_forward_steps():
    d = Diffusion()
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([0.8, -0.5, 0.0]).double().repeat(40000, 1)
    x = x0.clone()
    for t in range(300):
        x = d.q_step(x, t, torch.randn(x.shape, generator=g, dtype=torch.float64))
    ab = d.alphas_cumprod[299].item()
    closed = d.q_sample(x0, torch.full((x0.shape[0],), 299), torch.randn(x0.shape, generator=g, dtype=torch.float64))
    for sample in (x, closed):
        assert torch.allclose(sample.mean(0), math.sqrt(ab) * x0[0], atol=0.015)
        assert torch.allclose(sample.std(0), torch.full((3,), math.sqrt(1 - ab), dtype=torch.float64), atol=0.01)
    assert torch.allclose(x.mean(0), closed.mean(0), atol=0.02)


def test_training_loss_is_mse_of_eps():
    d = Diffusion()
    model = AffineEps()
    x0 = torch.randn(5, 3, 4, 4)
    t = torch.tensor([0, 10, 500, 998, 999])
    eps = torch.randn_like(x0)
    x_t = d.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1).float() * x0 \
        + (1 - d.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1).float() * eps
    expected = ((model(x_t, t) - eps) ** 2).mean()
    assert d.training_loss(model, x0, t, eps).item() == pytest.approx(expected.item(), rel=1e-5)


def test_weighted_loss_scales_each_rows_error_by_its_weight():
    d = Diffusion()
    model = AffineEps()
    x0, eps = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    t = torch.tensor([0, 10, 500, 998, 999])
    x_t = d.q_sample(x0, t, eps)
    per_row = ((model(x_t, t) - eps) ** 2).flatten(1).mean(1)
    w = torch.rand(d.T, dtype=torch.float64) + 0.5
    assert d.training_loss(model, x0, t, eps, weights=w).item() == pytest.approx((w[t].float() * per_row).mean().item(),
                                                                                 rel=1e-5)
    ones = d.loss_weights(Objective())  # Ho et al.'s: w = 1, the same loss as no weights
    assert torch.allclose(ones, torch.ones(d.T, dtype=torch.float64))
    assert d.training_loss(model, x0, t, eps, weights=ones).item() == pytest.approx(
        d.training_loss(model, x0, t, eps).item(), rel=1e-6)


def test_objectives_weights_and_noise_levels_are_the_papers():
    d = Diffusion()
    snr = d.alphas_cumprod / (1 - d.alphas_cumprod)
    uniform = d.timestep_probs(Objective())
    assert torch.allclose(uniform, torch.full((d.T,), 1e-3, dtype=torch.float64))
    # min-SNR-gamma: the x0 loss's weight min(SNR, gamma), i.e. min(SNR, gamma) / SNR on the eps loss, mean 1
    w = d.loss_weights(Objective("min-snr", min_snr_gamma=5.0))
    raw = snr.clamp(max=5.0) / snr
    assert torch.allclose(w, raw / raw.mean()) and (uniform * w).sum().item() == pytest.approx(1.0)
    assert torch.allclose(w[snr < 5.0], w[-1].expand(int((snr < 5.0).sum())))  # flat where SNR < gamma
    # EDM: lambda(sigma) sigma^2 = (sigma^2 + sigma_data^2) / sigma_data^2 with sigma^2 = 1/SNR, and ln sigma drawn
    # from N(-1.2, 1.2^2): the most likely level is the one nearest sigma = e^-1.2 per unit of ln sigma
    edm = Objective("edm", "edm")
    p = d.timestep_probs(edm)
    assert p.sum().item() == pytest.approx(1.0) and (p > 0).all()
    sigma = (1 / snr).sqrt()
    log_sigma = sigma.log()
    density = p[1:-1] / ((log_sigma[2:] - log_sigma[:-2]) / 2)
    assert abs(log_sigma[1:-1][density.argmax()].item() - (-1.2)) < 0.05
    mean = (p * log_sigma).sum().item()
    assert mean == pytest.approx(-1.2, abs=0.05)  # the tails beyond the schedule's range are small
    w = d.loss_weights(edm)
    raw = (sigma ** 2 + 0.25) / 0.25
    assert torch.allclose(w, raw / (p * raw).sum()) and (p * w).sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown loss weighting"):
        Objective("snr")
    with pytest.raises(ValueError, match="unknown timestep sampling"):
        Objective(t_sampling="cosine")


def _ddpm_step_f64(x, eps, z, t):
    """x_{t-1} = 1/sqrt(alpha_t) (x_t - (1-alpha_t)/sqrt(1-alphabar_t) eps) + sqrt(beta_t) z, from scratch."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    alpha = 1 - betas[t]
    abar = np.prod(1 - betas[: t + 1])
    return (x - (1 - alpha) / np.sqrt(1 - abar) * eps) / np.sqrt(alpha) + np.sqrt(betas[t]) * z


def test_one_reverse_step_matches_float64_formula():
    d = Diffusion()
    model = AffineEps()
    engine = SamplerEngine(model, d, memory_format="contiguous")
    engine.add("g", [SampleSpec(seed=11), SampleSpec(seed=12)])
    for _ in range(400):  # walk to t = 599
        engine.step()
    x = engine.x.double().numpy().copy()
    t = 1000 - 1 - 400
    eps = model(engine.x, torch.full((2,), t)).double().numpy()
    z = gaussian(torch.tensor([11, 12]), torch.tensor([401, 401]), (3, 4, 4)).double().numpy()
    engine.step()
    assert np.allclose(engine.x.double().numpy(), _ddpm_step_f64(x, eps, z, t), rtol=1e-6, atol=1e-6)


def test_one_respaced_ddpm_step_matches_float64_formula():
    """ddpm with fewer than T steps, at an intermediate position: alpha' = alphabar_t / alphabar_next,
    x_next = 1/sqrt(alpha') (x - (1 - alpha') / sqrt(1 - alphabar_t) eps) + sqrt(1 - alpha') z, from scratch."""
    d = Diffusion()
    model = AffineEps()
    engine = SamplerEngine(model, d, memory_format="contiguous")
    engine.add("g", [SampleSpec(seed=5, steps=50), SampleSpec(seed=6, steps=50)])
    for _ in range(20):
        engine.step()
    taus = np.round(np.linspace(999, 0, 50)).astype(int)
    t, t_next = taus[20], taus[21]
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    alpha = abar[t] / abar[t_next]
    x = engine.x.double().numpy().copy()
    eps = model(engine.x, torch.full((2,), float(t))).double().numpy()
    z = gaussian(torch.tensor([5, 6]), torch.tensor([21, 21]), (3, 4, 4)).double().numpy()
    engine.step()
    expected = (x - (1 - alpha) / np.sqrt(1 - abar[t]) * eps) / np.sqrt(alpha) + np.sqrt(1 - alpha) * z
    assert np.allclose(engine.x.double().numpy(), expected, rtol=1e-6, atol=1e-6)


def test_last_step_adds_no_noise():
    d = Diffusion()
    table = d.coefficients("ddpm", 1000)
    assert table[-1, 0] == 0 and table[-1, 3] == 0  # t = 0, sigma = 0
    assert (table[:-1, 3] > 0).all()
    model = AffineEps()
    engine = SamplerEngine(model, d, memory_format="contiguous")
    engine.add("g", [SampleSpec(seed=3)])
    for _ in range(999):
        engine.step()
    x = engine.x.double().numpy().copy()
    eps = model(engine.x, torch.zeros(1)).double().numpy()
    (_, _, img), = engine.step().finished
    expected = _ddpm_step_f64(x, eps, np.zeros_like(x), 0)
    expected_u8 = np.round((np.clip(expected, -1, 1) + 1) * 127.5).astype(np.uint8)[0].transpose(1, 2, 0)
    assert np.abs(img.astype(int) - expected_u8.astype(int)).max() <= 1


@pytest.mark.parametrize("sampler,steps", [("ddpm", 1000), ("ddim", 10), ("dpm-solver++", 10), ("ddpm", 50)])
def test_single_point_data_is_recovered(sampler, steps):
    """With data a single point mu and eps_theta exact, every sampler must end at mu."""
    d = Diffusion()
    mu = torch.linspace(-0.9, 0.9, 48).view(1, 3, 4, 4)
    _, x0 = _final_state(d, ExactEps(d, mu, 0.0), sampler, steps, range(3))
    assert torch.allclose(x0, mu.expand_as(x0), atol=2e-3), (x0 - mu).abs().max()


def _ode_solution(d, mu, s, x_T):
    ab = d.alphas_cumprod[-1].item()
    return mu + s * (x_T - math.sqrt(ab) * mu) / math.sqrt(ab * s**2 + 1 - ab)


def _final_state(d, model, sampler, steps, seeds):
    engine = SamplerEngine(model, d, memory_format="contiguous")
    engine.add("g", [SampleSpec(seed=s, sampler=sampler, steps=steps) for s in seeds])
    x_T = engine.x.clone()
    for _ in range(steps - 1):
        engine.step()
    table = d.coefficients(sampler, steps)
    eps = engine.unet(engine.x, torch.full((len(seeds),), float(table[-1, 0])))
    x0 = float(table[-1, 1]) * engine.x + float(table[-1, 2]) * eps + float(table[-1, 4]) * engine.x0_prev
    return x_T, x0


def test_ode_samplers_solve_the_probability_flow_ode_for_gaussian_data():
    """For x0 ~ N(mu, s^2) the probability-flow ODE is known in closed form; DDIM (first order) converges to it
    as steps grow and DPM-Solver++(2M) (second order) is far more accurate at the same step count."""
    d = Diffusion()
    mu = torch.linspace(-0.5, 0.5, 48).view(1, 3, 4, 4)
    model = ExactEps(d, mu, 0.5)
    errors = {}
    for sampler, steps in [("ddim", 50), ("ddim", 200), ("dpm-solver++", 20), ("dpm-solver++", 50)]:
        x_T, x0 = _final_state(d, model, sampler, steps, range(8))
        errors[sampler, steps] = (x0 - _ode_solution(d, mu, 0.5, x_T)).abs().mean().item()
    # measured: ddim 50 -> 0.022, 200 -> 0.0055 (first order: 4x steps, 4x smaller error);
    # dpm-solver++ 20 -> 0.005 (second order with log-SNR spacing)
    assert errors["ddim", 200] < 0.008
    assert 3 < errors["ddim", 50] / errors["ddim", 200] < 5
    assert errors["dpm-solver++", 20] < 0.008
    assert errors["dpm-solver++", 20] < errors["ddim", 50] / 3
    assert errors["dpm-solver++", 50] < errors["dpm-solver++", 20] / 3


def test_log_snr_spacing_is_far_more_accurate_than_even_t_for_dpm_solver():
    """The README's claim: DPM-Solver++(2M) at 20 steps on the Gaussian toy problem, log-SNR spacing against
    evenly spaced t, run in float64 through the same tables the engine uses."""
    d = Diffusion()
    mu = torch.linspace(-0.5, 0.5, 48).view(1, 3, 4, 4).double()
    model = ExactEps(d, mu, 0.5)
    x_T = gaussian(torch.arange(8), torch.zeros(8, dtype=torch.int64), (3, 4, 4)).double()
    target = _ode_solution(d, mu, 0.5, x_T)
    errors = {}
    for spacing in ("logsnr", "uniform"):
        table = _build_table("dpm-solver++", d.timesteps(20, spacing), d.alphas_cumprod)
        x, x0_prev = x_T.clone(), torch.zeros_like(x_T)
        for t, a, b, _, dd, e, f in table.tolist():
            eps = model(x, torch.full((8,), t)).double()
            x, x0_prev = a * x + b * eps + dd * x0_prev, e * x + f * eps
        errors[spacing] = (x - target).abs().mean().item()
    # measured: mean absolute error 0.0052 (log-SNR) vs 0.093 (even t): 18x
    assert errors["uniform"] / errors["logsnr"] > 12, errors


def test_tiny_unet_1000_steps_deterministic_per_seed():
    torch.manual_seed(0)
    unet = UNet(PRESETS["tiny"])
    d = Diffusion()
    a = generate(SamplerEngine(unet, d), [7, 8])
    b = generate(SamplerEngine(unet, d), [7, 8])
    assert a.shape == (2, 8, 8, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a[0], a[1])
    c = generate(SamplerEngine(unet, d), [8])
    assert nearly_equal(c[0], a[1])


def test_batch_composition_and_join_step_invariance():
    torch.manual_seed(1)
    unet = UNet(PRESETS["tiny"])
    d = Diffusion()
    alone = generate(SamplerEngine(unet, d), [42])[0]
    # The same sample in a crowd of other samplers and step counts, joining at step 300 of a running batch.
    engine = SamplerEngine(unet, d)
    engine.add("early", [SampleSpec(1), SampleSpec(2, "ddim", 50), SampleSpec(3, "dpm-solver++", 20)])
    results, steps, joined = {}, 0, False
    while steps < 1400 and (len(engine) or not joined):
        if steps >= 300 and not joined:  # steps, not calls: where the runner chains steps a call takes several
            engine.add("late", [SampleSpec(41), SampleSpec(42), SampleSpec(43, "ddim", 100)])
            joined = True
        out = engine.step()
        steps += out.steps
        for group, index, img in out.finished:
            results[group, index] = img
    assert nearly_equal(results["late", 1], alone)
    assert len(results) == 6


def test_cancel_removes_samples():
    torch.manual_seed(1)
    engine = SamplerEngine(UNet(PRESETS["tiny"]), Diffusion())
    engine.add("a", [SampleSpec(1, "ddim", 5)] * 2)
    engine.add("b", [SampleSpec(2, "ddim", 5)])
    engine.step()
    assert engine.cancel("a") == 2 and len(engine) == 1 and engine.groups() == {"b"}
    done = []
    while len(engine):
        done += engine.step().finished
    assert [(g, i) for g, i, _ in done] == [("b", 0)]


def test_steps_and_sampler_validation():
    d = Diffusion()
    with pytest.raises(ValueError, match="steps must be in"):
        d.coefficients("ddim", 0)
    with pytest.raises(ValueError, match="steps must be in"):
        d.coefficients("ddpm", 1001)
    with pytest.raises(ValueError, match="unknown sampler"):
        d.coefficients("euler", 10)
    ts = d.timesteps(10)
    assert ts[0] == 999 and ts[-1] == 0 and (ts[:-1] > ts[1:]).all()
    assert torch.equal(d.timesteps(1000), torch.arange(999, -1, -1))
    for steps in (2, 10, 50, 500, 1000):
        ts = d.timesteps(steps, "logsnr")
        assert len(ts) == steps and ts[0] == 999 and ts[-1] == 0 and (ts[:-1] > ts[1:]).all()


class VFromEps(nn.Module):
    """The v-network equivalent to an eps-network: v = (eps - sigma_t x) / alpha_t (computed in float64)."""

    def __init__(self, diffusion: Diffusion, eps_model: nn.Module):
        super().__init__()
        self.config, self.eps_model, self.ab = eps_model.config, eps_model, diffusion.alphas_cumprod

    def forward(self, x, t):
        ab = self.ab[t.long()].view(-1, 1, 1, 1)
        return ((self.eps_model(x, t).double() - (1 - ab).sqrt() * x.double()) / ab.sqrt()).float()


class NoMeanOutput(nn.Module):
    """A network that cannot output a per-image, per-channel mean (what a small eps-network does at high noise)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.config, self.model = model.config, model

    def forward(self, x, t):
        out = self.model(x, t)
        return out - out.mean(dim=(2, 3), keepdim=True)


def test_v_prediction_schedule_validation_and_old_files():
    assert ScheduleConfig.from_dict({"kind": "linear", "num_timesteps": 1000, "beta_start": 1e-4,
                                     "beta_end": 0.02}).prediction == "eps"  # files from before "v" existed
    assert ScheduleConfig.from_dict(ScheduleConfig(prediction="v").to_dict()).prediction == "v"
    with pytest.raises(ValueError, match="unknown prediction"):
        ScheduleConfig(prediction="x0")


def test_v_training_loss_is_mse_of_the_implied_eps():
    d = Diffusion(ScheduleConfig(prediction="v"))
    model = AffineEps()
    x0, eps = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    t = torch.tensor([0, 10, 500, 998, 999])
    sa = d.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1).float()
    s1a = (1 - d.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1).float()
    x_t = sa * x0 + s1a * eps
    expected = ((s1a * x_t + sa * model(x_t, t) - eps) ** 2).mean()
    assert d.training_loss(model, x0, t, eps).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("sampler,steps", [("ddpm", 1000), ("ddim", 20), ("dpm-solver++", 20)])
def test_v_network_samples_the_same_images_as_its_eps_network(sampler, steps):
    """Folding eps = sigma_t x + alpha_t v into the coefficient tables changes nothing but the parameterisation."""
    eps_d, v_d = Diffusion(), Diffusion(ScheduleConfig(prediction="v"))
    eps_model = ExactEps(eps_d, torch.linspace(-0.5, 0.5, 48).view(1, 3, 4, 4), 0.3)
    _, a = _final_state(eps_d, eps_model, sampler, steps, range(4))
    _, b = _final_state(v_d, VFromEps(v_d, eps_model), sampler, steps, range(4))
    assert torch.allclose(a, b, atol=1e-3), (a - b).abs().max()


def test_v_prediction_keeps_the_mean_colour_a_network_cannot_copy():
    """Why the shipped model predicts v: take the exact model for N(mu, 0.3^2) data and remove the per-image
    mean of its output. As an eps-network the unclipped 1000-step DDPM loop then inflates each image's mean
    (by ~e^5); as a v-network the sigma_t x_t term carries the mean at high noise and samples stay in range."""
    eps_d, v_d = Diffusion(), Diffusion(ScheduleConfig(prediction="v"))
    mu = torch.linspace(-0.5, 0.5, 48).view(1, 3, 4, 4)
    eps_model = ExactEps(eps_d, mu, 0.3)
    _, exact = _final_state(eps_d, eps_model, "ddpm", 1000, range(16))
    _, eps_broken = _final_state(eps_d, NoMeanOutput(eps_model), "ddpm", 1000, range(16))
    _, v_broken = _final_state(v_d, NoMeanOutput(VFromEps(v_d, eps_model)), "ddpm", 1000, range(16))
    spread = lambda x: x.mean(dim=(2, 3)).abs().max().item()  # noqa: E731 - largest per-image channel mean
    assert spread(exact) < 1.0
    assert spread(eps_broken) > 10 * spread(exact)
    assert spread(v_broken) < 1.5 * spread(exact) + 0.1
