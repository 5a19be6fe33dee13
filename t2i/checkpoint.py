# Training checkpoints as folders of safetensors plus JSON, written atomically: everything goes
# into a temporary folder that is renamed into place only when complete, so an interrupted save
# leaves the previous checkpoint untouched. Nothing here unpickles anything.
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def optimizer_to_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state_dict into flat tensors and JSON metadata."""
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints in a run folder, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and CHECKPOINT.match(p.name) and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(CHECKPOINT.match(p.name).group(1)))


def resolve_resume(run_dir: str | Path, resume: str) -> Path:
    """'latest' -> the newest complete checkpoint of the run; otherwise a checkpoint folder path."""
    if resume == "latest":
        found = checkpoints(run_dir)
        if not found:
            raise ValueError(f"--resume latest: no checkpoint in {run_dir}; train without --resume to start fresh")
        return found[-1]
    path = Path(resume)
    if not (path / "state.json").exists():
        raise ValueError(f"--resume {resume}: not a checkpoint folder (no state.json); pass 'latest' or a "
                         f"checkpoint-N folder")
    return path


def staging_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f".checkpoint-{step:07d}.tmp"


def write_checkpoint(run_dir: str | Path, step: int, tensors: dict[str, dict[str, torch.Tensor]],
                     state: dict, keep: int) -> Path:
    """Write {file stem: tensors} and state.json into the staging folder, then rename it into place
    and prune to the newest `keep` checkpoints. Other processes may have put files in staging first."""
    stage = staging_dir(run_dir, step)
    stage.mkdir(parents=True, exist_ok=True)
    for stem, group in tensors.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in group.items()}, str(stage / f"{stem}.safetensors"))
    with open(stage / "state.json", "w") as f:
        json.dump(state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    final = Path(run_dir) / f"checkpoint-{step:07d}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(stage, final)
    for old in checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    path = Path(path)
    with open(path / "state.json") as f:
        state = json.load(f)
    tensors = {p.stem: load_file(str(p)) for p in path.glob("*.safetensors")}
    return tensors, state
