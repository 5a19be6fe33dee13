# Training checkpoints as folders of safetensors plus JSON, written atomically: everything goes
# into a temporary folder that is renamed into place only when complete, so an interrupted save
# leaves the previous checkpoint untouched. Nothing here unpickles anything. TrainingState is what
# a run saves and resumes from; every process stages its own RNG, the main process the rest.
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from .config import RESUMABLE, resume_changes

if TYPE_CHECKING:
    from .config import RunConfig
    from .train import EMA

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainingState:
    """Everything a resumed run needs, held by reference: `save` writes the live objects and `load`
    restores them in place. Modules are the unwrapped ones; `text_encoder` only when it is trained."""

    unet: torch.nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LRScheduler
    generators: dict[str, torch.Generator] = field(default_factory=dict)  # by name; one set per process
    text_encoder: torch.nn.Module | None = None
    step: int = 0
    samples: int = 0                                                      # global samples seen: the data position

    def save(self, accelerator, run_dir: str | Path, config: dict, keep: int) -> Path:
        """Checkpoint `{run_dir}/checkpoint-{step}`, called on every process: each stages its RNG, then
        the main process writes the rest and renames the folder into place."""
        # 1. refuse to save when the processes have drifted apart
        weights = torch.stack([p.detach().double().sum() for p in self.unet.parameters()]).sum()
        spread = accelerator.gather(weights[None].float()).float()
        if (spread - spread[0]).abs().max() > 1e-3 * spread[0].abs().clamp(min=1):
            raise RuntimeError(f"processes hold different weights at step {self.step} ({spread.tolist()}): not saving")
        # 2. every process stages its RNG
        stage = staging_dir(run_dir, self.step)
        if accelerator.is_main_process:
            stage.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        rng = {"torch": torch.get_rng_state(), **{name: g.get_state() for name, g in self.generators.items()}}
        save_file(rng, str(stage / f"rng-{accelerator.process_index}.safetensors"))
        accelerator.wait_for_everyone()
        # 3. the main process writes the rest and renames the folder into place
        if accelerator.is_main_process:
            opt_tensors, opt_meta = optimizer_to_tensors(self.optimizer.state_dict())
            tensors = {"unet": self.unet.state_dict(), "ema": self.ema.shadow, "optimizer": opt_tensors}
            if self.text_encoder is not None:
                tensors["text_encoder"] = self.text_encoder.state_dict()
            schedule = {k: v for k, v in self.lr_schedule.state_dict().items() if k != "lr_lambdas"}
            state = {"step": self.step, "samples": self.samples, "world_size": accelerator.num_processes,
                     "optimizer": opt_meta, "lr_schedule": schedule, "config": config}
            write_checkpoint(run_dir, self.step, tensors, state, keep)
        accelerator.wait_for_everyone()
        return Path(run_dir) / f"checkpoint-{self.step:07d}"

    def load(self, path: str | Path, rank: int = 0, config: RunConfig | None = None) -> None:
        """Restore everything from the checkpoint folder `path`, with process `rank`'s generators, after checking
        that `config` differs from the checkpoint's only in RESUMABLE settings. The learning rate follows `config`."""
        path = Path(path)
        if config is not None:
            saved = json.loads((path / "state.json").read_text())["config"]
            changes = resume_changes(saved, config)
            if changes:
                raise ValueError(
                    f"this config differs from {path.name}'s in what defines the model or its objective: "
                    f"{'; '.join(changes)}. Resume with the run's own config ({path.parent / 'config.yaml'}) or start "
                    f"a new run; only these may change on resume: {', '.join(RESUMABLE)}")
        tensors, state = read_checkpoint(path)
        try:
            self.unet.load_state_dict(tensors["unet"])
            if self.text_encoder is not None:
                self.text_encoder.load_state_dict(tensors["text_encoder"])
        except (RuntimeError, KeyError) as e:
            raise ValueError(f"checkpoint {path} does not match the model in this config ({str(e).splitlines()[0]}); "
                             f"resume with the run's own config ({path}/../config.yaml)") from None
        self.ema.shadow = {k: v.float() for k, v in tensors["ema"].items()}
        self.optimizer.load_state_dict(optimizer_from_tensors(tensors["optimizer"], state["optimizer"]))
        schedule = {k: v for k, v in state["lr_schedule"].items() if k != "base_lrs"}  # base_lrs: this train.lr
        self.lr_schedule.load_state_dict({**schedule, "lr_lambdas": [None]})
        for group, base, f in zip(self.optimizer.param_groups, self.lr_schedule.base_lrs, self.lr_schedule.lr_lambdas):
            group["lr"] = base * f(self.lr_schedule.last_epoch)                     # and this max_steps' schedule
        rng = tensors.get(f"rng-{rank}")
        if rng is None:
            raise ValueError(f"checkpoint {path} has no RNG state for process {rank}: resume with the same number of "
                             f"processes ({state['world_size']})")
        torch.set_rng_state(rng["torch"])
        for name, g in self.generators.items():
            g.set_state(rng[name].to(g.get_state().device))
        self.step, self.samples = state["step"], state["samples"]


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
