"""The diffusion maths in one place, named like the papers.

Timesteps are 0-based indices t = 0..T-1 (the paper's t = 1..T); the U-Net sees the index.
  beta_t        noise schedule               alpha_t = 1 - beta_t,  alphabar_t = prod_{s<=t} alpha_s
  q_step        x_t = sqrt(1-beta_t) x_{t-1} + sqrt(beta_t) eps            (one forward step)
  q_sample      x_t = sqrt(alphabar_t) x_0 + sqrt(1-alphabar_t) eps        (closed form)
  training_loss E_t w_t || eps - eps_theta(x_t, t) ||^2,  t ~ p_t  (Objective: Ho et al.'s w = 1, p uniform by
                default; min-SNR-gamma and EDM's weighting and log-normal noise levels as options)

What the network outputs is the schedule's `prediction`: "eps" (Ho et al.), or "v" = alpha_t eps - sigma_t x_0
(Salimans & Ho 2022), where alpha_t = sqrt(alphabar_t), sigma_t = sqrt(1 - alphabar_t). A v-network is still an
eps predictor, eps_theta = sigma_t x_t + alpha_t v_theta, and is trained with the same eps loss; the difference is
conditioning. At high noise the best eps is almost x_t itself, which "v" gets from the sigma_t x_t term for free,
while an eps-network must learn to copy its input through every GroupNorm. A small eps-network that copies the
per-image mean colour only partly (we measured 20% at t = 999) makes the unclipped DDPM loop amplify that mean
~e^5-fold over 1000 steps: saturated colour fields instead of faces.

Reverse samplers are expressed as per-step coefficient tables over a decreasing timestep sequence
tau_0 > tau_1 > ... > tau_{K-1} (all T steps for the default `ddpm`). Every update is

  x0_hat  = e * x + f * out                       (the model's estimate of x_0, kept for multistep solvers)
  x_next  = a * x + b * out + c * z + d * x0_prev (x0_prev: the previous step's x0_hat)

where `out` is the network's output (eps, or v with the conversion folded into a, b, e, f)

so a batch of samples on different samplers, step counts and positions advances with one gather and a few
elementwise ops. Coefficients are computed in float64 and cast once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

Sampler = Literal["ddpm", "ddpm-posterior", "ddim", "dpm-solver++"]
SAMPLERS: tuple[str, ...] = get_args(Sampler)
STOCHASTIC = ("ddpm", "ddpm-posterior")  # samplers that add noise z at each step (all but the last)
MULTISTEP = ("dpm-solver++",)  # samplers that need the previous step's x0 estimate
COEFS = ("a", "b", "c", "d", "e", "f")
Prediction = Literal["eps", "v"]  # what the network outputs (module docstring)
PREDICTIONS: tuple[str, ...] = get_args(Prediction)
ScheduleKind = Literal["linear", "cosine"]
LossWeighting = Literal["eps", "min-snr", "edm"]
LOSS_WEIGHTINGS: tuple[str, ...] = get_args(LossWeighting)
TimestepSampling = Literal["uniform", "edm"]
TIMESTEP_SAMPLINGS: tuple[str, ...] = get_args(TimestepSampling)


def linear_betas(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal (2021): alphabar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2)."""
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return torch.clamp(1 - f[1:] / f[:-1], max=max_beta)


@dataclass(frozen=True)
class ScheduleConfig:
    kind: ScheduleKind = "linear"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction: Prediction = "eps"  # what the network outputs (see the module docstring)

    def __post_init__(self) -> None:
        if self.kind not in get_args(ScheduleKind):
            raise ValueError(f"unknown schedule kind {self.kind!r} "
                             f"(expected one of {', '.join(get_args(ScheduleKind))})")
        if self.num_timesteps < 2:
            raise ValueError("num_timesteps must be at least 2")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {self.prediction!r} (expected one of {', '.join(PREDICTIONS)})")

    def to_dict(self) -> dict:
        return dict(kind=self.kind, num_timesteps=self.num_timesteps, beta_start=self.beta_start,
                    beta_end=self.beta_end, prediction=self.prediction)

    @classmethod
    def from_dict(cls, d: dict) -> "ScheduleConfig":
        return cls(**d)  # files written before `prediction` existed are eps-networks: the default


@dataclass(frozen=True)
class Objective:
    """What training minimises on the discrete schedule: E_{t ~ p} w_t ||eps - eps_theta(x_t, t)||^2.

    The weights are stated in eps-loss units, with SNR_t = alphabar_t / (1 - alphabar_t) and, as EDM writes the
    noise level, sigma_t^2 = 1 / SNR_t (an x_0 error is sigma_t times the eps error):
      eps      w = 1                                   Ho et al. (2020), "L_simple"
      min-snr  w = min(SNR, gamma) / SNR               Hang et al. (2023): x_0 loss capped at gamma
      edm      w = (sigma^2 + sigma_data^2) / sigma_data^2   Karras et al. (2022): lambda(sigma) sigma^2
    and t is drawn uniformly, or ("edm") with ln sigma_t ~ N(p_mean, p_std^2) restricted to the T levels.
    Weights are scaled so that their mean under p is 1: the loss keeps the scale of Ho et al.'s, and so does a
    learning rate tuned for it. The sampler never sees any of this: it is the same eps predictor.
    """

    weighting: LossWeighting = "eps"
    t_sampling: TimestepSampling = "uniform"
    min_snr_gamma: float = 5.0
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2

    def __post_init__(self) -> None:
        if self.weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {self.weighting!r} "
                             f"(expected one of {', '.join(LOSS_WEIGHTINGS)})")
        if self.t_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"unknown timestep sampling {self.t_sampling!r} "
                             f"(expected one of {', '.join(TIMESTEP_SAMPLINGS)})")
        if self.min_snr_gamma <= 0 or self.sigma_data <= 0 or self.p_std <= 0:
            raise ValueError("min_snr_gamma, sigma_data and p_std must be positive")


class Diffusion:
    """A noise schedule and everything derived from it (float64 tables, cast once per device/dtype)."""

    def __init__(self, config: ScheduleConfig = ScheduleConfig()):
        self.config = config
        self.T = T = config.num_timesteps
        if config.kind == "linear":
            self.betas = linear_betas(T, config.beta_start, config.beta_end)
        else:
            self.betas = cosine_betas(T)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self._cast: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._tables: dict[tuple[str, int], torch.Tensor] = {}

    # ---- forward process -------------------------------------------------------------------------------
    def _sqrt_tables(self, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        key = (str(device), dtype)
        if key not in self._cast:
            self._cast[key] = (self.alphas_cumprod.sqrt().to(device, dtype),
                               (1 - self.alphas_cumprod).sqrt().to(device, dtype))
        return self._cast[key]

    def _alpha_sigma(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) = (sqrt(alphabar_t), sqrt(1 - alphabar_t)) of each row's t, shaped (B, 1, ..., 1) to
        broadcast over `like`, in its dtype (improved-diffusion's _extract_into_tensor)."""
        sa, s1a = self._sqrt_tables(like.device, like.dtype)
        shape = (-1,) + (1,) * (like.dim() - 1)
        return sa[t].view(shape), s1a[t].view(shape)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Closed form: x_t = sqrt(alphabar_t) x_0 + sqrt(1 - alphabar_t) eps."""
        alpha, sigma = self._alpha_sigma(t, x0)
        return alpha * x0 + sigma * eps

    def q_step(self, x_prev: torch.Tensor, t: int, eps: torch.Tensor) -> torch.Tensor:
        """One forward step: x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps."""
        beta = float(self.betas[t])
        return math.sqrt(1 - beta) * x_prev + math.sqrt(beta) * eps

    def eps_from_output(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """eps_theta(x_t, t) from the network's output (itself for "eps"; sigma_t x_t + alpha_t v for "v")."""
        if self.config.prediction == "eps":
            return out
        alpha, sigma = self._alpha_sigma(t, x_t)
        return sigma * x_t + alpha * out

    # ---- training objective ----------------------------------------------------------------------------
    def snr(self) -> torch.Tensor:
        """SNR_t = alphabar_t / (1 - alphabar_t), float64, over t = 0..T-1."""
        return self.alphas_cumprod / (1 - self.alphas_cumprod)

    def timestep_probs(self, objective: Objective) -> torch.Tensor:
        """p_t over t = 0..T-1 (float64, sums to 1): uniform, or EDM's log-normal density of sigma integrated over
        each level's share of ln sigma (the midpoints between neighbouring levels; the ends take the tails)."""
        if objective.t_sampling == "uniform":
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        log_sigma = -0.5 * self.snr().log()  # increasing in t
        edges = torch.cat([torch.tensor([-math.inf], dtype=torch.float64), (log_sigma[1:] + log_sigma[:-1]) / 2,
                           torch.tensor([math.inf], dtype=torch.float64)])
        cdf = 0.5 * (1 + torch.erf((edges - objective.p_mean) / (objective.p_std * math.sqrt(2))))
        p = cdf[1:] - cdf[:-1]
        return p / p.sum()

    def loss_weights(self, objective: Objective) -> torch.Tensor:
        """w_t over t = 0..T-1 (float64), scaled so that sum_t p_t w_t = 1 (Objective)."""
        snr = self.snr()
        if objective.weighting == "eps":
            w = torch.ones_like(snr)
        elif objective.weighting == "min-snr":
            w = snr.clamp(max=objective.min_snr_gamma) / snr
        else:  # edm
            w = 1 + 1 / (snr * objective.sigma_data ** 2)
        return w / (self.timestep_probs(objective) * w).sum()

    def training_loss(self, model, x0: torch.Tensor, t: torch.Tensor | None = None,
                      eps: torch.Tensor | None = None, generator: torch.Generator | None = None,
                      weights: torch.Tensor | None = None) -> torch.Tensor:
        """The DDPM objective: MSE between eps and eps_theta(x_t, t), t uniform over 0..T-1 unless given; with
        `weights` (loss_weights(), on x0's device) each row's MSE is scaled by its w_t."""
        if t is None:
            t = torch.randint(0, self.T, (x0.shape[0],), device=x0.device, generator=generator)
        if eps is None:
            eps = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = self.q_sample(x0, t, eps)
        eps_hat = self.eps_from_output(model(x_t, t).float(), x_t.float(), t)
        if weights is None:
            return torch.nn.functional.mse_loss(eps_hat, eps.float())
        per_row = (eps_hat - eps.float()).square().flatten(1).mean(1)
        return (weights[t].float() * per_row).mean()

    # ---- reverse process -------------------------------------------------------------------------------
    def timesteps(self, steps: int, spacing: str = "uniform", t_max: int | None = None) -> torch.Tensor:
        """A decreasing sub-sequence of 0..t_max with `steps` entries, from t_max (default T-1) down to 0.

        uniform: evenly spaced in t (DDPM, DDIM). logsnr: evenly spaced in lambda = log(alpha/sigma), the
        spacing DPM-Solver recommends (Lu et al. 2022), made strictly decreasing so every step is a new t.
        A t_max below T-1 is SDEdit's partial chain: start from q_sample(x0, t_max) instead of pure noise.
        """
        t_max = self.T - 1 if t_max is None else t_max
        if not 0 <= t_max < self.T:
            raise ValueError(f"t_max must be in [0, {self.T - 1}], got {t_max}")
        if not 1 <= steps <= t_max + 1:
            raise ValueError(f"steps must be in [1, {t_max + 1}], got {steps}")
        if steps == 1:
            return torch.tensor([t_max])
        if spacing == "uniform":
            return torch.linspace(t_max, 0, steps, dtype=torch.float64).round().long()
        if spacing != "logsnr":
            raise ValueError(f"unknown spacing {spacing!r}")
        ab = self.alphas_cumprod
        lam = 0.5 * torch.log(ab / (1 - ab))  # decreasing in t
        targets = torch.linspace(float(lam[t_max]), float(lam[0]), steps, dtype=torch.float64)
        ts = torch.searchsorted(-lam, -targets).clamp(0, t_max).tolist()
        ts[0], ts[-1] = t_max, 0
        for k in range(steps - 2, -1, -1):  # near t = 0 several targets round to one t: spread them out
            ts[k] = min(max(ts[k], ts[k + 1] + 1), t_max - k)
        return torch.tensor(ts)

    def coefficients(self, sampler: Sampler, steps: int, t_max: int | None = None, jumps: tuple[int, int] = (1, 1)
                     ) -> torch.Tensor:
        """A (rows, 7) float64 table: timestep, then a, b, c, d, e, f for each step (see module docstring), over
        the chain from t_max (default T-1) down to 0. rows = steps, or more with RePaint's jumps (below)."""
        return self._schedule(sampler, steps, t_max, jumps)[0]

    def landing(self, sampler: Sampler, steps: int, t_max: int | None = None, jumps: tuple[int, int] = (1, 1)
                ) -> torch.Tensor:
        """A (rows, 2) float64 table: (sqrt(alphabar), sqrt(1 - alphabar)) of the timestep each step lands on
        ((1, 0) on x_0, after the last): what RePaint needs to noise the known pixels to the level of the new x."""
        return self._schedule(sampler, steps, t_max, jumps)[1]

    def _schedule(self, sampler: str, steps: int, t_max: int | None, jumps: tuple[int, int]):
        key = (sampler, steps, self.T - 1 if t_max is None else t_max, tuple(jumps))
        if key not in self._tables:
            if sampler not in SAMPLERS:
                raise ValueError(f"unknown sampler {sampler!r} (expected one of {', '.join(SAMPLERS)})")
            spacing = "logsnr" if sampler == "dpm-solver++" else "uniform"
            taus = self.timesteps(steps, spacing, t_max)
            table = _build_table(sampler, taus, self.alphas_cumprod, self.config.prediction)
            ab = torch.cat([self.alphas_cumprod[taus], torch.ones(1, dtype=torch.float64)])  # position K: x_0
            path = repaint_path(len(taus), *jumps)
            if len(path) > len(taus) + 1 and sampler not in STOCHASTIC:
                raise ValueError("RePaint's jumps need a stochastic sampler (ddpm or ddpm-posterior)")
            rows, land = [], []
            for p, q in zip(path[:-1], path[1:]):
                if q == p + 1:  # down: the sampler's own step from position p
                    rows.append(table[p])
                else:  # up: one forward step, x_q = sqrt(ab_q / ab_p) x_p + sqrt(1 - ab_q / ab_p) z
                    ratio = float(ab[q] / ab[p])
                    t, e, f = table[p, 0], table[p, 5], table[p, 6]  # the x0 estimate at p, for previews
                    rows.append(torch.tensor([t, math.sqrt(ratio), 0.0, math.sqrt(1 - ratio), 0.0, e, f],
                                             dtype=torch.float64))
                land.append(torch.stack([ab[q].sqrt(), (1 - ab[q]).sqrt()]))
            self._tables[key] = (torch.stack(rows), torch.stack(land))
        return self._tables[key]

    def t_max_for_strength(self, strength: float) -> int:
        """SDEdit (Meng et al. 2021): strength s in (0, 1] starts the chain at t = round(s * T) - 1 (s = 1: T-1,
        plain sampling from an image noised beyond recognition)."""
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        return max(0, round(strength * self.T) - 1)


def repaint_path(K: int, jump_length: int = 1, jump_n_sample: int = 1) -> list[int]:
    """Positions 0..K along a chain of K steps (K: x_0), with RePaint's resampling (Lugmayr et al. 2022, their
    get_schedule_jump): on reaching a position that is a multiple of jump_length (before x_0), go back up
    jump_length positions one forward step at a time and come down again, jump_n_sample - 1 times. (1, 1): none."""
    if jump_length < 1 or jump_n_sample < 1:
        raise ValueError(f"jump_length and jump_n_sample must be at least 1, got {jump_length}, {jump_n_sample}")
    left = {p: jump_n_sample - 1 for p in range(jump_length, K, jump_length)} if jump_length > 1 else {}
    path, p = [0], 0
    while p < K:
        p += 1
        path.append(p)
        if left.get(p, 0) > 0:
            left[p] -= 1
            for _ in range(jump_length):
                p -= 1
                path.append(p)
    return path


def _build_table(sampler: str, taus: torch.Tensor, alphas_cumprod: torch.Tensor, prediction: str = "eps"
                 ) -> torch.Tensor:
    rows = []
    prev_lambda = None
    K = len(taus)
    for k in range(K):
        t = int(taus[k])
        ab_t = float(alphas_cumprod[t])
        ab_next = float(alphas_cumprod[int(taus[k + 1])]) if k + 1 < K else 1.0
        alpha_s, sigma_s = math.sqrt(ab_t), math.sqrt(1 - ab_t)
        e, f = 1 / alpha_s, -sigma_s / alpha_s  # x0_hat = (x - sigma eps) / alpha
        c = d = 0.0
        if sampler in STOCHASTIC:
            # Respaced DDPM (exactly Ho et al. when steps = T): alpha' = alphabar_t / alphabar_next,
            # x_next = 1/sqrt(alpha') (x - (1 - alpha')/sqrt(1 - alphabar_t) eps) + sigma z, z = 0 at the end;
            # sigma^2 = beta' (ddpm) or the posterior variance beta~ = (1 - alphabar_next)/(1 - alphabar_t) beta'
            # (ddpm-posterior: diffusers' variance_type="fixed_small", what Google's DDPM checkpoints sample with).
            alpha = ab_t / ab_next
            a = 1 / math.sqrt(alpha)
            b = -(1 - alpha) / (math.sqrt(alpha) * sigma_s)
            variance = (1 - alpha) * ((1 - ab_next) / (1 - ab_t) if sampler == "ddpm-posterior" else 1.0)
            c = math.sqrt(variance) if k + 1 < K else 0.0
        elif sampler == "ddim":
            # eta = 0: x_next = sqrt(alphabar_next) x0_hat + sqrt(1 - alphabar_next) eps.
            a = math.sqrt(ab_next) * e
            b = math.sqrt(ab_next) * f + math.sqrt(1 - ab_next)
        else:
            # DPM-Solver++(2M) (Lu et al. 2022), data prediction, lambda = log(alpha / sigma).
            lam_s = math.log(alpha_s / sigma_s)
            if k + 1 == K:  # to sigma = 0: the first-order update is x0_hat itself
                a, b = e, f
            else:
                alpha_t, sigma_t = math.sqrt(ab_next), math.sqrt(1 - ab_next)
                h = math.log(alpha_t / sigma_t) - lam_s
                phi = alpha_t * -math.expm1(-h)  # alpha_t (1 - e^{-h})
                if prev_lambda is None:  # first step: first order
                    k1, k2 = phi, 0.0
                else:
                    r = (lam_s - prev_lambda) / h
                    k1, k2 = phi * (1 + 1 / (2 * r)), -phi / (2 * r)
                a = sigma_t / sigma_s + k1 * e
                b = k1 * f
                d = k2
            prev_lambda = lam_s
        if prediction == "v":  # eps = sigma_s x + alpha_s v: fold it into the table, no extra work per step
            a, b, e, f = a + b * sigma_s, b * alpha_s, e + f * sigma_s, f * alpha_s
        rows.append((t, a, b, c, d, e, f))
    return torch.tensor(rows, dtype=torch.float64)
