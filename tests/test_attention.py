"""The cross-attention recorder: probabilities, unchanged outputs, CFG branches, batches, windows,
selection, diffusers UNets, hook removal, and a synthetic model whose maps are known."""
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_diffusers_unet, tiny_pipeline
from torch import nn

from t2i.attention import AttentionRecorder, attention_with_probs
from t2i.layout import BatchLayout
from t2i.text import BOS, EOS, PromptEncoding
from t2i.unet import Attention, SDPAProcessor, build_unet

PROMPTS = ["a red circle", "a blue square above a green triangle"]   # 5 and 9 real tokens


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def run(pipe, prompts=PROMPTS, steps=2, recorder=None, **kw):
    kw.setdefault("generator", torch.Generator().manual_seed(0))
    return pipe(prompts, num_inference_steps=steps, output_type="np", record_attention=recorder, **kw)


def assert_distributions(hm):
    """Each pixel's maps over an image's real tokens sum to 1; padding slots stay 0."""
    for i, toks in enumerate(hm.tokens):
        total = hm.maps[i, : len(toks)].sum(0)
        torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)
        assert hm.maps[i, len(toks):].abs().max() == 0 if len(toks) < hm.maps.shape[1] else True


# -- the attention core and the processor ---------------------------------------------------------

def test_attention_probs_sum_to_one_over_real_tokens_and_match_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    keep = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    bias = torch.zeros(2, 1, 1, 6).masked_fill(~keep[:, None, None], float("-inf"))
    o, p = attention_with_probs(q, k, v, bias)
    assert p.dtype == torch.float32 and p.shape == (2, 3, 10, 6)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 3, 10))
    assert p[0, ..., 4:].abs().max() == 0
    torch.testing.assert_close(o, F.scaled_dot_product_attention(q, k, v, attn_mask=bias), atol=1e-6, rtol=0)


class OneLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.cross_attn = Attention(16, 2, context_dim=8)


def encoding(tokens: list[list[str]], T: int, dim: int, seed: int = 0) -> PromptEncoding:
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1] * len(t) + [0] * (T - len(t)) for t in tokens])
    return PromptEncoding(torch.randn(len(tokens), T, dim, generator=g), mask, torch.zeros_like(mask), tokens)


def test_processor_output_equals_sdpa_and_each_query_row_is_a_distribution(monkeypatch):
    net = OneLayer()
    enc = encoding([[BOS, "red</w>", EOS], [BOS, "a</w>", "red</w>", "circle</w>", EOS]], T=6, dim=8)
    keep = enc.attention_mask.bool()[:, None, None, :]
    bias = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    x = torch.randn(2, 12, 16)                                    # a 3x4 grid for a 6x8 image
    expected = SDPAProcessor()(net.cross_attn, x, enc.hidden_states, bias)
    rec, seen = AttentionRecorder(), []
    original_add = rec._add
    monkeypatch.setattr(rec, "_add", lambda name, grid, p: (seen.append((grid, p)), original_add(name, grid, p)))
    with rec.record(net, BatchLayout(enc, (6, 8))):
        rec.set_step(0)
        out = net.cross_attn(x, enc.hidden_states, bias)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    (grid, p), = seen
    assert grid == (3, 4) and p.shape == (2, 2, 12, 6)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 2, 12))
    assert p[0, ..., 3:].abs().max() == 0 and p[1, ..., 5:].abs().max() == 0
    assert isinstance(net.cross_attn.processor, SDPAProcessor)
    assert rec.heatmaps().maps.shape == (2, 5, 3, 4)


# -- the pipeline ---------------------------------------------------------------------------------

def test_recording_leaves_images_unchanged_with_batch_lengths_and_images_per_prompt(pipe):
    plain = run(pipe, num_images_per_prompt=2)
    rec = run(pipe, num_images_per_prompt=2, recorder=AttentionRecorder())
    assert (plain.images == rec.images).all()
    hm = rec.attention
    assert hm.maps.shape == (4, 9, 8, 8) and hm.maps.dtype == torch.float32
    assert [len(t) for t in hm.tokens] == [5, 5, 9, 9]
    assert hm.prompts == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2 and hm.prompt_index == [0, 0, 1, 1]
    assert hm.steps == [0, 1] and hm.branch == "cond" and len(hm.layers) == 4
    assert_distributions(hm)
    assert all(m.processor.__class__ is SDPAProcessor for m in pipe.unet.modules() if isinstance(m, Attention))


def test_cfg_branches_line_up_with_the_unguided_and_negative_prompt_rows(pipe):
    # at step 0 every run starts from the same noise, so the branches' maps must coincide exactly
    first = dict(steps={0}, layers="down")
    guided = run(pipe, recorder=AttentionRecorder(**first), guidance_scale=3.0).attention
    unguided = run(pipe, recorder=AttentionRecorder(**first), guidance_scale=1.0).attention
    torch.testing.assert_close(guided.maps, unguided.maps, atol=1e-5, rtol=0)
    negative = run(pipe, [PROMPTS[1]], recorder=AttentionRecorder(branch="uncond", **first),
                   negative_prompt=PROMPTS[0]).attention
    torch.testing.assert_close(negative.maps[0, :5], unguided.maps[0, :5], atol=1e-5, rtol=0)
    assert negative.prompts == [PROMPTS[0]] and negative.branch == "uncond"
    empty = run(pipe, recorder=AttentionRecorder(branch="uncond", **first)).attention
    assert empty.tokens == [[BOS, EOS]] * 2 and empty.words(0) == []
    assert_distributions(empty)
    with pytest.raises(ValueError, match="no unconditional branch"):
        run(pipe, recorder=AttentionRecorder(branch="uncond"), guidance_scale=1.0)


def test_non_square_images_get_their_grid(pipe):
    hm = run(pipe, [PROMPTS[0]], recorder=AttentionRecorder(), height=16, width=32).attention
    assert hm.maps.shape == (1, 5, 8, 16) and hm.image_size == (16, 32)
    assert hm.word_maps(0, ["circle"], size="image")["circle"].shape == (16, 32)
    assert_distributions(hm)


def test_step_window_counts_only_its_steps_and_memory_does_not_grow(pipe):
    assert run(pipe, steps=3, recorder=AttentionRecorder(steps=(0.0, 0.5))).attention.steps == [0, 1]
    hm = run(pipe, steps=3, recorder=AttentionRecorder(steps={2}, timeline=True)).attention
    assert hm.steps == [2] and hm.num_inference_steps == 3 and hm.timeline.shape == (1, 2, 9, 8, 8)
    kept = []
    for steps in (2, 4):
        rec = AttentionRecorder(layers="mid")
        run(pipe, steps=steps, recorder=rec)
        kept.append(rec.bytes_kept)
    assert kept[0] == kept[1] > 0
    with pytest.raises(ValueError, match="within"):
        run(pipe, steps=2, recorder=AttentionRecorder(steps=[5]))
    with pytest.raises(ValueError, match="selects none"):
        run(pipe, steps=2, recorder=AttentionRecorder(steps=(0.9, 1.0)))


def test_head_layer_and_resolution_selection(pipe):
    every, h0, h1 = (run(pipe, recorder=AttentionRecorder(heads=h, layers=r"^up\.")).attention
                     for h in (None, [0], [1]))
    assert all(name.startswith("up.") for name in every.layers) and len(every.layers) == 2
    assert h0.heads == [0] and not torch.allclose(h0.maps, h1.maps)
    torch.testing.assert_close(every.maps, (h0.maps + h1.maps) / 2, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="matches no cross-attention module; the names are: down.1"):
        run(pipe, recorder=AttentionRecorder(layers="nowhere"))
    with pytest.raises(ValueError, match="heads"):
        run(pipe, recorder=AttentionRecorder(heads=[2]))
    assert run(pipe, recorder=AttentionRecorder(resolutions={8})).attention.grid_size == (8, 8)
    with pytest.raises(ValueError, match="no cross-attention was recorded"):
        run(pipe, recorder=AttentionRecorder(resolutions={(4, 4)}))


def test_processors_are_restored_when_sampling_raises(pipe):
    before = dict(pipe.unet.attn_processors)

    def boom(i, t, x):
        assert type(pipe.unet.attn_processors["mid.transformers.0.cross_attn"]).__name__ == "T2IExplicitProcessor"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(pipe, recorder=AttentionRecorder(), callback=boom)
    assert all(pipe.unet.attn_processors[k] is p for k, p in before.items())


# -- a synthetic model whose answer is known -------------------------------------------------------

class HalfGridQuery(nn.Module):
    """Ignores the features: in every head, query 4*e0 on the first half of the (h, w) grid (top rows or
    left columns) and 4*e1 on the second half."""

    def __init__(self, grid: tuple[int, int], axis: str, heads: int, dim: int):
        super().__init__()
        h, w = grid
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        first = ((ys < h / 2) if axis == "rows" else (xs < w / 2)).flatten().float()   # (N,)
        q = torch.zeros(h * w, dim)
        d = dim // heads
        for head in range(heads):
            q[:, head * d], q[:, head * d + 1] = 4 * first, 4 * (1 - first)
        self.register_buffer("q", q)

    def forward(self, x):                                          # (B, N, C) -> (B, N, C)
        return self.q.expand(x.shape[0], -1, -1)


@pytest.mark.parametrize("axis,words", [("rows", ("top", "bottom")), ("cols", ("left", "right"))])
def test_synthetic_model_maps_point_at_the_known_regions(axis, words):
    torch.manual_seed(0)
    unet = build_unet("tiny")                                      # 2 heads, width 32, context 32, one grid
    H, W = 16, 32
    for name, m in unet.named_modules():
        if isinstance(m, Attention) and m.is_cross:
            m.to_q = HalfGridQuery((H // 2, W // 2), axis, m.heads, 32)
            with torch.no_grad():                                  # keys: word 1 along e0, word 2 along e1
                m.to_kv.weight.zero_()
                for head in range(m.heads):
                    m.to_kv.weight[head * 16, 0] = m.to_kv.weight[head * 16 + 1, 1] = 4.0
    tokens = [[BOS, f"{words[0]}</w>", f"{words[1]}</w>", EOS]]
    ctx = torch.zeros(1, 5, 32)
    ctx[0, 1, 0] = ctx[0, 2, 1] = 1.0
    mask = torch.tensor([[1, 1, 1, 1, 0]])                        # one padding slot
    ctx[0, 4, 0] = 100.0                                           # would dominate everywhere if not masked
    enc = PromptEncoding(ctx, mask, torch.zeros_like(mask), tokens)
    rec = AttentionRecorder()
    with torch.no_grad(), rec.record(unet, BatchLayout(enc, (H, W), num_inference_steps=2)):
        for i in range(2):
            rec.set_step(i)
            unet(torch.randn(1, 3, H, W), 500 - 250 * i, encoder_hidden_states=ctx, encoder_attention_mask=mask)
    hm = rec.heatmaps()
    for size, (h, w) in [(None, (8, 16)), ("image", (H, W))]:
        maps = torch.stack(list(hm.word_maps(0, list(words), normalize=None, size=size).values()))
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        expected = ((ys >= h / 2) if axis == "rows" else (xs >= w / 2)).long()
        assert torch.equal(maps.argmax(0), expected)
    assert hm.maps[0, 1:3].sum(0).min() > 0.9                      # e^4 / (e^4 + 3) of each query on its word


# -- diffusers' UNet2DConditionModel ----------------------------------------------------------------

def diffusers_pipeline():
    from t2i.pipeline import T2IPipeline
    base = tiny_pipeline()
    pipe = T2IPipeline(tiny_diffusers_unet(), base.text_encoder, base.tokenizer, base.scheduler, caption_dropout=0.1)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_diffusers_unet_maps_output_and_processors_restored():
    pipe = diffusers_pipeline()
    before = dict(pipe.unet.attn_processors)
    plain = run(pipe, height=16, width=32)
    rec = run(pipe, height=16, width=32, recorder=AttentionRecorder(timeline=True))
    assert abs(plain.images - rec.images).max() < 1e-5
    hm = rec.attention
    assert hm.maps.shape == (2, 9, 16, 32) and hm.timeline.shape == (2, 2, 9, 8, 16)
    assert len(hm.layers) == 4 and all(name.endswith("attn2") for name in hm.layers)
    assert_distributions(hm)
    assert all(pipe.unet.attn_processors[k] is p for k, p in before.items())

    attn2 = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    attn2.residual_connection = True
    with pytest.raises(ValueError, match="residual_connection"):
        run(pipe, recorder=AttentionRecorder())
    attn2.residual_connection = False
    attn2.set_processor(lambda *a, **k: None)
    with pytest.raises(ValueError, match="set_default_attn_processor"):
        run(pipe, recorder=AttentionRecorder())
    attn2.set_processor(before["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"])
    assert all(pipe.unet.attn_processors[k] is p for k, p in before.items())


# -- the seam: the batch layout and the UNet's own set_attn_processor --------------------------------

def test_batch_layout_names_the_rows_of_each_branch():
    enc = encoding([[BOS, EOS]] * 2 + [[BOS, "a</w>", EOS]] * 2, T=3, dim=8)   # [uncond x 2, cond x 2]
    layout = BatchLayout(enc, (16, 16), images_per_prompt=3, guided=True)
    assert layout.num_prompts == 2 and layout.rows == 12
    assert layout.branch_rows("uncond") == slice(0, 6) and layout.branch_rows("cond") == slice(6, 12)
    assert list(layout.texts("cond")) == [2, 3] and list(BatchLayout(enc, (16, 16)).texts()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="odd number"):
        BatchLayout(encoding([[BOS, EOS]] * 3, T=2, dim=8), (16, 16), guided=True)


def test_the_recorder_installs_through_the_unets_own_set_attn_processor(pipe, monkeypatch):
    calls, real = [], type(pipe.unet).set_attn_processor
    monkeypatch.setattr(type(pipe.unet), "set_attn_processor", lambda self, p: (calls.append(dict(p)), real(self, p)))
    run(pipe, recorder=AttentionRecorder(layers="mid"))
    assert len(calls) == 2                                          # install, then restore
    assert type(calls[0]["mid.transformers.0.cross_attn"]).__name__ == "T2IExplicitProcessor"
    assert type(calls[1]["mid.transformers.0.cross_attn"]) is SDPAProcessor


def test_recording_with_gradients_on_keeps_no_graph(pipe):
    """A loop that optimises through attention runs with grad on: the sums must hold no autograd graph."""
    from t2i.text import encode_prompts
    enc = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a red circle"])
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    rec = AttentionRecorder()
    with torch.enable_grad(), rec.record(pipe.unet, BatchLayout(enc, (16, 16), num_inference_steps=2)):
        for i in range(2):
            rec.set_step(i)
            pipe.unet(x, torch.tensor([10]), encoder_hidden_states=enc.hidden_states.detach(),
                      encoder_attention_mask=enc.attention_mask).sample.sum().backward()
    assert rec._sums and all(not s.requires_grad for s, _ in rec._sums.values())
    assert x.grad is not None


@pytest.mark.parametrize("kind", ["t2i", "diffusers"])
def test_recording_leaves_a_unet_forward_bit_identical(pipe, kind):
    """README: recording reads the probabilities beside the module's own (fused) attention, whose output the UNet
    keeps, so a recorded forward, and every image of `t2i generate --heatmaps`, is bit for bit the plain one."""
    from t2i.text import encode_prompts
    unet = pipe.unet if kind == "t2i" else diffusers_pipeline().unet
    enc = encode_prompts(pipe.tokenizer, pipe.text_encoder, PROMPTS)
    x = torch.randn(len(PROMPTS), 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(encoder_hidden_states=enc.hidden_states, encoder_attention_mask=enc.attention_mask)
    with torch.no_grad():
        plain = unet(x, 500, **kw).sample
        recorder = AttentionRecorder()
        with recorder.record(unet, BatchLayout(enc, (16, 16), 1, False, 1)):
            recorder.set_step(0)
            recorded = unet(x, 500, **kw).sample
    assert torch.equal(plain, recorded)
