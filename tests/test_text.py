import warnings

import pytest
import torch

from t2i.text import (PromptTruncated, build_offline_text_encoder, build_offline_tokenizer, encode_prompts,
                      learn_bpe, load_pretrained_clip)

from conftest import CORPUS


def test_offline_tokenizer_one_token_per_corpus_word():
    tok = build_offline_tokenizer(CORPUS, 16)
    for caption in CORPUS:
        pieces = tok.tokenize(caption)
        assert pieces == [w + "</w>" for w in caption.split()]


def test_offline_tokenizer_byte_fallback_never_unknown():
    tok = build_offline_tokenizer(CORPUS, 64)
    ids = tok("a Zebra 🦓 über 42!")["input_ids"]
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True) == "a zebra 🦓 über 4 2 !"


def test_learn_bpe_is_deterministic():
    from collections import Counter
    counts = Counter({"circle": 3, "square": 2, "red": 5})
    assert learn_bpe(counts) == learn_bpe(Counter(dict(reversed(list(counts.items())))))


def test_encode_prompts_shapes_mask_and_tokens():
    tok = build_offline_tokenizer(CORPUS, 12)
    enc = build_offline_text_encoder(tok, width=32, layers=1, heads=2, seed=0)
    out = encode_prompts(tok, enc, ["a red circle", "a blue square above a green triangle"])
    assert out.hidden_states.shape == (2, 12, 32)
    assert out.attention_mask.sum(1).tolist() == [5, 9]
    assert out.tokens[0] == ["<|startoftext|>", "a</w>", "red</w>", "circle</w>", "<|endoftext|>"]


def test_too_long_prompt_truncates_with_count():
    tok = build_offline_tokenizer(CORPUS, 6)
    enc = build_offline_text_encoder(tok, width=32, layers=1, heads=2, seed=0)
    with pytest.warns(PromptTruncated, match="dropped the last 3 tokens"):  # a category its readers can silence
        out = encode_prompts(tok, enc, ["a red circle above a blue square"])  # 7 words + 2 specials = 9
    assert out.tokens[0][-1] == "<|endoftext|>" and len(out.tokens[0]) == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", PromptTruncated)
        encode_prompts(tok, enc, ["a red circle above a blue square"])


@pytest.mark.parametrize("layout", ["flat", "stable-diffusion"])
def test_load_pretrained_clip_from_local_path(tmp_path, monkeypatch, layout):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = build_offline_tokenizer(CORPUS, 10)
    enc = build_offline_text_encoder(tok, width=32, layers=1, heads=2, seed=0).eval()
    root = tmp_path / "clip"
    tok.save_pretrained(root / ("tokenizer" if layout != "flat" else ""))
    enc.save_pretrained(root / ("text_encoder" if layout != "flat" else ""))
    tok2, enc2 = load_pretrained_clip(str(root))
    a = encode_prompts(tok, enc, ["a red circle"]).hidden_states
    b = encode_prompts(tok2, enc2.eval(), ["a red circle"]).hidden_states
    assert torch.allclose(a, b, atol=1e-6)


def test_load_pretrained_clip_unreachable_is_clear(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="could not load a CLIP text encoder"):
        load_pretrained_clip("no-such-org/no-such-clip")


def test_caption_dropout_rate_over_many_draws():
    from t2i.text import drop_captions
    g = torch.Generator().manual_seed(0)
    kept = drop_captions(["a red circle"] * 20_000, 0.1, g)
    assert set(kept) == {"", "a red circle"}
    assert abs(kept.count("") / len(kept) - 0.1) < 0.01                 # the standard error is 0.002
    assert drop_captions(["a red circle"] * 1000, 0.0, g) == ["a red circle"] * 1000


def test_a_hub_clip_fails_at_once_when_the_hub_is_unreachable(tmp_path):
    """Not offline by setting, but no hub to reach: one line naming a local path, not minutes of retries."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(tmp_path), HF_ENDPOINT="http://127.0.0.1:9", OMP_NUM_THREADS="1")  # nothing listens on 9
    script = ("import time; from t2i.text import load_pretrained_clip; t = time.time()\n"
              "try: load_pretrained_clip('openai/clip-vit-base-patch32')\n"
              "except ValueError as e: print(e)\n"
              "print(f'{time.time() - t:.1f}')")
    try:
        run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("loading a hub CLIP with the hub unreachable took over two minutes")
    message, seconds = run.stdout.strip().splitlines()
    assert "hub is unreachable" in message and "pass a local path" in message.lower(), run.stdout + run.stderr[-2000:]
    assert float(seconds) < 15


def test_the_cut_off_warning_is_short_alone_and_readable_in_any_script(caplog):
    from t2i.text import tokenize
    tok = build_offline_tokenizer(CORPUS, 12)
    with pytest.warns(UserWarning) as record:
        tokenize(tok, ["a red circle " * 1000])
        tokenize(tok, ["一个红色的圆" * 3])
    long, cjk = (str(w.message) for w in record)
    assert len(long) < 300 and "(13000 characters)" in long, long
    assert "\ufffd" not in cjk and "的圆" in cjk, cjk
    assert "indexing errors" not in caplog.text            # transformers' own warning stays quiet


def test_a_grown_text_encoder_says_the_old_words_as_before_and_knows_the_new_ones():
    """train.init_from with text.grow: the tokenizer learned from a larger corpus and the encoder grown to it
    and to a longer max length; a prompt of old words encodes exactly as before, a new word is one token."""
    from conftest import CORPUS
    from t2i.text import build_offline_text_encoder, build_offline_tokenizer, encode_prompts, grow_text
    tokenizer = build_offline_tokenizer(CORPUS, max_length=12)
    encoder = build_offline_text_encoder(tokenizer, width=32, layers=1, heads=2, seed=0)
    grown_tok, grown = grow_text(tokenizer, encoder, CORPUS + ["a picture of a circle in the upper left corner"], 16)
    assert grown_tok.model_max_length == 16 and len(grown_tok) > len(tokenizer)
    assert grown_tok.tokenize("upper corner") == ["upper</w>", "corner</w>"]
    prompt = ["a small yellow circle in the top left"]
    before, after = encode_prompts(tokenizer, encoder, prompt), encode_prompts(grown_tok, grown, prompt)
    assert before.tokens == after.tokens
    n = len(before.tokens[0])
    torch.testing.assert_close(after.hidden_states[0, :n], before.hidden_states[0, :n])
