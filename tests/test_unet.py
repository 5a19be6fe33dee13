import pytest
import torch

from t2i.unet import PRESETS, SDPAProcessor, T2IUNet, build_unet


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_build_and_keep_shape(preset):
    torch.manual_seed(0)
    unet = build_unet(preset)
    n = sum(p.numel() for p in unet.parameters())
    if preset == "tiny":
        assert n < 500_000
    s, D = unet.config.sample_size, unet.config.cross_attention_dim
    x = torch.randn(2, 3, s, s)
    out = unet(x, torch.tensor([3, 900]), torch.randn(2, 5, D), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    assert out.sample.shape == x.shape
    assert torch.isfinite(out.sample).all()


def test_non_square_and_bad_size():
    unet = build_unet("tiny")
    assert unet(torch.randn(1, 3, 16, 32), 10, torch.randn(1, 4, 32)).sample.shape == (1, 3, 16, 32)
    with pytest.raises(ValueError, match="multiples of 2"):
        unet(torch.randn(1, 3, 15, 16), 10, torch.randn(1, 4, 32))


def test_deterministic_under_seed():
    def run():
        torch.manual_seed(123)
        unet = build_unet("tiny")
        g = torch.Generator().manual_seed(1)
        x, ctx = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 4, 32, generator=g)
        return unet(x, 5, ctx).sample
    assert torch.equal(run(), run())


def test_padding_tokens_are_ignored():
    torch.manual_seed(0)
    unet = build_unet("tiny")
    for p in unet.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    x, ctx = torch.randn(1, 3, 16, 16), torch.randn(1, 6, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]])
    other = ctx.clone()
    other[:, 3:] = torch.randn(1, 3, 32)  # change only the padding
    a, b = unet(x, 5, ctx, mask).sample, unet(x, 5, other, mask).sample
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(unet(x, 5, ctx).sample, unet(x, 5, other).sample)


def test_processor_seam_by_name():
    unet = build_unet("tiny")
    names = [n for n in unet.attn_processors if n.endswith("cross_attn")]
    assert names and all("transformers" in n for n in names)
    calls = []

    class Spy(SDPAProcessor):
        def __call__(self, attn, x, context=None, mask=None):
            calls.append(attn)
            return super().__call__(attn, x, context, mask)

    unet.set_attn_processor({names[0]: Spy()})
    unet(torch.randn(1, 3, 16, 16), 1, torch.randn(1, 3, 32))
    assert len(calls) == 1 and calls[0].is_cross
    with pytest.raises(ValueError, match="no attention module"):
        unet.set_attn_processor({"nope": Spy()})


def test_config_errors():
    with pytest.raises(ValueError, match="one True/False per level"):
        T2IUNet(block_channels=(16, 32), attention_levels=(True,))
    with pytest.raises(ValueError, match="unknown UNet preset"):
        build_unet("huge")


def test_save_pretrained_is_safetensors(tmp_path):
    unet = build_unet("tiny")
    unet.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    again = T2IUNet.from_pretrained(tmp_path)
    x = torch.randn(1, 3, 16, 16)
    ctx = torch.randn(1, 3, 32)
    assert torch.allclose(unet(x, 1, ctx).sample, again(x, 1, ctx).sample, atol=1e-6)
