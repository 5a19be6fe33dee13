import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from t2i import checkpoint as ckpt
from t2i.config import load_config
from t2i.diffusion import diffusion_loss, make_noise_scheduler
from t2i.train import train
from t2i.unet import build_unet

TINY = ["model.preset=tiny", "text.width=32", "text.layers=1", "text.heads=2", "data.size=16", "data.max_objects=2",
        "train.batch_size=4", "train.preview_every=0", "train.log_every=1", "train.warmup_steps=2",
        "train.lr=1e-3", "train.keep_checkpoints=5"]


def tiny_config(tmp_path, *extra):
    return load_config(None, TINY + [f"train.output_dir={tmp_path}", *extra])


def test_one_step_changes_the_weights_and_dozens_lower_the_loss():
    from t2i.data.shapes import ShapesConfig, ShapesDataset
    ds = ShapesDataset(ShapesConfig(size=16), length=8)
    x0 = torch.stack([ds[i]["pixel_values"] for i in range(8)])
    torch.manual_seed(0)
    unet = build_unet("tiny", cross_attention_dim=8)
    ctx, cfg = torch.randn(8, 3, 8), load_config().noise
    sched = make_noise_scheduler(cfg)
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3)

    def fixed_loss():  # same timesteps and noise every time
        with torch.no_grad():
            return diffusion_loss(unet, sched, x0, ctx, None, cfg, torch.Generator().manual_seed(0)).item()

    before, w0 = fixed_loss(), unet.conv_in.weight.detach().clone()
    g = torch.Generator().manual_seed(1)
    for step in range(40):
        loss = diffusion_loss(unet, sched, x0, ctx, None, cfg, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 0:
            assert not torch.equal(unet.conv_in.weight, w0)
    assert fixed_loss() < 0.7 * before


def test_resume_equals_uninterrupted(tmp_path):
    a = tiny_config(tmp_path / "a", "train.max_steps=4", "train.checkpoint_every=2")
    assert (train(a) / "model_index.json").exists()
    b = tiny_config(tmp_path / "b", "train.max_steps=4", "train.checkpoint_every=2")
    assert train(b, stop_at=2) is None
    assert [p.name for p in ckpt.checkpoints(tmp_path / "b")] == ["checkpoint-0000002"]
    train(b, resume="latest")
    for name in ("unet", "ema", "text_encoder", "optimizer"):
        wa = load_file(str(tmp_path / "a" / "checkpoint-0000004" / f"{name}.safetensors"))
        wb = load_file(str(tmp_path / "b" / "checkpoint-0000004" / f"{name}.safetensors"))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.allclose(wa[k], wb[k], atol=1e-6), (name, k)
    state = json.loads((tmp_path / "b" / "checkpoint-0000004" / "state.json").read_text())
    assert state["step"] == 4 and state["samples"] == 16 and state["config"]["train"]["max_steps"] == 4
    assert (tmp_path / "b" / "config.yaml").exists() and list((tmp_path / "b" / "tensorboard").rglob("events*"))


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "train.max_steps=4", "train.checkpoint_every=2")
    train(cfg, stop_at=2)
    real = ckpt.save_file

    def crash(tensors, path):
        if "checkpoint-0000004" in path and path.endswith("ema.safetensors"):
            raise KeyboardInterrupt  # the process dies mid-save
        real(tensors, path)
    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, resume="latest")
    monkeypatch.setattr(ckpt, "save_file", real)
    assert ckpt.resolve_resume(tmp_path, "latest").name == "checkpoint-0000002"
    tensors, state = ckpt.read_checkpoint(ckpt.resolve_resume(tmp_path, "latest"))
    assert state["step"] == 2 and "unet" in tensors
    assert train(cfg, resume="latest") is not None  # and training carries on from it


def test_nan_loss_stops_with_a_clear_message(tmp_path, monkeypatch):
    import t2i.train as tr
    real = tr.diffusion_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 3 else loss
    monkeypatch.setattr(tr, "diffusion_loss", flaky)
    cfg = tiny_config(tmp_path, "train.max_steps=6", "train.checkpoint_every=2")
    with pytest.raises(FloatingPointError, match="last good checkpoint is .*checkpoint-0000002"):
        train(cfg)
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["checkpoint-0000002"]


def test_resume_with_another_model_is_a_clear_error(tmp_path):
    train(tiny_config(tmp_path, "train.max_steps=2", "train.checkpoint_every=2"), stop_at=2)
    other = tiny_config(tmp_path, "train.max_steps=4", "model.block_channels=[16,64]")
    with pytest.raises(ValueError, match="does not match the model in this config"):
        train(other, resume="latest")
    with pytest.raises(ValueError, match="no checkpoint in"):
        train(tiny_config(tmp_path / "empty", "train.max_steps=2"), resume="latest")


def test_two_processes_train_in_sync(tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 on a machine without GPUs (gloo on CPU): gradients are all-reduced (the save checks the
    weights agree across processes) and one checkpoint is written, with each process's RNG."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "t2i.cli", "train",
           *TINY, f"train.output_dir={tmp_path}", "train.max_steps=2", "train.checkpoint_every=2"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "on 2 x cpu" in run.stdout, run.stdout
    found = ckpt.checkpoints(tmp_path)
    assert [p.name for p in found] == ["checkpoint-0000002"]
    state = json.loads((found[0] / "state.json").read_text())
    assert state["world_size"] == 2 and state["samples"] == 2 * 2 * 4
    assert (found[0] / "rng-0.safetensors").exists() and (found[0] / "rng-1.safetensors").exists()
    assert (tmp_path / "pipeline" / "model_index.json").exists()
