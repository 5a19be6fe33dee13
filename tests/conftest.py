import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the tests may reach the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_RUN = ["model.preset=tiny", "text.width=32", "text.layers=1", "text.heads=2", "data.size=16",
            "data.max_objects=2", "train.batch_size=4", "train.preview_every=0", "train.log_every=1",
            "train.warmup_steps=2", "train.lr=1e-3", "train.keep_checkpoints=5", "train.position_every=0"]  # `t2i train` overrides: seconds
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
    return UNet2DConditionModel(**{
        **dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8), **overrides})


def tiny_config(run_dir, *extra):
    """The RunConfig of a tiny training run (TINY_RUN) into run_dir, with more overrides."""
    from t2i.config import load_config
    return load_config(None, TINY_RUN + [f"train.output_dir={run_dir}", *extra])


def two_objects(size=32):
    """Two disjoint square masks (N=1 each) in a size x size image."""
    a, b = np.zeros((1, size, size), bool), np.zeros((1, size, size), bool)
    a[0, 2:10, 2:10] = True
    b[0, 20:28, 18:26] = True
    return a, b


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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """tiny_pipeline() saved as a pipeline folder, once per test module."""
    path = tmp_path_factory.mktemp("model")
    tiny_pipeline().save_pretrained(path)
    return path


def _serve(tmp_path_factory, *options):
    """`t2i serve` on a free loopback port, in its own process, with tiny_pipeline() as its model and `options`:
    (url, process, seconds from launch until it said it was ready). Skips where the web extra is missing."""
    import queue
    import subprocess
    import sys
    import threading
    import time
    pytest.importorskip("gradio", reason="the web extra is not installed: pip install -e '.[web]'")
    model = tmp_path_factory.mktemp("served-model")
    tiny_pipeline().save_pretrained(model)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "t2i.cli", "serve", "--model", str(model), "--port", "0",
                             "--device", "cpu", "--max-steps", "8", *options],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen, url = [], None
    try:
        while url is None:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                if proc.poll() is not None or time.perf_counter() - t0 > 120:
                    pytest.fail("t2i serve did not start within 120 s:\n" + "".join(seen))
                continue
            seen.append(line)
            if line.startswith("t2i explorer at "):
                url = line.split()[3]
        yield url, proc, time.perf_counter() - t0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def served(tmp_path_factory):
    """`t2i serve` of tiny_pipeline(), at most 8 steps (see _serve)."""
    yield from _serve(tmp_path_factory)


@pytest.fixture(scope="session")
def served_small_queue(tmp_path_factory):
    """`t2i serve` of tiny_pipeline() that samples one request at a time and lets one more wait."""
    yield from _serve(tmp_path_factory, "--max-steps", "200", "--max-images", "4", "--concurrency", "1",
                      "--max-queue", "1")
