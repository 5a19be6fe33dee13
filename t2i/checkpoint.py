"""Training checkpoints as folders of safetensors plus JSON, written atomically: everything goes
into a temporary folder, fsynced, that is renamed into place only when complete, so an interrupted
save or a power cut leaves the previous checkpoint untouched. Nothing here unpickles anything.
TrainingState is what a run saves and resumes from; every process stages its own RNG, the main
process the rest. The run folder around them: one training at a time (a lock), a fresh run never
over an old one, and SIGINT/SIGTERM turned into a last checkpoint.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from safetensors.torch import load_file, save

from .config import RESUMABLE, resume_changes

try:
    import fcntl
except ImportError:  # Windows: no lock on the run folder
    fcntl = None

if TYPE_CHECKING:
    from .config import RunConfig
    from .ema import EMA

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
STATE_KEYS = {"step": int, "samples": int, "world_size": int, "optimizer": dict, "lr_schedule": dict, "config": dict}
CORE_FILES = ("unet.safetensors", "ema.safetensors", "optimizer.safetensors")  # in every checkpoint, listed or not
NOT_A_RUN = ("config.yaml", "tokenizer", "text_encoder", "start", "previews", "tensorboard")  # with no checkpoint nor pipeline
RUN_FILES = ("config.yaml", "pipeline", "tokenizer", "text_encoder", "start", "previews", "tensorboard")  # beside its checkpoints
ALL_DAMAGED = "start over with --overwrite (deletes them), or train into another train.output_dir"
STARTED = ".t2i-run"  # written by a fresh start: what is beside it, t2i wrote (a folder without it is the user's)
OWN_FILES = (".lock", STARTED, "position.jsonl", *NOT_A_RUN)  # what t2i writes into a run folder before a checkpoint


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
        with staging(run_dir, self.step):
            save_synced(rng, stage / f"rng-{accelerator.process_index}.safetensors")
        accelerator.wait_for_everyone()
        # 3. the main process writes the rest and renames the folder into place
        if accelerator.is_main_process:
            opt_tensors, opt_meta = optimizer_to_tensors(self.optimizer.state_dict())
            tensors = {"unet": self.unet.state_dict(), "ema": self.ema.shadow, "optimizer": opt_tensors}
            if self.text_encoder is not None:
                tensors["text_encoder"] = self.text_encoder.state_dict()
            schedule = {k: v for k, v in self.lr_schedule.state_dict().items() if k != "lr_lambdas"}
            stems = [*tensors, *(f"rng-{i}" for i in range(accelerator.num_processes))]
            files = [f"{stem}.safetensors" for stem in stems]
            state = {"step": self.step, "samples": self.samples, "world_size": accelerator.num_processes,
                     "optimizer": opt_meta, "lr_schedule": schedule, "config": config, "files": files}
            write_checkpoint(run_dir, self.step, tensors, state, keep)
        accelerator.wait_for_everyone()
        return Path(run_dir) / f"checkpoint-{self.step:07d}"

    def load(self, path: str | Path, rank: int = 0, config: RunConfig | None = None, world: int | None = None) -> None:
        """Restore everything from the checkpoint folder `path`, with process `rank`'s generators, after checking
        that `config` differs from the checkpoint's only in RESUMABLE settings and that it was saved by `world`
        processes. The learning rate follows `config`."""
        path = Path(path)
        saved_world = json.loads((path / "state.json").read_text())["world_size"]
        if world is not None and saved_world != world:
            raise ValueError(f"{path.name} was saved by {saved_world} processes and this run has {world}: resume with "
                             f"{saved_world} (each process continues its own random numbers and share of the data)")
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
    """The checkpoint folders of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and CHECKPOINT.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT.match(p.name).group(1)))


def resolve_resume(run_dir: str | Path, resume: str, main: bool = True) -> Path:
    """'latest' -> the newest undamaged checkpoint of the run: damaged newer ones are named in a warning and moved
    aside (to checkpoint-N.damaged, by the `main` process). Otherwise a checkpoint folder path, undamaged."""
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir() or not (CHECKPOINT.match(path.name) or (path / "state.json").exists()):
            raise ValueError(f"--resume {resume}: not a checkpoint folder; pass 'latest' or a checkpoint-N folder")
        problem = damage(path)
        if problem:
            raise ValueError(f"--resume {resume}: {path.name} is damaged ({problem}); resume from an earlier "
                             f"checkpoint, or with --resume latest, which takes the newest undamaged one")
        return path
    found = checkpoints(run_dir)
    if not found and any(Path(run_dir).glob("checkpoint-*.damaged")):
        raise ValueError(f"--resume latest: every checkpoint in {run_dir} is damaged (moved aside to .damaged): "
                         f"{ALL_DAMAGED}")
    if not found:
        raise ValueError(f"--resume latest: no checkpoint in {run_dir}; start a fresh run without --resume")
    skipped = []
    for path in reversed(found):
        problem = damage(path)
        if problem is None:
            break
        skipped.append(f"{path.name}: {problem}")
        if main:
            aside = path.with_name(path.name + ".damaged")
            shutil.rmtree(aside, ignore_errors=True)
            path.rename(aside)
    else:
        raise ValueError(f"--resume latest: every checkpoint in {run_dir} is damaged ({'; '.join(skipped)}): "
                         f"{ALL_DAMAGED}")
    if skipped:
        warnings.warn(f"--resume latest skipped {'; '.join(skipped)} (moved aside to .damaged); resuming from "
                      f"{path.name}", stacklevel=2)
    return path


def damage(path: str | Path) -> str | None:
    """What makes checkpoint folder `path` unusable (state.json or a file it lists missing, empty or cut
    short), or None. Reads each safetensors header, not the tensors."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        return f"state.json {'is missing' if isinstance(e, FileNotFoundError) else 'is unreadable'}"
    if not isinstance(state, dict):
        kind = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
                list: "a list"}.get(type(state), type(state).__name__)
        return f"state.json holds {kind}, not a checkpoint's state"
    lacking = [k for k, kind in STATE_KEYS.items()
               if not isinstance(state.get(k), kind) or isinstance(state.get(k), bool)]
    files = state.get("files", [])
    if lacking or not (isinstance(files, list) and all(isinstance(name, str) for name in files)):
        return f"state.json lacks {', '.join(lacking) or 'a list of file names'}"
    problem = state_problem(state, path.name)
    if problem:
        return f"state.json: {problem}"
    for name in dict.fromkeys([*CORE_FILES, *files]):
        problem = safetensors_damage(path / name)
        if problem:
            return f"{name} {problem}"
    return None


def state_problem(state: dict, name: str) -> str | None:
    """What in a well-typed state.json contradicts itself or its folder `name` (checkpoint-N), or None: the step
    is N, the LR schedule stands at it, the counts are counts, the optimizer has its groups, and the files list
    the weights and every process's RNG."""
    step, samples, world = state["step"], state["samples"], state["world_size"]
    folder = CHECKPOINT.match(name)
    if step < 1 or (folder and int(folder.group(1)) != step):
        return f"step {step} is not {name}'s"
    if samples < 0:
        return f"samples {samples} is not a count of samples"
    if world < 1:
        return f"world_size {world} is not a number of processes"
    groups, scalars = state["optimizer"].get("param_groups"), state["optimizer"].get("scalars")
    if not (isinstance(groups, list) and groups and isinstance(scalars, dict)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
        return "it lacks the optimizer's param_groups and scalars"
    last = state["lr_schedule"].get("last_epoch")
    if last != step or isinstance(last, bool):
        return f"lr_schedule's last_epoch {last!r} is not its step {step}"
    needed = [*CORE_FILES, *(f"rng-{i}.safetensors" for i in range(world))]
    unlisted = [f for f in needed if f not in state["files"]]
    if unlisted:
        return f"it lists no {unlisted[0]}"
    return None


def safetensors_damage(file: Path) -> str | None:
    """A safetensors file is 8 bytes of header length n, n bytes of JSON header, then the tensors' bytes."""
    size = file.stat().st_size if file.is_file() else None
    if not size:
        return "is missing" if size is None else "is empty"
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if size > 8 and f.read(1) != b"{":  # a header is JSON: random or other bytes, not a file cut short
            return "is not a safetensors file (its header is no JSON)"
        f.seek(8)
        if 8 + n > size:
            return f"is cut short ({size} bytes, less than its header)"
        try:
            header = json.loads(f.read(n))
            end = 8 + n + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "has a damaged header"
    return f"is cut short ({size} of {end} bytes)" if size != end else None


def weights_mismatch(folder: Path, library: str, class_name: str) -> str | None:
    """Whether the weights file of a pipeline component's `folder` holds the tensors its config.json's model
    (`library`.`class_name`) has: its first missing or unexpected key, with the file, or None. The model is built
    on the meta device (no memory, no weights); only the file's header is read."""
    import importlib

    from accelerate import init_empty_weights
    from safetensors import safe_open
    files = [folder / name for name in ("diffusion_pytorch_model.safetensors", "model.safetensors")
             if (folder / name).is_file()]
    if not files or not library or not class_name:
        return None
    try:
        cls = getattr(importlib.import_module(library), class_name)
        with init_empty_weights(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if hasattr(cls, "config_class"):  # transformers
                model = cls(cls.config_class.from_pretrained(folder))
            else:  # diffusers
                model = cls.from_config(cls.load_config(folder))
    except Exception:  # an unknown class or a broken config: the loader says what is wrong
        return None
    expected = set(model.state_dict())
    with safe_open(files[0], "pt") as f:
        held = set(f.keys())
    ignored = [*(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []),
               *(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])]
    missing = sorted(k for k in expected - held if not any(re.search(p, k) for p in ignored))
    unexpected = sorted(k for k in held - expected if not any(re.search(p, k) for p in ignored))
    more = lambda keys: f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""  # noqa: E731
    if unexpected:
        return (f"{files[0]} holds {unexpected[0]}, which the {class_name} of {folder / 'config.json'} does not "
                f"have{more(unexpected)}: it is another model's weights; copy this component's own file")
    if missing:
        return (f"{files[0]} lacks {missing[0]}, which the {class_name} of {folder / 'config.json'} needs"
                f"{more(missing)}: copy the pipeline folder again, or export it again from its run")
    return None


def staging_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f".checkpoint-{step:07d}.tmp"


class DiskFull(OSError):
    """The disk filled up while a checkpoint was written; the staging folder is gone, earlier checkpoints stay."""


@contextmanager
def staging(run_dir: str | Path, step: int) -> Iterator[Path]:
    """Writing into step's staging folder: on any failure it is removed, and a full disk becomes one line
    that names the last good checkpoint."""
    stage = staging_dir(run_dir, step)
    try:
        yield stage
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        if no_space(e):
            last = checkpoints(run_dir)
            raise DiskFull(f"no space left on the disk of {run_dir} while saving checkpoint-{step:07d}; the "
                           f"last good checkpoint is {last[-1] if last else 'none'}: free space, then continue with "
                           "--resume latest") from None
        raise


def no_space(e: BaseException) -> bool:
    """Whether `e` says the disk (or the quota) is full: an OSError, or safetensors' SafetensorError that
    carries the system's message in its text."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    return any(os.strerror(code) in str(e) for code in (errno.ENOSPC, errno.EDQUOT))


@contextmanager
def staged_folder(final: Path, then: str) -> Iterator[Path]:
    """Write the folder `final` atomically: into a temporary folder beside it, whose files are fsynced and which
    is renamed into place (replacing an older `final`) only when complete. On any failure the temporary folder
    goes and `final` stays as it was; a full disk is one line that ends with `then`, what to do next."""
    stage, old = final.with_name(f".{final.name}.tmp"), final.with_name(f".{final.name}.old")
    shutil.rmtree(stage, ignore_errors=True)
    try:
        yield stage
        for file in sorted(p for p in stage.rglob("*") if p.is_file()):
            with open(file, "rb+") as f:
                os.fsync(f.fileno())
        sync_dir(stage)
        if final.exists():
            os.replace(final, old)
        os.replace(stage, final)
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        if no_space(e):
            raise DiskFull(f"no space left on the disk of {final.parent} while writing {final.name}/; {then}") from None
        raise
    shutil.rmtree(old, ignore_errors=True)
    sync_dir(final.parent)


def write_synced(path: Path, data: bytes) -> None:
    """Write and fsync a file, so that a power cut cannot leave it looking complete but empty."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_synced(tensors: dict[str, torch.Tensor], path: Path) -> None:
    write_synced(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def sync_dir(path: Path) -> None:
    """fsync a folder: its entries (new files, a rename) survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(run_dir: str | Path, step: int, tensors: dict[str, dict[str, torch.Tensor]],
                     state: dict, keep: int) -> Path:
    """Write {file stem: tensors} and state.json into the staging folder, fsync each file and the folder,
    rename it into place and prune to the newest `keep` checkpoints, never the one just written. Other
    processes may have put files in staging first."""
    run_dir, final = Path(run_dir), Path(run_dir) / f"checkpoint-{step:07d}"
    with staging(run_dir, step) as stage:
        stage.mkdir(parents=True, exist_ok=True)
        for stem, group in tensors.items():
            save_synced(group, stage / f"{stem}.safetensors")
        write_synced(stage / "state.json", json.dumps(state, indent=1).encode())
        sync_dir(stage)
        if final.exists():
            shutil.rmtree(final)
        os.replace(stage, final)
    sync_dir(run_dir)
    others = [p for p in checkpoints(run_dir) if p != final]
    for old in others[:len(others) - keep + 1] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    path = Path(path)
    with open(path / "state.json") as f:
        state = json.load(f)
    tensors = {p.stem: load_file(str(p)) for p in path.glob("*.safetensors")}
    return tensors, state


# ----------------------------------------------------------------------------------------------
# The run folder: one training at a time, a fresh run never over an old one, signals saved.


@contextmanager
def claim_run_dir(run_dir: str | Path, main: bool, resume: str | None, overwrite: bool) -> Iterator[None]:
    """Hold the run folder for one training (on the `main` process): locked, so a second training names the
    holder; refused to a fresh run when it holds a run, unless `overwrite`, which deletes that run first;
    cleared of staging folders that a save killed half-way left behind."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite contradict each other: --resume continues the run in "
                         "train.output_dir, --overwrite deletes it to start over")
    if not main:
        yield
        return
    run_dir = Path(run_dir)
    if not resume:
        _refuse_foreign_files(run_dir)  # before the lock: a refused folder is left as it was
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock(run_dir)
    try:
        found = checkpoints(run_dir)
        old = found + sorted(run_dir.glob("checkpoint-*.damaged")) + [
            run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
        started = not [p for p in old if p.name not in NOT_A_RUN]  # no checkpoint: a start that failed (marked)
        if started and old and not resume and not overwrite:
            warnings.warn(f"train.output_dir {run_dir} holds no checkpoint, only what a start that failed left "
                          f"({', '.join(p.name for p in old)}): replacing it", stacklevel=3)
        if old and not resume and not overwrite and not started and not found and \
                not (run_dir / "pipeline").exists():
            raise ValueError(f"train.output_dir {run_dir} holds a run whose every checkpoint is damaged "
                             f"({', '.join(p.name for p in old if p.name.endswith('.damaged'))}): {ALL_DAMAGED}")
        if old and not resume and not overwrite and not started:
            what = found[-1].name if found else ", ".join(p.name for p in old)
            raise ValueError(f"train.output_dir {run_dir} holds a run ({what}): continue it with --resume latest, "
                             "start over with --overwrite (deletes its checkpoints, pipeline and logs), or choose "
                             "another train.output_dir")
        for path in old if overwrite or (started and not resume) else []:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if not resume:
            write_synced(run_dir / STARTED, b"t2i train started a run here; what it wrote may be replaced\n")
        for stage in run_dir.glob(".checkpoint-*.tmp"):
            shutil.rmtree(stage, ignore_errors=True)
        for stage in [*run_dir.glob(".pipeline.*"), *run_dir.glob(".start.*")]:  # an export killed half-way
            shutil.rmtree(stage, ignore_errors=True)
        yield
    finally:
        lock.truncate(0)
        lock.close()


def _refuse_foreign_files(run_dir: Path) -> None:
    """A folder with no run (no checkpoint nor pipeline) may hold only what a start of t2i wrote there, marked
    by STARTED; anything else (a pipeline folder, the user's own config.yaml) is refused, never replaced."""
    if not run_dir.is_dir() or checkpoints(run_dir) or (run_dir / "pipeline").exists() or any(
            run_dir.glob("checkpoint-*.damaged")):
        return
    marked = (run_dir / STARTED).is_file()
    foreign = sorted(p.name for p in run_dir.iterdir()
                     if p.name not in (".lock", STARTED) and not (marked and p.name in OWN_FILES)
                     and not p.name.startswith((".checkpoint-", ".pipeline.", ".start.")))
    if foreign:
        raise ValueError(f"train.output_dir {run_dir} holds files that t2i train did not write "
                         f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}) and no run; nothing there "
                         "is replaced: choose a new or empty train.output_dir")


def _lock(run_dir: Path):
    """An exclusive lock on `{run_dir}/.lock`, held while the returned file is open (the system drops it
    however the process ends), with the holder written into it."""
    f = open(run_dir / ".lock", "a+")
    try:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ValueError(f"train.output_dir {run_dir} is in use by {holder}; wait for it to end, or train into "
                         "another train.output_dir") from None
    command = shlex.join([Path(sys.orig_argv[0]).name, *sys.orig_argv[1:]])
    f.truncate(0)
    f.write(f"process {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')} "
            f"({command[:300]})")
    f.flush()
    return f


class Interrupted(KeyboardInterrupt):
    """Training stopped on SIGINT or SIGTERM, after saving a checkpoint of the step it was in."""

    def __init__(self, signum: int | None, step: int, checkpoint: Path):
        self.signum, self.checkpoint = signum or signal.SIGTERM, checkpoint
        name = signal.Signals(signum).name if signum else "a signal to another process"
        super().__init__(f"{name} at step {step}: saved {checkpoint}")


class StoppedAtOnce(KeyboardInterrupt):
    """A second SIGINT or SIGTERM: training stops at once; `signum` gives the exit status (128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopOnSignal:
    """SIGINT (Ctrl-C) and SIGTERM (what a cluster sends before preemption) ask the loop to save a checkpoint
    and stop at the end of the step; a second signal stops at once (a save under way is atomic). Installed
    only from the main thread; the previous handlers come back on exit."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise StoppedAtOnce(signum)
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint at the end of this step, then stopping (send "
              "it again to stop at once)", file=sys.stderr, flush=True)

    def requested(self, accelerator) -> bool:
        """Whether any process has a signal, so that all stop at the same step."""
        if accelerator.num_processes == 1:
            return self.signum is not None
        flag = torch.tensor([float(self.signum is not None)], device=accelerator.device)
        return accelerator.reduce(flag, "sum").item() > 0
