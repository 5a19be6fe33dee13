"""Issue #8's options: positions inside the UNet, the context refiner, the grounding loss and its targets,
timestep bias, caption balance, and a short training run with all of them on."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from t2i.config import load_config
from t2i.data.folder import ImageFolderDataset
from t2i.data.shapes import ShapesConfig, ShapesDataset, object_word_spans, render_scene
from t2i.diffusion import diffusion_loss, make_noise_scheduler
from t2i.grounding import capture_cross_attention, grounding_loss, token_indices
from t2i.text import build_offline_tokenizer
from t2i.unet import T2IUNet, build_unet, sincos_2d


def jittered(unet, scale=0.05):
    torch.manual_seed(1)
    for p in unet.parameters():  # zero-initialised projections would hide the paths under test
        p.data.add_(scale * torch.randn_like(p))
    return unet


# -- the UNet's new options -----------------------------------------------------------------------

def test_position_and_context_options_keep_shape_and_round_trip(tmp_path):
    torch.manual_seed(0)
    unet = jittered(build_unet("tiny", pos_embed=True, context_layers=1))
    x, ctx, mask = torch.randn(2, 3, 16, 16), torch.randn(2, 5, 32), torch.tensor([[1, 1, 1, 0, 0], [1] * 5])
    out = unet(x, torch.tensor([3, 900]), ctx, mask).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
    unet.save_pretrained(tmp_path)
    again = T2IUNet.from_pretrained(tmp_path)
    assert again.config.pos_embed and again.config.context_layers == 1
    assert torch.allclose(out, again(x, torch.tensor([3, 900]), ctx, mask).sample, atol=1e-6)


def test_position_term_starts_at_zero_and_then_tells_places_apart():
    torch.manual_seed(0)
    plain = jittered(build_unet("tiny"))
    positioned = build_unet("tiny", pos_embed=True)
    missing, _ = positioned.load_state_dict(plain.state_dict(), strict=False)
    assert missing and all("pos_proj" in k for k in missing)
    x, ctx = torch.randn(1, 3, 16, 16), torch.randn(1, 4, 32)
    assert torch.allclose(positioned(x, 10, ctx).sample, plain(x, 10, ctx).sample, atol=1e-6)  # zero init
    for m in positioned.modules():
        if getattr(m, "pos_proj", None) is not None:
            torch.nn.init.normal_(m.pos_proj.weight, std=0.5)
    assert not torch.allclose(positioned(x, 10, ctx).sample, plain(x, 10, ctx).sample, atol=1e-3)
    feats = sincos_2d(8, 8, 32)                                   # (64, 32): every cell its own code
    assert feats.shape == (64, 32) and torch.cdist(feats, feats).add(torch.eye(64)).min() > 0.1


def test_context_refiner_lets_a_token_see_later_words_and_ignores_padding():
    torch.manual_seed(0)
    unet = build_unet("tiny", context_layers=1)
    ctx, keep = torch.randn(1, 6, 32), torch.tensor([[1, 1, 1, 1, 0, 0]])
    later = ctx.clone()
    later[:, 3] = torch.randn(32)           # a later real token
    pad = ctx.clone()
    pad[:, 4:] = torch.randn(2, 32)          # padding only
    refine = unet.context_refiner.eval()
    with torch.no_grad():
        a, b, c = refine(ctx, keep), refine(later, keep), refine(pad, keep)
    assert not torch.allclose(a[:, 1], b[:, 1], atol=1e-4)       # token 1 sees token 3
    assert torch.allclose(a[:, :4], c[:, :4], atol=1e-5)          # padding changes nothing real


# -- grounding: targets, token indices and the loss -----------------------------------------------

def test_object_word_spans_name_each_objects_own_words():
    for i in range(20):
        scene = render_scene(ShapesConfig(max_objects=3), i)
        for start, end, k in object_word_spans(scene):
            word = scene.caption[start:end]
            obj = scene.objects[k]
            assert word in (obj.colour, obj.shape, obj.size)
        assert len(object_word_spans(scene)) == len(scene.objects) * (3 if "size" in scene.stated else 2)


def test_grounded_items_carry_masks_of_their_objects():
    ds = ShapesDataset(ShapesConfig(max_objects=2), length=8, grounding=True)
    item, scene = ds[3], ds.scene(3)
    assert item["ground_masks"].shape[1:] == (32, 32) and item["ground_spans"].shape[1] == 2
    for (a, b), mask in zip(item["ground_spans"].tolist(), item["ground_masks"]):
        if a < 0:
            assert mask.sum() == 0
            continue
        k = next(k for s, e, k in object_word_spans(scene) if s == a)
        assert torch.equal(mask.bool(), torch.from_numpy(np.array(scene.masks[k])))
    assert "ground_masks" not in ShapesDataset(ShapesConfig(), length=2)[0]


def test_token_indices_follow_spans_and_skip_dropped_and_cut_words():
    tok = build_offline_tokenizer(["a red circle above a blue square"], max_length=6)
    captions = ["a red circle above a blue square", ""]
    spans = torch.tensor([[[2, 5], [6, 12], [20, 24]], [[2, 5], [-1, -1], [-1, -1]]])
    idx = token_indices(tok, captions, spans)
    ids = tok(captions[0])["input_ids"]
    assert tok.convert_ids_to_tokens(ids[idx[0, 0]]) == "red</w>"
    assert tok.convert_ids_to_tokens(ids[idx[0, 1]]) == "circle</w>"
    assert idx[0, 2] == -1                  # "blue" is past the 6-token limit
    assert (idx[1] == -1).all()             # a dropped caption grounds nothing


def test_grounding_loss_is_minimal_when_maps_equal_masks():
    masks = torch.zeros(1, 2, 8, 8)
    masks[0, 0, :4, :4] = 1
    masks[0, 1, 4:, 4:] = 1
    tokens = torch.tensor([[1, 2]])

    def probs(maps):  # (2, h, w) maps for tokens 1 and 2 -> (1, h * w, T=4), rows summing to one
        p = torch.full((1, maps[0].numel(), 4), 1e-3)
        p[0, :, 1], p[0, :, 2] = maps[0].flatten(), maps[1].flatten()
        return p / p.sum(-1, keepdim=True)

    exact = grounding_loss([probs(masks[0])], masks, tokens)
    swapped = grounding_loss([probs(masks[0].flip(0))], masks, tokens)
    uniform = grounding_loss([torch.full((1, 64, 4), 0.25)], masks, tokens)
    assert exact < 1e-4 and swapped > 0.9 and 0.5 < uniform < 0.6            # (1 - 1/4)^2 = 0.5625
    coarse = grounding_loss([probs(torch.nn.functional.avg_pool2d(masks[0], 2))], masks, tokens)
    assert coarse < 1e-4                                                      # a 4x4 layer pools the masks
    assert grounding_loss([probs(masks[0])], masks, torch.tensor([[-1, -1]])) == 0


@pytest.mark.parametrize("kind", ["t2i", "diffusers"])
def test_capture_restores_processors_and_gradients_reach_attention(kind):
    from conftest import tiny_diffusers_unet
    torch.manual_seed(0)
    unet = jittered(build_unet("tiny")) if kind == "t2i" else tiny_diffusers_unet()
    before = dict(unet.attn_processors)
    x, ctx = torch.randn(2, 3, 16, 16), torch.randn(2, 4, 32, requires_grad=True)
    with capture_cross_attention(unet) as probs:
        unet(x, 10, ctx)
    assert len(probs) == sum(n.endswith(("cross_attn", "attn2.processor")) for n in before) > 0
    assert all(p.shape[0] == 2 and p.shape[2] == 4 for p in probs)
    masks = torch.zeros(2, 1, 16, 16)
    masks[:, 0, :8, :8] = 1
    grounding_loss(probs, masks, torch.tensor([[1], [2]])).backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    assert unet.attn_processors == before


def test_folder_masks_load_and_a_missing_mask_names_the_file(tmp_path):
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(tmp_path / "a.png")
    m = np.zeros((16, 16), np.uint8)
    m[:8, :8] = 255
    Image.fromarray(m).save(tmp_path / "a_cube.png")
    row = {"file_name": "a.png", "text": "a red cube", "masks": {"cube": "a_cube.png"}}
    (tmp_path / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    item = ImageFolderDataset(tmp_path, size=8, grounding=True)[0]
    assert item["ground_spans"][0].tolist() == [6, 10]
    assert item["ground_masks"][0, :3, :3].min() > 0.95 and item["ground_masks"][0, 5:, 5:].max() < 0.05  # Lanczos edge
    row["masks"] = {"cube": "gone.png"}
    (tmp_path / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="gone.png.*does not exist"):
        ImageFolderDataset(tmp_path, size=8, grounding=True)
    row["masks"] = {"sphere": "a_cube.png"}
    (tmp_path / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="'sphere' is not a word of the caption"):
        ImageFolderDataset(tmp_path, size=8, grounding=True)


# -- the objective's and the data's knobs ---------------------------------------------------------

def test_timestep_bias_moves_training_towards_high_noise():
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states=None, encoder_attention_mask=None):
            seen.append(t.float().mean().item())
            return type("Out", (), {"sample": torch.zeros_like(x)})()

    x0 = torch.zeros(4096, 1, 1, 1)
    for bias in (1.0, 3.0):
        cfg = load_config(None, [f"noise.timestep_bias={bias}"]).noise
        diffusion_loss(Spy(), make_noise_scheduler(cfg), x0, None, None, cfg, torch.Generator().manual_seed(0))
    assert seen[0] == pytest.approx(499.5, abs=15)      # uniform over 0..999
    assert seen[1] == pytest.approx(749.5, abs=15)      # E[T u^(1/3)] = 3T/4


def test_position_prob_sets_how_often_captions_say_where():
    def share(p):
        scenes = [render_scene(ShapesConfig(max_objects=1, position_prob=p), i) for i in range(400)]
        return np.mean(["position" in s.stated for s in scenes])
    assert share(0.5) == pytest.approx(0.5, abs=0.07) and share(0.9) == pytest.approx(0.9, abs=0.05)
    with pytest.raises(ValueError, match="position_prob"):
        load_config(None, ["data.position_prob=1.5"])


def test_training_with_every_new_option_lowers_the_loss(tmp_path, one_thread):
    from t2i.train import train
    cfg = load_config(None, [
        "model.preset=tiny", "text.width=32", "text.layers=1", "text.heads=2", "data.size=16", "data.max_objects=1",
        "train.batch_size=8", "train.preview_every=0", "train.log_every=5", "train.warmup_steps=5", "train.lr=3e-3",
        "train.max_steps=60", "train.checkpoint_every=1000", f"train.output_dir={tmp_path}",
        "model.pos_embed=true", "model.context_layers=1", "noise.min_snr_gamma=null", "noise.timestep_bias=2.0",
        "data.position_prob=0.8", "train.grounding_weight=0.5"])
    train(cfg)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    logs = EventAccumulator(str(next((tmp_path / "tensorboard").rglob("events.*")).parent)).Reload()
    loss = [e.value for e in logs.Scalars("loss")]
    ground = [e.value for e in logs.Scalars("grounding_loss")]
    assert np.mean(loss[-3:]) < 0.8 * np.mean(loss[:3])
    assert np.mean(ground[-3:]) < np.mean(ground[:3])
