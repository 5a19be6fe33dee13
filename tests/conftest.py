import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

CORPUS = ["a red circle", "a blue square above a green triangle", "a small yellow circle in the top left",
          "a purple square to the right of an orange triangle"]


def tiny_pipeline(prediction_type: str = "epsilon", seed: int = 0, caption_dropout: float | None = 0.1):
    """A randomly initialised 16x16 pipeline with tiny components."""
    from diffusers import DDPMScheduler

    from t2i.pipeline import T2IPipeline
    from t2i.text import build_offline_text_encoder, build_offline_tokenizer
    from t2i.unet import build_unet
    tokenizer = build_offline_tokenizer(CORPUS, max_length=12)
    encoder = build_offline_text_encoder(tokenizer, width=32, layers=1, heads=2, seed=seed)
    torch.manual_seed(seed)
    unet = build_unet("tiny")
    for p in unet.parameters():  # zero-initialised output projections would hide the text path
        p.data.add_(0.02 * torch.randn_like(p))
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
    pipe = T2IPipeline(unet, encoder, tokenizer, scheduler, caption_dropout=caption_dropout)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_diffusers_unet(**overrides):
    """A randomly initialised diffusers UNet2DConditionModel that fits tiny_pipeline's text states."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8, **overrides)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread avoids oversubscribing a small, busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def pipe():
    return tiny_pipeline()
