# The word explorer behind `t2i serve`, as plain functions of plain values: check a request against the
# limits, generate images with everything the page shows (cross-attention per resolution and per step, the
# predicted clean image x0 at each step), and draw from what was kept: a word's overlay, the all-words
# grid, a step, and a word's effect when its weight changes (regenerated from the same seed).
# serve.py lays these out in a Gradio page; tests call them directly.
from __future__ import annotations

import math
import shutil
import tempfile
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
from PIL import Image

from .attention import AttentionRecorder, Heatmaps
from .attention.effects import effect_map
from .attention.overlay import effect_heat, grid_image, overlay, upscale
from .sampling import png_metadata, slug
from .pipeline import (SCHEDULERS, check_pipeline_folder, downsample_factor, load_pipeline, make_scheduler,
                       max_inference_steps, scheduler_name)

ALL = "all"                    # the resolution filter that keeps every recorded grid
MODEL_DEFAULT = "default"      # the scheduler choice that keeps the model's own
SHIPPED = "shipped model"      # the model choice of the model inside the package
DISPLAY = 256                  # px of the longer side of every image the page shows
FUNCTION_WORDS = {"a", "an", "the", "of", "in", "on", "at", "to", "and", "with", "above", "below", "left", "right",
                  "top", "bottom", "next", "is", "there"}  # never the word the page shows first


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, so that one visitor cannot stall the server."""

    max_steps: int = 50
    max_images: int = 4          # images per Generate
    max_side: int = 128          # px, height and width
    max_prompt_chars: int = 300
    concurrency: int = 1         # requests that sample at once (the others wait in the queue)
    max_queue: int = 64          # requests waiting; more are turned away with a message
    kept_results: int = 256      # result folders (downloads) kept on disk; the oldest go first
    sessions: int = 64           # pages whose last result is kept in memory; the oldest are dropped


@dataclass(frozen=True)
class Request:
    """One Generate: what the page's inputs say."""

    prompt: str
    negative: str = ""
    seed: int = 0
    steps: int = 20
    guidance: float = 3.0
    scheduler: str = MODEL_DEFAULT
    model: str | None = None     # one of the server's models; None: the first
    size: int | None = None      # square side in px; None: the model's sample size
    num_images: int = 1


@dataclass
class Result:
    """A generated set of images with everything the page draws from. Image i used seed + i."""

    request: Request
    images: list[Image.Image]
    heatmaps: dict[str, Heatmaps]            # resolution filter ('all', '8x8', ...) -> maps with a step timeline
    previews: torch.Tensor                   # (steps, images, 3, H, W) in [0, 1]: the predicted x0 at each step
    scheduler: str                           # the one used, by name
    files: dict[str, Path]                   # 'png:<i>' (with its metadata) and 'heatmaps' downloads
    seconds: float
    weights: dict[str, float] = field(default_factory=dict)   # the page's current word weights

    @property
    def words(self) -> list[str]:
        return self.heatmaps[ALL].words(0)

    @property
    def first_word(self) -> str | None:
        """The word the page shows first: the first that is not a function word ('a', 'the', 'of', ...)."""
        return next((w for w in self.words if w.split("#")[0] not in FUNCTION_WORDS), next(iter(self.words), None))

    @property
    def filters(self) -> list[str]:
        return list(self.heatmaps)


class Explorer:
    """The models, each loaded once, and what the page asks of them. Sampling is serialised by a lock:
    the recorder and the word weights install processors on the shared UNet."""

    def __init__(self, models: list[str | None] | None = None, device: str = "cpu", limits: Limits = Limits(),
                 files_dir: str | Path | None = None):
        models = models or [None]                          # None: the shipped model
        for m in models:                                   # every model is checked at start, not when picked
            if m not in (None, "default"):
                check_pipeline_folder(str(m))
        self.models = {SHIPPED if m is None else str(m): m for m in models}
        self.device, self.limits = device, limits
        self._pipes: dict[str, object] = {}
        self._lock = threading.Lock()
        self._kept: deque[Path] = deque()
        self.pipeline(self.default_model)                  # the first model loads at start
        self._own_files = files_dir is None                # and only then the downloads folder is made
        self.files_dir = Path(files_dir) if files_dir else Path(tempfile.mkdtemp(prefix="t2i-serve-"))

    def close(self) -> None:
        """Delete the downloads folder if the explorer made it."""
        if self._own_files:
            shutil.rmtree(self.files_dir, ignore_errors=True)

    @property
    def default_model(self) -> str:
        return next(iter(self.models))

    def pipeline(self, model: str):
        """The pipeline of one of the models the server was started with, loaded on first use."""
        if model not in self.models:
            raise ValueError(f"unknown model {model!r}; this server offers: {', '.join(self.models)}")
        if model not in self._pipes:
            with self._lock:
                if model not in self._pipes:
                    self._pipes[model] = load_pipeline(self.models[model], self.device)
        return self._pipes[model]

    # -- 1. checking a request -------------------------------------------------------------------
    def check(self, request: Request) -> Request:
        """The request with its defaults filled in, or a ValueError that says what to change."""
        lim, r = self.limits, request
        if not r.prompt or not r.prompt.strip():
            raise ValueError("type a prompt, e.g. 'a red circle above a blue square'")
        for name, text in (("prompt", r.prompt), ("negative prompt", r.negative or "")):
            if len(text) > lim.max_prompt_chars:
                raise ValueError(f"the {name} has {len(text)} characters; at most {lim.max_prompt_chars}")
        model = r.model or self.default_model
        pipe = self.pipeline(model)
        scheduler = pipe.scheduler if r.scheduler == MODEL_DEFAULT else _scheduler(r.scheduler, pipe)
        most = min(lim.max_steps, max_inference_steps(scheduler))
        if not _whole(r.steps) or not 1 <= r.steps <= most:
            raise ValueError(f"steps must be a whole number from 1 to {most}, got {r.steps}")
        if not _whole(r.num_images) or not 1 <= r.num_images <= lim.max_images:
            raise ValueError(f"images must be a whole number from 1 to {lim.max_images}, got {r.num_images}")
        if not _whole(r.seed) or not 0 <= r.seed < 2**63 - lim.max_images:
            raise ValueError(f"the seed must be a whole number from 0 to 2^63, got {r.seed}")
        if r.guidance is None or not math.isfinite(r.guidance) or not 1 <= r.guidance <= 30:
            raise ValueError(f"guidance must be a number from 1 (none) to 30, got {r.guidance}")
        size = pipe.unet.config.sample_size if r.size is None else r.size
        f = downsample_factor(pipe.unet)
        if not _whole(size) or not f <= size <= lim.max_side or size % f:
            raise ValueError(f"size must be a multiple of {f} from {f} to {lim.max_side} px, got {size}")
        return replace(r, prompt=r.prompt.strip(), negative=(r.negative or "").strip(), size=int(size), model=model,
                       steps=int(r.steps), num_images=int(r.num_images), seed=int(r.seed), guidance=float(r.guidance))

    # -- 2. generating ---------------------------------------------------------------------------
    def generate(self, request: Request, progress: Callable[[int, int], None] | None = None) -> Result:
        """Check the request, then sample its images recording all cross-attention with a step timeline
        and the x0 previews; write the downloads. `progress(step, steps)` runs after each step."""
        r = self.check(request)
        pipe = self.pipeline(r.model)
        t0 = time.perf_counter()
        recorder = AttentionRecorder(timeline=True)
        with self._lock, _using_scheduler(pipe, r.scheduler):
            out = pipe(r.prompt, negative_prompt=r.negative or None, num_inference_steps=r.steps,
                       guidance_scale=r.guidance, height=r.size, width=r.size, num_images_per_prompt=r.num_images,
                       generator=[torch.Generator().manual_seed(r.seed + i) for i in range(r.num_images)],
                       record_attention=recorder, previews=True,
                       callback=None if progress is None else lambda i, t, x: progress(i + 1, r.steps))
            used = scheduler_name(pipe.scheduler)
        heatmaps = {ALL: out.attention}
        if len(recorder.grids) > 1:
            heatmaps.update({f"{h}x{w}": recorder.heatmaps(resolutions=[(h, w)]) for h, w in recorder.grids})
        result = Result(r, out.images, heatmaps, out.previews, used, {}, 0.0)
        result.files = self._write_files(result)
        result.seconds = time.perf_counter() - t0
        return result

    def _write_files(self, result: Result) -> dict[str, Path]:
        """Each image as a PNG with the metadata `t2i generate` regenerates it from, and the heatmaps file,
        in a fresh folder; the oldest folders beyond limits.kept_results are deleted."""
        r = result.request
        folder = Path(tempfile.mkdtemp(prefix="result-", dir=self.files_dir))
        self._kept.append(folder)
        while len(self._kept) > self.limits.kept_results:
            shutil.rmtree(self._kept.popleft(), ignore_errors=True)
        files = {}
        for i, image in enumerate(result.images):
            meta = png_metadata(prompt=r.prompt, negative_prompt=r.negative, seed=r.seed + i, steps=r.steps,
                                guidance=r.guidance, scheduler=result.scheduler, height=image.height,
                                width=image.width, upscale=1, precision="fp32",
                                model=self.models[r.model] or "default")  # what `t2i generate --model` accepts
            files[f"png:{i}"] = folder / f"{slug(r.prompt)}-{r.seed + i}.png"
            image.save(files[f"png:{i}"], pnginfo=meta)
        files["heatmaps"] = folder / f"{slug(r.prompt)}-{r.seed}-heatmaps.safetensors"
        result.heatmaps[ALL].save(files["heatmaps"])
        return files

    def _write_reweighted(self, result: Result, image: Image.Image, i: int, weights: dict[str, float]) -> None:
        """The reweighted image as a download beside the result's, its word weights in its metadata."""
        r, said = result.request, "-".join(f"{w}x{v:g}" for w, v in weights.items())
        path = result.files["heatmaps"].parent / f"{slug(r.prompt)}-{r.seed + i}-{slug(said)}.png"
        path.parent.mkdir(parents=True, exist_ok=True)       # kept_results may have pruned the folder
        image.save(path, pnginfo=png_metadata(prompt=r.prompt, negative_prompt=r.negative, seed=r.seed + i,
                                              steps=r.steps, guidance=r.guidance, scheduler=result.scheduler,
                                              model=self.models[r.model] or "default", word_weights=weights))
        result.files[f"reweighted:{i}"] = path

    # -- 3. drawing from a result ----------------------------------------------------------------
    def image(self, result: Result, index: int = 0) -> Image.Image:
        return upscale(result.images[_index(result, index)], DISPLAY)

    def word_overlay(self, result: Result, word: str, index: int = 0, resolution: str = ALL) -> Image.Image:
        """Where `word` looked in image `index`: its normalised map on the image."""
        i = _index(result, index)
        maps = _heatmaps(result, resolution).word_maps(i, [word])
        return overlay(result.images[i], next(iter(maps.values())), size=DISPLAY)

    def grid(self, result: Result, index: int = 0, resolution: str = ALL) -> Image.Image:
        """The image and every word's overlay, labelled."""
        i = _index(result, index)
        return grid_image(result.images[i], _heatmaps(result, resolution), i, size=128, columns=4, title=False)

    def step_view(self, result: Result, step: int, word: str | None = None, index: int = 0,
                  resolution: str = ALL) -> tuple[Image.Image, Image.Image | None]:
        """The predicted clean image x0 after `step` (0-based), and `word`'s map at that step on it."""
        i, steps = _index(result, index), result.previews.shape[0]
        if not _whole(step) or not 0 <= step < steps:
            raise ValueError(f"step must be from 0 to {steps - 1}, got {step}")
        x0 = Image.fromarray((result.previews[int(step), i].permute(1, 2, 0) * 255).round().byte().numpy())
        if not word:
            return upscale(x0, DISPLAY), None
        heat = _heatmaps(result, resolution).word_timeline(i, word)[int(step)]   # shared scale over the steps
        return upscale(x0, DISPLAY), overlay(x0, heat, size=DISPLAY)

    def above_native(self, result: Result) -> str:
        """A hint when the image is larger than the model's training size, said for the page; '' when not."""
        native = self.pipeline(result.request.model).unet.config.sample_size
        if result.request.size <= native:
            return ""
        return (f"the model was trained at {native} px; at {result.request.size} px it tends to repeat or stretch "
                "what it learned")

    def cut_off(self, result: Result) -> str:
        """What the text encoder's token limit cut from the prompt, said for the page; '' when nothing."""
        tokenizer = self.pipeline(result.request.model).tokenizer
        ids, most = tokenizer(result.request.prompt, verbose=False)["input_ids"], tokenizer.model_max_length
        if len(ids) <= most:
            return ""
        return (f"the prompt is {len(ids)} tokens and the model reads {most} (with start and end): it saw only "
                f"'{tokenizer.decode(ids[1:most - 1]).rstrip(chr(0xfffd))}'")

    def reweight(self, result: Result, word: str, weight: float, index: int = 0
                 ) -> tuple[Image.Image, Image.Image, dict[str, float]]:
        """Set `word`'s weight (0 to 3; the other words keep theirs) and regenerate image `index` from its
        seed: the reweighted image, its effect map drawn on the image, and the weights used."""
        if weight is None or not math.isfinite(weight) or not 0 <= weight <= 3:
            raise ValueError(f"a word's weight must be from 0 to 3, got {weight}")
        i = _index(result, index)
        if word not in result.words:
            raise ValueError(f"{word!r} is not a word of the prompt; its words are: {', '.join(result.words)}")
        weights = {w: v for w, v in {**result.weights, word: float(weight)}.items() if v != 1.0}
        result.weights = weights
        if not weights:                                   # all at 1: the image itself, no change
            changed = result.images[i]
        else:
            r, pipe = result.request, self.pipeline(result.request.model)
            with self._lock, _using_scheduler(pipe, r.scheduler):
                changed = pipe(r.prompt, negative_prompt=r.negative or None, num_inference_steps=r.steps,
                               guidance_scale=r.guidance, height=r.size, width=r.size, word_weights=weights,
                               generator=[torch.Generator().manual_seed(r.seed + i)],
                               record_attention=True).images[0]   # recorded as the original was: same arithmetic
            self._write_reweighted(result, changed, i, weights)
        effect = effect_map(result.images[i], changed)
        return upscale(changed, DISPLAY), overlay(result.images[i], effect_heat(effect), size=DISPLAY), weights


def _whole(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and float(x) == int(x)


def _index(result: Result, index: int) -> int:
    if not _whole(index) or not 0 <= index < len(result.images):
        raise ValueError(f"image {index} is not one of the {len(result.images)} generated")
    return int(index)


def _heatmaps(result: Result, resolution: str) -> Heatmaps:
    if resolution not in result.heatmaps:
        raise ValueError(f"unknown resolution {resolution!r}; choose one of {', '.join(result.heatmaps)}")
    return result.heatmaps[resolution]


def _scheduler(name: str, pipe):
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {MODEL_DEFAULT}, {', '.join(SCHEDULERS)}")
    return make_scheduler(name, pipe.scheduler.config)


@contextmanager
def _using_scheduler(pipe, name: str) -> Iterator[None]:
    """Within the block, `pipe` samples with the named scheduler (MODEL_DEFAULT: its own); restored after."""
    original = pipe.scheduler
    if name != MODEL_DEFAULT:
        pipe.scheduler = _scheduler(name, pipe)
    try:
        yield
    finally:
        pipe.scheduler = original
