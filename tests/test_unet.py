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


def test_gradient_checkpointing_leaves_outputs_and_gradients_unchanged():
    torch.manual_seed(0)
    unet = build_unet("tiny", sample_size=16, cross_attention_dim=8)
    x, ctx = torch.randn(2, 3, 16, 16), torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])

    def grads():
        unet.zero_grad()
        out = unet(x, torch.tensor([10, 700]), ctx, mask).sample
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}

    plain, g_plain = grads()
    calls = []

    def checkpoint(module, *args):  # diffusers' hook: count the blocks it recomputes
        calls.append(type(module).__name__)
        return torch.utils.checkpoint.checkpoint(module.__call__, *args, use_reentrant=False)

    unet.enable_gradient_checkpointing(checkpoint)
    assert unet.is_gradient_checkpointing
    again, g_ckpt = grads()
    assert "ResBlock" in calls and "SpatialTransformer" in calls
    torch.testing.assert_close(again, plain, atol=0, rtol=0)
    assert g_plain.keys() == g_ckpt.keys()
    for name in g_plain:
        torch.testing.assert_close(g_ckpt[name], g_plain[name], atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():  # sampling does not checkpoint
        calls.clear()
        unet(x, 10, ctx, mask)
        assert not calls
    unet.disable_gradient_checkpointing()
    assert not unet.is_gradient_checkpointing
