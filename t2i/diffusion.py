# The training objective: noise x0 with a diffusers scheduler, predict eps or v (Salimans & Ho
# 2022), weight by min-SNR-gamma (Hang et al. 2023). The UNet never sees the noise schedule.
from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from .config import NoiseConfig


def make_noise_scheduler(cfg: NoiseConfig) -> DDPMScheduler:
    """The training schedule; its config travels with the exported pipeline's sampling scheduler."""
    # clip_sample: pixels live in [-1, 1], so samplers that can clip their x0 estimate do
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         prediction_type=cfg.prediction_type, clip_sample=True)


def diffusion_loss(unet, scheduler: DDPMScheduler, x0: torch.Tensor, text_states: torch.Tensor,
                   text_mask: torch.Tensor | None, cfg: NoiseConfig, generator: torch.Generator) -> torch.Tensor:
    """Mean weighted MSE over a batch. x0: (B, C, H, W) in [-1, 1]; text_states: (B, T, D). The target
    follows the scheduler's prediction_type; `cfg` gives the timestep bias and min-SNR gamma.

    t = floor(T * u**(1/timestep_bias)), u ~ U(0, 1) (uniform over 0..T-1 at bias 1), eps ~ N(0, I),
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
    if cfg.timestep_bias == 1.0:
        t = torch.randint(0, T, (B,), device=device, generator=generator)
    else:
        u = torch.rand((B,), device=device, generator=generator)
        t = (T * u.pow(1.0 / cfg.timestep_bias)).long().clamp(max=T - 1)
    eps = torch.randn(x0.shape, device=device, dtype=x0.dtype, generator=generator)
    x_t = scheduler.add_noise(x0, eps, t)
    target = eps if prediction_type == "epsilon" else scheduler.get_velocity(x0, eps, t)
    pred = unet(x_t, t, encoder_hidden_states=text_states, encoder_attention_mask=text_mask).sample
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
