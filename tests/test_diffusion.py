"""The training objective against a hand computation: noising, the eps and v targets, min-SNR weights."""
from types import SimpleNamespace

import pytest
import torch

from t2i.config import NoiseConfig
from t2i.diffusion import diffusion_loss, make_noise_scheduler


class HalfOfInput(torch.nn.Module):
    """A stub UNet that predicts x_t / 2, so the loss depends on the noised input as well as on the target."""

    def forward(self, x_t, t, encoder_hidden_states=None, encoder_attention_mask=None):
        return SimpleNamespace(sample=0.5 * x_t)


@pytest.mark.parametrize("gamma", [None, 2.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_loss_equals_a_hand_computation(prediction_type, gamma):
    cfg = NoiseConfig(prediction_type=prediction_type, min_snr_gamma=gamma)
    scheduler = make_noise_scheduler(cfg)
    x0 = torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    loss = diffusion_loss(HalfOfInput(), scheduler, x0, torch.zeros(8, 2, 4), None, cfg,
                          torch.Generator().manual_seed(7))

    # the same draws by hand: t ~ U{0, ..., T-1}, then eps ~ N(0, I)
    g = torch.Generator().manual_seed(7)
    t = torch.randint(0, cfg.num_train_timesteps, (8,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a = scheduler.alphas_cumprod[t].double()[:, None, None, None]        # alpha_bar_t
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps                          # Ho et al. 2020, eq. 4
    v = a.sqrt() * eps - (1 - a).sqrt() * x0                             # Salimans & Ho 2022, sec. 4
    target = eps if prediction_type == "epsilon" else v
    mse = (0.5 * x_t - target).pow(2).mean(dim=(1, 2, 3))                # (B,)
    snr = (a / (1 - a)).flatten()
    if gamma is not None:                                                # Hang et al. 2023: min(snr, gamma) / snr
        assert (snr > gamma).any() and (snr < gamma).any()               # both sides of the clamp are exercised
        mse = mse * snr.clamp(max=gamma) / (snr if prediction_type == "epsilon" else snr + 1)
    assert loss.item() == pytest.approx(mse.mean().item(), rel=1e-5)


def test_the_target_follows_the_scheduler_and_an_unknown_prediction_type_is_an_error():
    x0, ctx = torch.zeros(2, 3, 4, 4), torch.zeros(2, 2, 4)
    cfg = NoiseConfig(prediction_type="epsilon")
    v_scheduler = make_noise_scheduler(NoiseConfig(prediction_type="v_prediction"))
    # x0 = 0: the eps target is eps, the v target sqrt(alpha_bar) eps; the stub predicts x_t / 2
    loss_v = diffusion_loss(HalfOfInput(), v_scheduler, x0, ctx, None, cfg, torch.Generator().manual_seed(0))
    loss_eps = diffusion_loss(HalfOfInput(), make_noise_scheduler(cfg), x0, ctx, None, cfg,
                              torch.Generator().manual_seed(0))
    assert loss_v.item() != pytest.approx(loss_eps.item())
    sample = make_noise_scheduler(cfg)
    sample.register_to_config(prediction_type="sample")
    with pytest.raises(ValueError, match="'epsilon' or 'v_prediction'.*'sample'"):
        diffusion_loss(HalfOfInput(), sample, x0, ctx, None, cfg, torch.Generator())
