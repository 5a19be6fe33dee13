"""What the sampling commands share: options checked, the device, the CPU threads, the pipeline loaded, and the
files they write (names from prompts, never replacing a file, PNGs that carry their settings).
"""
from __future__ import annotations

import errno
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import signal
import tempfile
import unicodedata
from contextlib import contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Iterator

from .settings import DEFAULTS, SamplingLimits, SamplingSettings

BOUNDS = {"upscale": (1, 16), "size": (32, 2048)}  # the drawings' options: (least, most)
OPTIONS = {"steps": "--steps", "guidance": "--guidance", "scheduler": "--scheduler", "negative": "--negative",
           "height": "--height", "width": "--width", "num_images": "--num-images", "seed": "--seed",
           "layout": "--layout"}  # setting: option
LIMITS = SamplingLimits(max_images=1000)  # the command line may ask for whatever the model can do, in batches


def sampling_settings(args, base: SamplingSettings = DEFAULTS) -> SamplingSettings:
    """A command's sampling options as settings; the options it lacks or leaves unset come from `base`.
    --guide takes the boxes from the prompt, --layout names them; --excite names the words to make appear
    (all: every object's, from the prompt)."""
    given = {name: getattr(args, flag[2:].replace("-", "_"), None) for name, flag in OPTIONS.items()}
    from_prompt = getattr(args, "guide", False) or None
    given["layout"] = parse_layout(args.layout) if getattr(args, "layout", None) else from_prompt
    excite = getattr(args, "excite", None)
    words = [w.strip() for w in (excite or "").split(",") if w.strip()]
    if excite is not None and not words:
        raise ValueError("--excite needs words of the prompt, e.g. --excite red,circle, or all")
    given["excite"] = True if [w.lower() for w in words] == ["all"] else tuple(words) or None
    return replace(base, **{name: value for name, value in given.items() if value is not None})


def parse_layout(items: list[str], name: str = "--layout") -> tuple[tuple[str, tuple[float, ...]], ...]:
    """WORD=X0,Y0,X1,Y1 items (--layout's) as (word, box) pairs; the boxes are checked with the settings."""
    pairs = []
    for item in items:
        word, _, box = item.partition("=")
        try:
            values = tuple(float(v) for v in box.split(","))
        except ValueError:
            values = ()
        if not word.strip() or len(values) != 4:
            raise ValueError(f"{name} must be WORD=X0,Y0,X1,Y1 (fractions of the image, y down), e.g. "
                             f"circle=0,0,0.4,0.4; got {item!r}")
        pairs.append((word.strip(), values))
    return tuple(pairs)


def guide_metadata(settings: SamplingSettings) -> dict:
    """The attention-guidance settings a PNG records (none without guidance)."""
    if not (settings.layout or settings.excite):
        return {}
    return dict(layout=settings.layout if isinstance(settings.layout, bool) else dict(settings.layout),
                excite=settings.excite if isinstance(settings.excite, bool) else list(settings.excite),
                guide=asdict(settings.guide))


def check_options(args, base: SamplingSettings = DEFAULTS) -> SamplingSettings:
    """Bad options of a sampling command, one line each, before anything is loaded or sampled."""
    for name, (least, most) in BOUNDS.items():
        value, flag = getattr(args, name, None), "--" + name.replace("_", "-")
        if value is not None and value < least:
            raise ValueError(f"{flag} must be at least {least}, got {value}")
        if value is not None and value > most:
            raise ValueError(f"{flag} must be at most {most}, got {value}")
    settings = sampling_settings(args, base)
    prompts = len(args.prompt) if isinstance(getattr(args, "prompt", None), list) else 1  # generate: several
    return settings.check(LIMITS, names=OPTIONS, images=prompts * settings.num_images)


def sampling_device(name: str | None):
    """The torch device of --device (default: cuda when available), or a ValueError saying what to use."""
    import torch
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available on this machine (or torch was built "
                         "without CUDA); use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: use cpu or cuda")
    return device


def sampling_threads(cores: int, load: float) -> int:
    """Torch threads for sampling on the CPU: the cores other work leaves idle (by the 1-minute load
    average), at least one. A thread that shares a core with other work stalls every step while it
    waits its turn (bench/threads.py)."""
    return max(1, min(cores, round(cores - load)))


def use_idle_cores() -> None:
    import torch
    if "OMP_NUM_THREADS" in os.environ:  # the user's choice
        return
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on this platform
        return
    torch.set_num_threads(sampling_threads(torch.get_num_threads(), load))


def sampling_pipeline(args, progress: bool = False, base: SamplingSettings = DEFAULTS):
    """(the pipeline of --model on --device with --precision, the command's sampling settings checked
    against it; unset ones from `base`)."""
    import torch

    from .pipeline import load_pipeline
    check_options(args, base)
    device = sampling_device(args.device)
    with sigint_deferred():  # a Ctrl-C while loading stops the command right after, not inside the libraries
        pipe = load_pipeline(args.model, device)
    pipe.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(getattr(args, "precision", "fp32"))
    settings = sampling_settings(args, base).check(LIMITS, pipe, names=OPTIONS)
    if device.type == "cpu":
        use_idle_cores()
    if progress:
        pipe.set_progress_bar_config(desc="sampling", unit="step", leave=False)
    return pipe, settings


@contextmanager
def sigint_deferred() -> Iterator[None]:
    """SIGINT (Ctrl-C) held back until the block ends, then raised as KeyboardInterrupt: in torch's C++ start-up
    it would abort the process, and some libraries' imports and loaders catch every exception. Main thread only."""
    caught: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    except ValueError:  # not the main thread: signals go elsewhere
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def slug(text: str, n: int = 40) -> str:
    """A file-name stem for a prompt: its letters and digits in any script, else (emoji) a hash of it."""
    stem = re.sub(r"[\W_]+", "-", unicodedata.normalize("NFKC", text).lower()).strip("-")[:n].strip("-")
    return stem or "prompt-" + hashlib.sha1(text.encode()).hexdigest()[:8]


def new_name(folder: Path, stem: str, suffixes: tuple[str, ...]) -> Iterator[str]:
    """stem, stem-v2, stem-v3, ...: the stems for which no stem + suffix exists in folder yet."""
    for k in itertools.count(1):
        name = stem if k == 1 else f"{stem}-v{k}"
        if not any((folder / (name + s)).exists() for s in suffixes):
            yield name


def save_new_png(image, folder: Path, stem: str, **save_kw) -> Path:
    """Save as folder/stem.png, or stem-v2.png, ... never replacing a file, atomically: the PNG goes to a
    temporary file beside it, fsynced, that is linked to its name only when complete (an exclusive create), so
    a full disk or a kill leaves no empty or half-written PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **save_kw)
    tmp = folder / f".{stem}.{os.getpid()}.png.tmp"
    try:
        _write_synced(tmp, buffer.getvalue())
        for name in new_name(folder, stem, (".png", "-heatmaps")):
            try:
                os.link(tmp, folder / f"{name}.png")
                return folder / f"{name}.png"
            except FileExistsError:  # another run took the name since it was checked
                continue
    except OSError as e:
        raise OSError(f"{e.strerror or e} while writing {folder / stem}.png; nothing of it was kept") from None
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def staged_out(out: Path) -> Iterator[Path]:
    """Write the new folder `out` atomically: into a temporary folder beside it that is renamed into place when
    complete (over a missing or empty `out` only). On any failure nothing of it is left."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))  # on out's disk
    try:
        yield stage
        try:
            os.rename(stage, out)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise ValueError(f"{out} was filled by another run meanwhile; its files stay, these were not "
                                 "written") from None
            raise
    except OSError as e:
        raise OSError(f"{e.strerror or e} while writing {out}/; nothing of it was kept") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def png_metadata(**fields):
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    for k, v in fields.items():
        info.add_text(k, json.dumps(v) if not isinstance(v, str) else v)
    return info


def new_out_folder(out: str | None, kind: str, prompt: str, seed: int) -> Path:
    """--out, which must be new or empty; by default outputs/<kind>/<prompt>-<seed>[-vN]."""
    if out is None:
        default = Path("outputs") / kind
        return default / next(new_name(default, f"{slug(prompt)}-{seed}", ("",)))
    out = Path(out)
    if out.exists() and (out.is_file() or any(out.iterdir())):
        raise ValueError(f"--out {out} already holds files or is one; pass a new folder (nothing is overwritten)")
    return out
