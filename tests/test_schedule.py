"""The noise schedule options of issue #16: the timestep law, the curriculum and the SNR shift's export."""
import torch

from t2i.config import NoiseConfig
from t2i.diffusion import biased_share, make_noise_scheduler, sample_timesteps, timestep_probs


def test_sampled_timesteps_follow_their_law():
    for cfg, step in [(NoiseConfig(timestep_bias=3.0), 0), (NoiseConfig(timestep_bias=3.0, uniform_share=0.5), 0),
                      (NoiseConfig(timestep_bias=3.0, bias_steps=10, bias_ramp=10), 15)]:
        t = sample_timesteps(cfg, 10, 200_000, step, torch.Generator().manual_seed(0))
        seen = torch.bincount(t, minlength=10).double() / len(t)
        assert (seen - timestep_probs(cfg, 10, step)).abs().max() < 0.005


def test_the_curriculum_eases_from_biased_to_uniform():
    cfg = NoiseConfig(timestep_bias=3.0, bias_steps=100, bias_ramp=50)
    assert [biased_share(cfg, s) for s in (0, 99, 100, 125, 150, 400)] == [1.0, 1.0, 1.0, 0.5, 0.0, 0.0]
    assert torch.allclose(timestep_probs(cfg, 1000, 200), torch.full((1000,), 1e-3, dtype=torch.float64))
    assert timestep_probs(cfg, 1000, 0)[-100:].sum() > 0.25  # biased: the noisiest tenth gets > a quarter


def test_the_snr_shift_divides_snr_and_survives_export(tmp_path):
    from t2i.pipeline import make_scheduler
    base, shifted = make_noise_scheduler(NoiseConfig()), make_noise_scheduler(NoiseConfig(snr_shift=4.0))
    snr = lambda s: s.alphas_cumprod.double() / (1 - s.alphas_cumprod.double())
    assert torch.allclose(snr(shifted)[:990], snr(base)[:990] / 16, rtol=1e-3)
    sampler = make_scheduler("dpm", shifted.config)  # what ema_pipeline exports
    sampler.save_pretrained(tmp_path)
    reloaded = type(sampler).from_pretrained(tmp_path)
    assert torch.allclose(reloaded.alphas_cumprod, shifted.alphas_cumprod)
