"""Tiny Stable Diffusion 1.x, 2.x and XL pipelines in diffusers' test sizes, built offline (random weights; the
CLIP tokenizer from an in-memory vocabulary), for comparing t2i with diffusers' own pipelines."""
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler,
                       StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from t2i.text import build_offline_tokenizer

KINDS = ("sd1", "sd2", "sdxl")
CORPUS = ["a red circle above a blue square", "a photo of an astronaut riding a horse on the moon",
          "a green triangle in the top left", "blurry, low quality"]


def tokenizer():
    """A CLIP tokenizer of 77 tokens learned from CORPUS (no download)."""
    return build_offline_tokenizer(CORPUS, max_length=77)


def text_config(tok, **overrides) -> CLIPTextConfig:
    """diffusers' test text encoder, with the ids of `tok` (so SDXL's pooled text is read at the end token)."""
    config = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4,
                  num_hidden_layers=5, vocab_size=len(tok), projection_dim=32)
    return CLIPTextConfig(**{**config, **overrides})


def vae(channels=(4, 8), groups=2) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=list(channels), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=groups)


def sd1() -> StableDiffusionPipeline:
    """SD 1.x: epsilon, PNDM (as SD 1.5 ships), cross-attention at two resolutions."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                norm_num_groups=2, attention_head_dim=2)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              set_alpha_to_one=False, steps_offset=1)
    tok = tokenizer()
    torch.manual_seed(0)
    encoder = CLIPTextModel(text_config(tok, intermediate_size=64, num_attention_heads=8, num_hidden_layers=3))
    return StableDiffusionPipeline(unet=unet, scheduler=scheduler, vae=vae(), text_encoder=encoder, tokenizer=tok,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def sd2() -> StableDiffusionPipeline:
    """SD 2.x: v-prediction, DDIM, linear projections, GELU text encoder."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=(2, 4), use_linear_projection=True)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, prediction_type="v_prediction", steps_offset=1)
    tok = tokenizer()
    torch.manual_seed(0)
    encoder = CLIPTextModel(text_config(tok, hidden_act="gelu", projection_dim=512))
    return StableDiffusionPipeline(unet=unet, scheduler=scheduler, vae=vae((32, 64), 32), text_encoder=encoder,
                                   tokenizer=tok, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def sdxl() -> StableDiffusionXLPipeline:
    """SDXL: two text encoders (the second with its projection: the pooled text), size conditioning."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                                cross_attention_dim=64, norm_num_groups=1)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                       beta_schedule="scaled_linear", timestep_spacing="leading")
    tok, tok2 = tokenizer(), tokenizer()
    torch.manual_seed(0)
    encoder = CLIPTextModel(text_config(tok, hidden_act="gelu"))
    encoder_2 = CLIPTextModelWithProjection(text_config(tok2, hidden_act="gelu"))
    return StableDiffusionXLPipeline(unet=unet, scheduler=scheduler, vae=vae((32, 64), 32), text_encoder=encoder,
                                     tokenizer=tok, text_encoder_2=encoder_2, tokenizer_2=tok2)


BUILD = {"sd1": sd1, "sd2": sd2, "sdxl": sdxl}


def save(kind: str, path) -> str:
    """The tiny pipeline of `kind` saved as a diffusers folder at `path`."""
    pipe = BUILD[kind]()
    pipe.save_pretrained(path)
    return str(path)


def diffusers_pipeline(path: str):
    """diffusers' own pipeline for a saved tiny folder."""
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe
