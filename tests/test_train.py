import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import TINY_RUN, tiny_config
from safetensors.torch import load_file

from t2i import checkpoint as ckpt
from t2i.config import load_config
from t2i.diffusion import diffusion_loss, make_noise_scheduler
from t2i.train import train
from t2i.unet import build_unet

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
    exported = train(a)
    assert (exported / "model_index.json").exists()
    assert "library_name: t2i" in (exported / "README.md").read_text()  # the model card
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
    # the exported pipeline holds the EMA weights (not the live ones) and the caption dropout it was trained with
    last = tmp_path / "a" / "checkpoint-0000004"
    ema, live = load_file(str(last / "ema.safetensors")), load_file(str(last / "unet.safetensors"))
    exported_unet = load_file(str(exported / "unet" / "diffusion_pytorch_model.safetensors"))
    assert exported_unet.keys() == ema.keys()
    assert all(torch.equal(v, ema[k].to(v.dtype)) for k, v in exported_unet.items())
    assert any(not torch.equal(v, live[k].to(v.dtype)) for k, v in exported_unet.items())
    assert json.loads((exported / "model_index.json").read_text())["caption_dropout"] == a.train.caption_dropout == 0.1
    assert (tmp_path / "b" / "config.yaml").exists() and list((tmp_path / "b" / "tensorboard").rglob("events*"))


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


def test_two_processes_train_in_sync(tmp_path):
    """accelerate launch --multi_gpu --num_processes 2 on a machine without GPUs (gloo on CPU): gradients are all-reduced (the save checks the
    weights agree across processes) and one checkpoint is written, with each process's RNG."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "t2i.cli", "train",
           *TINY_RUN, f"train.output_dir={tmp_path}", "train.max_steps=2", "train.checkpoint_every=2"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "on 2 x cpu" in run.stdout, run.stdout
    found = ckpt.checkpoints(tmp_path)
    assert [p.name for p in found] == ["checkpoint-0000002"]
    state = json.loads((found[0] / "state.json").read_text())
    assert state["world_size"] == 2 and state["samples"] == 2 * 2 * 4
    assert (found[0] / "rng-0.safetensors").exists() and (found[0] / "rng-1.safetensors").exists()
    assert (tmp_path / "pipeline" / "model_index.json").exists()


def test_make_dataset_then_train_on_the_folder_with_a_frozen_local_clip(tmp_path, monkeypatch):
    """`t2i make-dataset` writes an image folder; training reads it with a pretrained CLIP loaded by
    path (hub unreachable), kept frozen, its states cached per caption."""
    from t2i.cli import main
    from t2i.text import build_offline_text_encoder, build_offline_tokenizer
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["make-dataset", "shapes", "--num", "12", "--size", "16", "--out", str(tmp_path / "data")]) == 0
    assert len(list((tmp_path / "data").glob("*.png"))) == 12
    from t2i.data.shapes import ShapesConfig, caption_corpus
    tok = build_offline_tokenizer(caption_corpus(ShapesConfig()), 24)
    enc = build_offline_text_encoder(tok, width=32, layers=1, heads=2, seed=0)
    tok.save_pretrained(tmp_path / "clip")
    enc.save_pretrained(tmp_path / "clip")
    cfg = tiny_config(tmp_path / "run", "data.kind=folder", f"data.root={tmp_path / 'data'}", "data.crop=random",
                      f"text.pretrained={tmp_path / 'clip'}", "train.max_steps=3", "train.checkpoint_every=3")
    assert not cfg.text.trainable
    path = train(cfg)
    ckpt_dir = ckpt.checkpoints(tmp_path / "run")[-1]
    assert not (ckpt_dir / "text_encoder.safetensors").exists()  # frozen: not in the checkpoint
    exported = load_file(str(path / "text_encoder" / "model.safetensors"))
    for k, v in enc.state_dict().items():
        if k in exported:
            assert torch.equal(exported[k].float(), v), k


def test_the_loop_drops_captions_at_the_configured_rate(tmp_path, monkeypatch):
    from t2i.text import TextStates
    seen, call = [], TextStates.__call__
    monkeypatch.setattr(TextStates, "__call__", lambda self, captions, device: (seen.extend(captions),
                                                                                call(self, captions, device))[1])
    train(tiny_config(tmp_path, "train.max_steps=2", "train.batch_size=8", "train.caption_dropout=0.5",
                      "train.checkpoint_every=100"), stop_at=2)
    assert len(seen) == 16 and 3 <= seen.count("") <= 13              # 16 draws at p = 0.5


# ---- issue 10: nothing lost, one clear line -------------------------------------------------------


def test_bad_data_size_fails_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="data.size=17 must be a multiple of 2"):
        train(tiny_config(tmp_path, "data.size=17"))
    assert not tmp_path.joinpath("config.yaml").exists()


def test_report_to_none_writes_no_logs_and_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    assert train(tiny_config(tmp_path / "none", "train.max_steps=1", "train.report_to=none")) is not None
    assert not (tmp_path / "none" / "tensorboard").exists()
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match="pip install wandb"):
        train(tiny_config(tmp_path / "wandb", "train.max_steps=1", "train.report_to=wandb"))
    with pytest.raises(ValueError, match="report_to"):
        tiny_config(tmp_path, "train.report_to=mlflow")


@pytest.mark.parametrize("yaml_value, launched, expected", [(None, "bf16", "bf16"), ("no", "bf16", "no"),
                                                            (None, None, "no"), ("bf16", None, "bf16")])
def test_mixed_precision_from_accelerate_unless_the_yaml_sets_it(tmp_path, monkeypatch, yaml_value, launched, expected):
    """`accelerate launch --mixed_precision X` sets ACCELERATE_MIXED_PRECISION; an explicit YAML value wins."""
    import t2i.train
    from accelerate.state import AcceleratorState
    if launched:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launched)
    else:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    monkeypatch.setattr(t2i.train, "_train", lambda cfg, accelerator, *a: accelerator.mixed_precision)
    extra = [] if yaml_value is None else [f"train.mixed_precision={yaml_value}"]
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        assert train(tiny_config(tmp_path, *extra)) == expected
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_train_gradient_checkpointing_switch(tmp_path, monkeypatch):
    from t2i.unet import T2IUNet
    enabled = []
    real = T2IUNet.enable_gradient_checkpointing
    monkeypatch.setattr(T2IUNet, "enable_gradient_checkpointing", lambda self, *a: (enabled.append(True), real(self, *a)))
    assert train(tiny_config(tmp_path, "train.max_steps=1", "train.gradient_checkpointing=true")) is not None
    assert enabled == [True]
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        tiny_config(tmp_path, "train.gradient_checkpointing=true", "train.grounding_weight=0.1")


TRACED = '''import os, sys
import t2i.data.folder as folder, t2i.text as text
def traced(module, name):
    real = getattr(module, name)
    def call(*a, **k):
        with open(os.environ["T2I_TRACE"], "a") as f:
            f.write(f"{name} {os.environ.get('RANK', '0')}\\n")
        return real(*a, **k)
    setattr(module, name, call)
traced(text, "build_offline_tokenizer"); traced(folder, "_is_readable_image")
from t2i.cli import main
sys.exit(main(sys.argv[1:]))
'''


def test_two_processes_share_the_folder_index_and_the_tokenizer(tmp_path):
    """The main process verifies the image folder and learns the tokenizer; the other reads both."""
    import numpy as np
    from PIL import Image
    data = tmp_path / "data"
    data.mkdir()
    for i, caption in enumerate(["a red circle", "a blue square", "a green triangle", "a red square"]):
        Image.fromarray(np.full((16, 16, 3), 60 * i, np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(caption)
    (tmp_path / "traced.py").write_text(TRACED)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "T2I_TRACE": str(tmp_path / "trace.txt"),
           "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(__file__)), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(tmp_path / "traced.py"), "train",
           *TINY_RUN, "data.kind=folder", f"data.root={data}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=1",
           "train.checkpoint_every=1"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    trace = (tmp_path / "trace.txt").read_text().split()
    assert trace.count("build_offline_tokenizer") == 1 and trace[trace.index("build_offline_tokenizer") + 1] == "0"
    assert trace.count("_is_readable_image") == 4 and set(trace[1::2]) == {"0"}  # rank 1 verified nothing
    assert (data / ".t2i-index.json").exists()


def test_init_from_starts_at_the_pipeline_and_refuses_a_unet_that_does_not_fit(tmp_path):
    """train.init_from: a pipeline's UNet, tokenizer and text encoder as the start. A zero-initialised addition
    (model.pos_embed) leaves the start's function unchanged; a different UNet shape is one clear error."""
    from t2i.pipeline import load_pipeline
    from t2i.train import load_start
    from t2i.unet import build_unet
    first = train(tiny_config(tmp_path / "a", "train.max_steps=2", "train.checkpoint_every=2"))
    start = load_pipeline(first)
    torch.manual_seed(0)
    grown = build_unet("tiny", sample_size=16, cross_attention_dim=32, pos_embed=True)
    load_start(grown, start.unet, "a")
    x, ctx = torch.randn(2, 3, 16, 16), torch.randn(2, 5, 32)
    with torch.no_grad():
        assert torch.allclose(grown(x, 10, ctx).sample, start.unet(x, 10, ctx).sample, atol=1e-5)
    with pytest.raises(ValueError, match=r"init_from=a: its UNet does not fit model.* \(.* is \(.*\) there"):
        load_start(build_unet("tiny", sample_size=16, cross_attention_dim=32, block_channels=[16, 64]), start.unet, "a")
    with pytest.raises(ValueError, match="context_refiner.* is new and not zero-initialised"):
        load_start(build_unet("tiny", sample_size=16, cross_attention_dim=32, context_layers=1), start.unet, "a")
    # a frozen text encoder from the start is no random one; the run trains on from the start's weights
    cfg = tiny_config(tmp_path / "b", f"train.init_from={first}", "model.pos_embed=true", "text.train=false",
                      "train.max_steps=1", "train.checkpoint_every=1")
    path = train(cfg)
    exported = load_file(str(path / "text_encoder" / "model.safetensors"))
    assert all(torch.equal(exported[k].float(), v) for k, v in start.text_encoder.state_dict().items() if k in exported)
    assert (tmp_path / "b" / "tokenizer" / "tokenizer.json").read_text() == (first / "tokenizer" / "tokenizer.json").read_text()
    with pytest.raises(ValueError, match="brings its own tokenizer"):
        tiny_config(tmp_path / "c", f"train.init_from={first}", "text.pretrained=some/clip")


def test_the_lr_warms_up_linearly_from_the_first_step_then_decays_by_cosine_to_a_tenth():
    from t2i.train import lr_lambda
    f = lr_lambda(load_config(None, ["train.warmup_steps=4", "train.max_steps=14"]))
    cosine = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 10))              # step 5: a tenth of the decay
    assert [f(s) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, cosine])
    assert f(14) == pytest.approx(0.1) and f(100) == pytest.approx(0.1)
    assert lr_lambda(load_config(None, ["train.warmup_steps=0", "train.max_steps=4"]))(0) == 1.0


def test_gradients_are_clipped_to_train_grad_clip(tmp_path):
    """After one step AdamW's first moment is (1 - beta1) * the gradient it was given: its norm is the clipped
    gradient norm, train.grad_clip (far below the tiny model's own gradient norm)."""
    cfg = tiny_config(tmp_path, "train.max_steps=1", "train.checkpoint_every=1", "train.grad_clip=0.01")
    train(cfg)
    moments = load_file(str(ckpt.checkpoints(tmp_path)[-1] / "optimizer.safetensors"))
    first = [v for k, v in moments.items() if k.endswith(".exp_avg")]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v.double()) for v in first])) / (1 - 0.9)
    assert norm.item() == pytest.approx(0.01, rel=1e-3)


# ---- issue 19: nothing lost, round 2 ---------------------------------------------------------------


def test_resume_is_bit_exact_with_dropout(tmp_path):
    """Dropout draws from the global torch RNG: the checkpoint's RNG must be the straight run's, and nothing
    (the data loader) may draw from it between the restore and the first step."""
    args = ["model.dropout=0.3", "train.max_steps=4", "train.checkpoint_every=2", "train.report_to=none"]
    train(tiny_config(tmp_path / "a", *args), stop_at=4)
    train(tiny_config(tmp_path / "b", *args), stop_at=2)
    train(tiny_config(tmp_path / "b", *args), resume="latest", stop_at=4)
    for name in ("unet", "ema", "rng-0"):
        wa = load_file(str(tmp_path / "a" / "checkpoint-0000004" / f"{name}.safetensors"))
        wb = load_file(str(tmp_path / "b" / "checkpoint-0000004" / f"{name}.safetensors"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


@pytest.mark.parametrize("stop_at", ["0", "-1"])
def test_stop_at_below_one_is_one_line_and_trains_nothing(tmp_path, capsys, stop_at):
    from t2i.cli import main
    assert main(["train", *TINY_RUN, f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "--stop-at", stop_at]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"t2i train: error: --stop-at must be a step >= 1, got {stop_at}; leave it out to train to "
                   "train.max_steps"], err
    assert not (tmp_path / "run").exists()


def test_stop_at_before_the_checkpoint_is_refused_on_resume(tmp_path):
    cfg = tiny_config(tmp_path, "train.max_steps=6", "train.checkpoint_every=2", "train.report_to=none")
    train(cfg, stop_at=4)
    with pytest.raises(ValueError, match="--stop-at 2 is not after the checkpoint's step 4"):
        train(cfg, resume="latest", stop_at=2)
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["checkpoint-0000002", "checkpoint-0000004"]


@pytest.mark.parametrize("state", ["{}", "[]", "files"])
def test_a_hand_edited_state_json_is_a_damaged_checkpoint(tmp_path, state):
    cfg = tiny_config(tmp_path, "train.max_steps=6", "train.checkpoint_every=2", "train.report_to=none")
    train(cfg, stop_at=4)
    newest = tmp_path / "checkpoint-0000004"
    saved = json.loads((newest / "state.json").read_text())
    if state == "files":  # valid JSON listing no files, beside a missing unet
        (newest / "unet.safetensors").unlink()
    (newest / "state.json").write_text(json.dumps({**saved, "files": []}) if state == "files" else state)
    problem = {"{}": "state.json lacks step, samples", "[]": "state.json holds a list",
               "files": "state.json: it lists no unet.safetensors"}[state]
    with pytest.raises(ValueError, match=rf"checkpoint-0000004 is damaged \({problem}"):
        train(cfg, resume=str(newest))
    with pytest.warns(UserWarning, match=rf"skipped checkpoint-0000004: {problem}.*checkpoint-0000002"):
        assert train(cfg, resume="latest", stop_at=4) is None


def test_a_full_disk_during_export_is_one_line_and_a_resume_exports(tmp_path, monkeypatch, capsys):
    import safetensors.torch
    from safetensors import SafetensorError

    from t2i.cli import main
    args = ["train", *TINY_RUN, f"train.output_dir={tmp_path}", "train.max_steps=2", "train.checkpoint_every=2",
            "train.report_to=none"]
    real = safetensors.torch.save_file

    def full(tensors, path, *a, **kw):  # the disk fills up half-way through the first weights file
        open(path, "wb").write(b"\0" * 100)
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("t2i train")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0] == (f"t2i train: error: no space left on the disk of {tmp_path} while writing pipeline/; "
                        "checkpoint-0000002 is complete: free space, then export it with --resume latest"), lines
    assert not (tmp_path / "pipeline").exists() and not list(tmp_path.glob(".pipeline*"))
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert main([*args, "--resume", "latest"]) == 0
    assert "exported pipeline" in capsys.readouterr().out
    from t2i.pipeline import load_pipeline
    assert load_pipeline(tmp_path / "pipeline").unet is not None
    assert str(tmp_path / "pipeline") in (tmp_path / "pipeline" / "README.md").read_text()


def test_a_failed_start_leaves_no_run_behind(tmp_path):
    """A start that fails before its first checkpoint (here: a damaged train.init_from) leaves files, but no run:
    the corrected rerun starts without --overwrite, and --resume latest says there is nothing to resume."""
    good = train(tiny_config(tmp_path / "a", "train.max_steps=1", "train.report_to=none"))
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    weights = broken / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"^{weights} is cut short \(5000 of \d+ bytes\): copy the pipeline"):
        train(tiny_config(run, "train.max_steps=1", f"train.init_from={broken}"))
    (run / "tokenizer").mkdir(exist_ok=True)                  # what a start that failed later leaves
    (run / "config.yaml").write_text("train: {}\n")
    with pytest.raises(ValueError, match="no checkpoint in"):
        train(tiny_config(run, "train.max_steps=1"), resume="latest")
    with pytest.warns(UserWarning, match=r"holds no checkpoint, only what a start that failed left \(config.yaml, "
                      r"tokenizer\): replacing it"):
        assert train(tiny_config(run, "train.max_steps=1", "train.report_to=none")) is not None
    assert ckpt.checkpoints(run) and "max_steps: 1" in (run / "config.yaml").read_text()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_t2i_did_not_write_is_refused_and_left_as_it_was(tmp_path, overwrite):
    """A pipeline folder as both train.init_from and train.output_dir, or a folder with the user's own config.yaml:
    no run, and not what a start of t2i left (no .t2i-run mark), so it is refused in one line, even with
    --overwrite, and nothing in it changes."""
    from conftest import tiny_pipeline
    model = tmp_path / "model"
    tiny_pipeline().save_pretrained(model)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: notes\n")
    for folder, extra, names in [(model, [f"train.init_from={model}"], "model_index.json, scheduler, t2i_pipeline.py, "
                                  "text_encoder, tokenizer, ..."), (mine, [], "config.yaml")]:
        before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
        with pytest.raises(ValueError, match=re.escape(
                f"train.output_dir {folder} holds files that t2i train did not write ({names}) and no run; nothing "
                "there is replaced: choose a new or empty train.output_dir")):
            train(tiny_config(folder, "train.max_steps=1", "train.report_to=none", *extra), overwrite=overwrite)
        assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("text", ["text.train=true", "text.train=false"])
def test_a_fine_tune_resumes_without_its_init_from_folder(tmp_path, text):
    """The run keeps the start's tokenizer and text encoder; the checkpoint holds the rest."""
    start = train(tiny_config(tmp_path / "start", "train.max_steps=1", "train.report_to=none"))
    args = [f"train.init_from={start}", text, "train.max_steps=2", "train.checkpoint_every=1", "train.report_to=none"]
    train(tiny_config(tmp_path / "straight", *args))
    train(tiny_config(tmp_path / "resumed", *args), stop_at=1)
    start.rename(tmp_path / "gone")
    assert train(tiny_config(tmp_path / "resumed", *args), resume="latest") is not None
    for name in ("unet", "ema"):
        wa = load_file(str(tmp_path / "straight" / "checkpoint-0000002" / f"{name}.safetensors"))
        wb = load_file(str(tmp_path / "resumed" / "checkpoint-0000002" / f"{name}.safetensors"))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    a, b = (load_file(str(tmp_path / run / "pipeline" / "text_encoder" / "model.safetensors"))
            for run in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
