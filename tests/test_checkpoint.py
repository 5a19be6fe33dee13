"""t2i.checkpoint: atomic, fsynced checkpoints and what a resume accepts; damaged ones skipped; the run folder
(one training at a time, a fresh run never over an old one) and a last checkpoint on SIGINT/SIGTERM."""
import errno
import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import TINY_RUN, tiny_config

from t2i import checkpoint as ckpt
from t2i.train import train


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "train.max_steps=4", "train.checkpoint_every=2")
    train(cfg, stop_at=2)
    real = ckpt.save_synced

    def crash(tensors, path):
        if "checkpoint-0000004" in str(path) and path.name == "ema.safetensors":
            raise KeyboardInterrupt  # the process dies mid-save
        real(tensors, path)
    monkeypatch.setattr(ckpt, "save_synced", crash)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, resume="latest")
    monkeypatch.setattr(ckpt, "save_synced", real)
    assert ckpt.resolve_resume(tmp_path, "latest").name == "checkpoint-0000002"
    tensors, state = ckpt.read_checkpoint(ckpt.resolve_resume(tmp_path, "latest"))
    assert state["step"] == 2 and "unet" in tensors
    assert train(cfg, resume="latest") is not None  # and training carries on from it


def test_resume_with_another_model_is_a_clear_error(tmp_path):
    train(tiny_config(tmp_path, "train.max_steps=2", "train.checkpoint_every=2"), stop_at=2)
    other = tiny_config(tmp_path, "train.max_steps=4", "model.block_channels=[16,64]")
    with pytest.raises(ValueError, match=r"model.block_channels: None -> \[16, 64\]"):
        train(other, resume="latest")
    with pytest.raises(ValueError, match="no checkpoint in"):
        train(tiny_config(tmp_path / "empty", "train.max_steps=2"), resume="latest")


@pytest.mark.parametrize("change, keys", [
    (["noise.prediction_type=epsilon"], ["noise.prediction_type"]),
    (["model.num_heads=4", "data.size=32"], ["data.size", "model.num_heads"]),
])
def test_resume_refuses_a_config_that_changes_the_model_or_objective(tmp_path, change, keys):
    base = ["noise.prediction_type=v_prediction", "train.checkpoint_every=2"]
    train(tiny_config(tmp_path, "train.max_steps=4", *base), stop_at=2)
    saved = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ValueError, match="differs from checkpoint-0000002's in what defines") as error:
        train(tiny_config(tmp_path, "train.max_steps=4", *base, *change), resume="latest")
    changes = str(error.value).split(". Resume")[0]
    assert all(key in changes for key in keys) and "train.max_steps" not in changes    # which may change
    assert (tmp_path / "config.yaml").read_text() == saved
    resumable = ["train.max_steps=3", "train.log_every=3", "train.checkpoint_every=3", "train.lr=1e-4"]
    assert train(tiny_config(tmp_path, "noise.prediction_type=v_prediction", *resumable), resume="latest")
    state = json.loads((tmp_path / "checkpoint-0000003" / "state.json").read_text())
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.1 * 1e-4)  # the new lr, at the cosine's end


def test_every_checkpoint_file_and_the_folder_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append((str(a), len(synced))), real_replace(a, b)))
    train(tiny_config(tmp_path, "train.max_steps=2", "train.checkpoint_every=2"), stop_at=2)
    stage, synced_before = next((a, n) for a, n in renamed if a.endswith(".checkpoint-0000002.tmp"))
    files = [f"{stage}/{p.name}" for p in (tmp_path / "checkpoint-0000002").iterdir()]
    assert set(files) | {stage} <= set(synced[:synced_before])
    assert str(tmp_path) in synced[synced_before:]                      # and the run folder after the rename


@pytest.mark.parametrize("damage", ["empty", "missing", "truncated"])
def test_resume_latest_skips_a_damaged_newest_checkpoint(tmp_path, damage):
    cfg = tiny_config(tmp_path, "train.max_steps=6", "train.checkpoint_every=2")
    train(cfg, stop_at=4)
    weights = tmp_path / "checkpoint-0000004" / "unet.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(b"" if damage == "empty" else weights.read_bytes()[:1000])
    (tmp_path / ".checkpoint-0000006.tmp").mkdir()                      # a save that died half-way
    with pytest.raises(ValueError, match=r"checkpoint-0000004 is damaged \(unet.safetensors"):
        train(cfg, resume=str(tmp_path / "checkpoint-0000004"))
    with pytest.warns(UserWarning, match=r"skipped checkpoint-0000004: unet.safetensors .*checkpoint-0000002"):
        assert train(cfg, resume="latest") is not None
    assert not (tmp_path / ".checkpoint-0000006.tmp").exists()
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["checkpoint-0000002", "checkpoint-0000004",
                                                           "checkpoint-0000006"]
    assert ckpt.damage(tmp_path / "checkpoint-0000004") is None         # written again from step 2
    assert (tmp_path / "checkpoint-0000004.damaged").is_dir()           # the damaged one, moved aside


class FullDiskFile:
    """A file whose writes fail as on a full disk (ENOSPC). Not /dev/full: in containers it may be a plain file."""

    def __init__(self, f):
        self.f = f

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def __getattr__(self, name):
        return getattr(self.f, name)


def full_disk_open(marker: str):
    """`open` for monkeypatching: files whose path contains `marker` are on a full disk."""
    real_open = open

    def opener(path, *a, **kw):
        f = real_open(path, *a, **kw)
        return FullDiskFile(f) if marker in str(path) else f
    return opener


def test_a_full_disk_is_one_line_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    from t2i.cli import main
    args = ["train", *TINY_RUN, f"train.output_dir={tmp_path}", "train.max_steps=4", "train.checkpoint_every=2"]
    assert main([*args, "--stop-at", "2"]) == 0
    monkeypatch.setattr(ckpt, "open", full_disk_open("checkpoint-0000004"), raising=False)
    capsys.readouterr()
    assert main([*args, "--resume", "latest"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("t2i train")]                # beside the bar
    assert "Traceback" not in err and len(lines) == 1, err
    assert "no space left" in lines[0] and lines[0].endswith("checkpoint-0000002: free space, then continue with "
                                                              "--resume latest"), lines
    assert [p.name for p in tmp_path.iterdir() if "checkpoint" in p.name] == ["checkpoint-0000002"]
    monkeypatch.undo()
    assert train(tiny_config(tmp_path, "train.max_steps=4", "train.checkpoint_every=2"), resume="latest")


def run_cli_train(run_dir, *args):
    """`t2i train` on the tiny config in a subprocess, stdout unbuffered, stderr to a file beside run_dir."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "t2i.cli", "train", *TINY_RUN, f"train.output_dir={run_dir}", *args]
    err = open(run_dir.parent / "stderr.txt", "w+")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True), err


def wait_for_training(proc, err):
    """Read the subprocess's stdout until its 'training ... from step' line."""
    for line in proc.stdout:
        if line.startswith("training "):
            return line
    err.seek(0)
    raise AssertionError(err.read()[-3000:])


def test_a_fresh_run_into_a_folder_with_a_run_refuses(tmp_path):
    cfg = tiny_config(tmp_path, "train.max_steps=6", "train.checkpoint_every=2")
    train(cfg, stop_at=4)
    before = sorted(p.name for p in ckpt.checkpoints(tmp_path))
    with pytest.raises(ValueError, match=r"holds a run \(checkpoint-0000004\).*--resume latest.*--overwrite"):
        train(tiny_config(tmp_path, "train.max_steps=2", "train.checkpoint_every=2"))
    assert sorted(p.name for p in ckpt.checkpoints(tmp_path)) == before == ["checkpoint-0000002", "checkpoint-0000004"]
    with pytest.raises(ValueError, match="--resume and --overwrite"):
        train(cfg, resume="latest", overwrite=True)
    assert train(tiny_config(tmp_path, "train.max_steps=2", "train.checkpoint_every=2"), overwrite=True)
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["checkpoint-0000002"]   # started over
    assert json.loads((tmp_path / "checkpoint-0000002" / "state.json").read_text())["config"]["train"]["max_steps"] == 2


def test_a_second_training_into_a_busy_folder_names_the_holder(tmp_path):
    first, err = run_cli_train(tmp_path / "run", "train.max_steps=100000", "train.checkpoint_every=100000")
    try:
        wait_for_training(first, err)
        with pytest.raises(ValueError, match=rf"in use by process {first.pid} on \S+ since .*-m t2i.cli train"):
            train(tiny_config(tmp_path / "run", "train.max_steps=2"), resume="latest")
    finally:
        first.kill()
        first.wait()


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    proc, err = run_cli_train(run, "train.max_steps=100000", "train.checkpoint_every=100000")
    wait_for_training(proc, err)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    err.seek(0)
    last = err.read().strip().splitlines()[-1]
    assert proc.returncode == 128 + signal.SIGTERM, last
    (saved,) = ckpt.checkpoints(run)
    step = json.loads((saved / "state.json").read_text())["step"]
    assert step >= 1 and saved.name in last and last.endswith("--resume latest"), last
    cfg = tiny_config(run, "train.max_steps=100000", "train.checkpoint_every=100000")
    assert train(cfg, resume="latest", stop_at=step + 1) is None
    assert ckpt.checkpoints(run)[-1].name == f"checkpoint-{step + 1:07d}"


def test_ctrl_c_saves_a_checkpoint_at_the_end_of_the_step(tmp_path, monkeypatch):
    import t2i.train as tr
    real, calls = tr.diffusion_loss, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during step 2
        return real(*args, **kwargs)
    monkeypatch.setattr(tr, "diffusion_loss", interrupted)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match="SIGINT at step 2: saved .*checkpoint-0000002"):
        train(tiny_config(tmp_path, "train.max_steps=10", "train.checkpoint_every=10"))
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["checkpoint-0000002"]
    assert signal.getsignal(signal.SIGINT) is handler                  # the handler is put back


@pytest.mark.parametrize("edit, problem", [
    ({"optimizer": {}}, "the optimizer's param_groups and scalars"),
    ({"lr_schedule": {}}, "lr_schedule's last_epoch None is not its step 2"),
    ({"files": []}, "lists no unet.safetensors"),
    ({"world_size": 2}, "lists no rng-1.safetensors"),
    ({"world_size": 0}, "world_size 0 is not a number of processes"),
    ({"samples": -5}, "samples -5 is not a count of samples"),
    ({"step": -1}, "step -1 is not checkpoint-0000002's"),
    ({"step": 10**30}, f"step {10**30} is not checkpoint-0000002's"),
    ({"step": True}, "lacks step"),
])
def test_a_state_json_is_checked_whole_not_just_its_types(tmp_path, edit, problem):
    """Every entry of state.json is checked against the others and the folder's name: a bad one makes the
    checkpoint damaged (named, skipped by --resume latest), never a KeyError or a silent resume."""
    cfg = tiny_config(tmp_path, "train.max_steps=4", "train.checkpoint_every=2", "train.report_to=none")
    train(cfg, stop_at=2)
    path = tmp_path / "checkpoint-0000002"
    assert ckpt.damage(path) is None
    state = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps({**state, **edit}))
    assert problem in ckpt.damage(path)
    with pytest.raises(ValueError, match=rf"checkpoint-0000002 is damaged \(state.json.*{problem}"):
        train(cfg, resume=str(path))
    with pytest.raises(ValueError, match=r"every checkpoint in .* is damaged \(checkpoint-0000002: state.json"):
        train(cfg, resume="latest")


def test_a_checkpoint_of_two_processes_is_not_resumed_by_one(tmp_path):
    """A whole, consistent checkpoint of world_size 2 (with both processes' RNG) resumed by one process is refused,
    naming both counts, instead of resuming with the other process's share of the data and noise lost."""
    import shutil
    cfg = tiny_config(tmp_path, "train.max_steps=4", "train.checkpoint_every=2", "train.report_to=none")
    train(cfg, stop_at=2)
    path = tmp_path / "checkpoint-0000002"
    shutil.copy(path / "rng-0.safetensors", path / "rng-1.safetensors")
    state = json.loads((path / "state.json").read_text())
    (path / "state.json").write_text(json.dumps({**state, "world_size": 2, "files": [*state["files"],
                                                                                     "rng-1.safetensors"]}))
    assert ckpt.damage(path) is None
    with pytest.raises(ValueError, match="^checkpoint-0000002 was saved by 2 processes and this run has 1: resume "
                                         "with 2"):
        train(cfg, resume="latest")


def test_cosmetics_of_damaged_runs_and_files(tmp_path, capsys):
    """Issue 25: every checkpoint damaged points at --overwrite from both sides (not 'start fresh' one way and
    'resume' the other); state.json null is 'null', not 'a NoneType'; random bytes are no safetensors file, not
    'cut short'; a double SIGTERM exits 143, not 130; overrides may follow --resume latest."""
    from t2i.cli import main
    cfg = tiny_config(tmp_path, "train.max_steps=4", "train.checkpoint_every=2", "train.report_to=none")
    train(cfg, stop_at=2)
    path = tmp_path / "checkpoint-0000002"
    (path / "unet.safetensors").write_bytes(os.urandom(4000))
    assert ckpt.damage(path) == "unet.safetensors is not a safetensors file (its header is no JSON)"
    for resume in ("latest", "latest", None):
        with pytest.raises(ValueError, match=r"every checkpoint .*is damaged .*start over with --overwrite \(deletes "
                                             r"them\), or train into another train.output_dir"):
            train(cfg, resume=resume)
    (tmp_path / "checkpoint-0000002.damaged" / "state.json").write_text("null")
    assert ckpt.damage(tmp_path / "checkpoint-0000002.damaged") == "state.json holds null, not a checkpoint's state"
    stop = ckpt.StopOnSignal()
    stop._handle(signal.SIGTERM, None)
    with pytest.raises(KeyboardInterrupt) as stopped:
        stop._handle(signal.SIGTERM, None)
    assert getattr(stopped.value, "signum", None) == signal.SIGTERM
    import t2i.train

    def second_sigterm(*a, **kw):
        raise stopped.value
    real, t2i.train.train = t2i.train.train, second_sigterm
    try:
        assert main(["train", *TINY_RUN, f"train.output_dir={tmp_path / 'other'}"]) == 128 + signal.SIGTERM
    finally:
        t2i.train.train = real
    capsys.readouterr()
    args = ["train", *TINY_RUN, "--dry-run", "--resume", "latest", "train.max_steps=7", "train.lr=2e-4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "max_steps: 7" in out and "lr: 0.0002" in out
