"""The training objective and its noise schedule.

x0 is noised by a diffusers scheduler, the UNet predicts eps or v (Salimans & Ho 2022), optionally weighted by
min-SNR-gamma (Hang et al. 2023). Two things decide which noise levels training sees: the beta schedule (with an
optional SNR shift, Hoogeboom et al. 2023) and the timestep distribution (a bias toward high noise, a mixture
with uniform, and a curriculum over training steps). The UNet never sees the noise schedule.
"""
from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from .conditioning import UNetConditioning, unet_prediction
from .config import NoiseConfig


def make_noise_scheduler(cfg: NoiseConfig) -> DDPMScheduler:
    """The training schedule; its config travels with the exported pipeline's sampling scheduler. With
    `cfg.snr_shift` != 1 the shifted schedule is written as `trained_betas`, which every diffusers sampler reads."""
    # clip_sample: pixels live in [-1, 1], so samplers that can clip their x0 estimate do
    kwargs = dict(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                  prediction_type=cfg.prediction_type, clip_sample=True)
    if cfg.snr_shift != 1.0:
        base = DDPMScheduler(**kwargs).alphas_cumprod.double()
        kwargs["trained_betas"] = shifted_betas(base, cfg.snr_shift).tolist()
    return DDPMScheduler(**kwargs)


def shifted_betas(alphas_cumprod: torch.Tensor, shift: float) -> torch.Tensor:
    """Betas whose SNR is the given schedule's divided by shift**2: log-SNR moved by -2 log(shift), the shifted
    schedule of simple diffusion (Hoogeboom et al. 2023, eq. 5; SD3's resolution shift does the same for flows).
    alpha_bar' = snr' / (1 + snr'), beta_t = 1 - alpha_bar'_t / alpha_bar'_{t-1}."""
    snr = alphas_cumprod / (1 - alphas_cumprod) / shift ** 2
    alpha_bar = snr / (1 + snr)
    previous = torch.cat([alpha_bar.new_ones(1), alpha_bar[:-1]])
    return (1 - alpha_bar / previous).clamp(0.0, 0.999)


def biased_share(cfg: NoiseConfig, step: int) -> float:
    """The share of timesteps drawn from the biased distribution at training step `step`: 1 - uniform_share
    while the bias holds (cfg.bias_steps), easing linearly to 0 over cfg.bias_ramp steps after it."""
    hold = 1.0
    if cfg.bias_steps is not None and step >= cfg.bias_steps:
        hold = max(0.0, 1.0 - (step - cfg.bias_steps) / cfg.bias_ramp) if cfg.bias_ramp else 0.0
    return (1.0 - cfg.uniform_share) * hold


def timestep_probs(cfg: NoiseConfig, num_timesteps: int, step: int = 0) -> torch.Tensor:
    """(T,) probability of each training timestep at training step `step`: with b = timestep_bias and w the
    biased share, p(t) = w [((t+1)/T)^b - (t/T)^b] + (1 - w) / T, the law of `sample_timesteps`."""
    T, b, w = num_timesteps, cfg.timestep_bias, biased_share(cfg, step)
    edges = torch.arange(T + 1, dtype=torch.float64) / T
    biased = edges[1:].pow(b) - edges[:-1].pow(b)
    return w * biased + (1 - w) / T if b != 1.0 else torch.full((T,), 1.0 / T, dtype=torch.float64)


def sample_timesteps(cfg: NoiseConfig, num_timesteps: int, batch: int, step: int, generator: torch.Generator,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """(batch,) training timesteps: t = floor(T u^(1/b)), u ~ U(0, 1), for the biased share of the batch at this
    training step, t = floor(T u) for the rest (timestep_probs gives the law). Uniform at bias 1."""
    T, b, w = num_timesteps, cfg.timestep_bias, biased_share(cfg, step)
    if b == 1.0:
        return torch.randint(0, T, (batch,), device=device, generator=generator)
    u = torch.rand((batch,), device=device, generator=generator)
    if w == 1.0:  # the whole batch biased: one draw per sample (today's runs stay bit-identical)
        return (T * u.pow(1.0 / b)).long().clamp(max=T - 1)
    biased = torch.rand((batch,), device=device, generator=generator) < w
    return (T * torch.where(biased, u.pow(1.0 / b), u)).long().clamp(max=T - 1)


def diffusion_loss(unet, scheduler: DDPMScheduler, x0: torch.Tensor, text_states: torch.Tensor,
                   text_mask: torch.Tensor | None, cfg: NoiseConfig, generator: torch.Generator,
                   step: int = 0, added: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Mean weighted MSE over a batch. x0: (B, C, H, W) in [-1, 1]; text_states: (B, T, D). The target
    follows the scheduler's prediction_type; `cfg` gives the timestep distribution (at training step `step`)
    and min-SNR gamma; `added`: SDXL's pooled text and time ids.

    t ~ timestep_probs(cfg, T, step) (uniform over 0..T-1 by default), eps ~ N(0, I),
    x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (Ho et al. 2020, eq. 4); the target is eps or
    v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0, weighted by min(snr, gamma) / snr (eps) or
    min(snr, gamma) / (snr + 1) (v), snr = alpha_bar_t / (1 - alpha_bar_t) (Hang et al. 2023).
    """
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"diffusion_loss trains 'epsilon' or 'v_prediction', the scheduler predicts "
                         f"{prediction_type!r}; set noise.prediction_type to one of them")
    B, device = x0.shape[0], x0.device
    T = scheduler.config.num_train_timesteps
    t = sample_timesteps(cfg, T, B, step, generator, device)
    eps = torch.randn(x0.shape, device=device, dtype=x0.dtype, generator=generator)
    x_t = scheduler.add_noise(x0, eps, t)
    target = eps if prediction_type == "epsilon" else scheduler.get_velocity(x0, eps, t)
    pred = unet_prediction(unet, x_t, t, UNetConditioning(text_states, text_mask, added))
    mse = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))                    # (B,)
    if cfg.min_snr_gamma is not None:
        alpha_bar = scheduler.alphas_cumprod.to(device)[t]
        snr = alpha_bar / (1 - alpha_bar)
        weight = snr.clamp(max=cfg.min_snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1)
        mse = mse * weight
    return mse.mean()


def alpha_bar_at(scheduler, t: torch.Tensor | float) -> float:
    """alpha_bar of the training schedule at a (possibly fractional) sampling timestep t. Between integer
    timesteps sigma = sqrt((1 - alpha_bar) / alpha_bar) is interpolated linearly, as Euler-type schedulers
    place their sigmas; at integer t it is exact for every scheduler."""
    alpha_bar = scheduler.alphas_cumprod.double()
    sigma = ((1 - alpha_bar) / alpha_bar).sqrt()
    t = min(max(float(t), 0.0), len(sigma) - 1.0)
    lo = int(t)
    hi = min(lo + 1, len(sigma) - 1)
    s = sigma[lo] + (t - lo) * (sigma[hi] - sigma[lo])
    return float(1 / (1 + s * s))


def predict_x0(x_t: torch.Tensor, model_output: torch.Tensor, alpha_bar: float, prediction_type: str) -> torch.Tensor:
    """The clean image the model predicts from x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps (x_t as the
    UNet sees it, after the scheduler's scale_model_input): from eps (Ho et al. 2020, eq. 15), from
    v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022), or x0 itself ('sample')."""
    a, s = alpha_bar ** 0.5, (1 - alpha_bar) ** 0.5
    if prediction_type == "epsilon":
        return (x_t - s * model_output) / a
    if prediction_type == "v_prediction":
        return a * x_t - s * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"cannot predict x0 for prediction_type {prediction_type!r}")
