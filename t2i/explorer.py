"""The word explorer behind `t2i serve`, as plain functions of plain values: check a request against the
limits, generate images with everything the page shows (cross-attention per resolution and per step, the
predicted clean image x0 at each step), and draw from what was kept: a word's overlay, the all-words
grid, a step, and a word's effect when its weight changes (regenerated from the same seed).
serve.py lays these out in a Gradio page; tests call them directly.
"""
from __future__ import annotations

import re
import shutil
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from .attention import AttentionRecorder, Heatmaps
from .attention.effects import effect_map
from .attention.overlay import EFFECT_FLOOR, effect_heat, grid_image, overlay, upscale
from .pipeline import check_pipeline_folder, load_pipeline, scheduler_name
from .stable_diffusion import local_folder
from .sampling import guide_metadata, parse_layout, png_metadata, slug
from .settings import (QUICK, SERVER_LIMITS, SamplingLimits, SamplingSettings, check_word_weight,
                       generators, is_whole)

ALL = "all"                    # the resolution filter that keeps every recorded grid
MODEL_DEFAULT = "default"      # the scheduler choice that keeps the model's own
SHIPPED = "shipped model"      # the model choice of the model inside the package
DISPLAY = 256                  # px of the longer side of every image the page shows
FUNCTION_WORDS = {"a", "an", "the", "of", "in", "on", "at", "to", "and", "with", "above", "below", "left", "right",
                  "top", "bottom", "next", "is", "there"}  # never the word the page shows first
REQUEST_NAMES = {"num_images": "images", "height": "size", "width": "size", "seed": "the seed"}  # in messages


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, so that one visitor cannot stall the server."""

    max_steps: int = SERVER_LIMITS.max_steps
    max_images: int = SERVER_LIMITS.max_images   # images per Generate
    max_side: int | None = None  # px, height and width; None: per model, the larger of 128 and 1.5x its native size
    max_prompt_chars: int = 300
    concurrency: int = 1         # requests that sample at once (the others wait in the queue)
    max_queue: int = 64          # requests waiting; more are turned away with a message
    kept_results: int = 256      # result folders (downloads) kept on disk; the oldest go first
    sessions: int = 64           # pages whose last result is kept in memory; the oldest are dropped

    @property
    def sampling(self) -> SamplingLimits:
        """The bounds of one request's sampling settings (guidance and word weights: the server's)."""
        return replace(SERVER_LIMITS, max_steps=self.max_steps, max_images=self.max_images, max_side=self.max_side)


@dataclass(frozen=True)
class Request:
    """One Generate: what the page's inputs say."""

    prompt: str
    negative: str = ""
    seed: int | str = QUICK.seed  # the page sends text: digits are read as the exact whole number they are
    steps: int = QUICK.steps
    guidance: float = QUICK.guidance
    scheduler: str = MODEL_DEFAULT
    model: str | None = None     # one of the server's models; None: the first
    size: int | None = None      # square side in px; None: the model's sample size
    num_images: int = QUICK.num_images
    place: bool = False          # attention guidance: objects where the prompt's positions and relations say
    excite: bool = False         # attention guidance: every object of the prompt made to appear
    boxes: str = ""              # attention guidance: "word=x0,y0,x1,y1; ..." (fractions, y down), before `place`

    @property
    def sampling(self) -> SamplingSettings:
        """The request's sampling settings (a square image; image i from seed + i)."""
        items = [item for item in re.split(r"[;\n]+", self.boxes or "") if item.strip()]
        return SamplingSettings(steps=self.steps, guidance=self.guidance, negative=self.negative or None,
                                scheduler=None if self.scheduler == MODEL_DEFAULT else self.scheduler,
                                height=self.size, width=self.size, num_images=self.num_images, seed=self.seed,
                                layout=parse_layout(items, "boxes") if items else bool(self.place),
                                excite=bool(self.excite))


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
    effect_scale: str = ""                   # what the last effect map's brightest means, with its size

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
                check_pipeline_folder(local_folder(str(m)))
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

    def sampling_limits(self, pipe) -> SamplingLimits:
        """The limits of a request to `pipe`: the server's, with the side bound by --max-side or, unset, by the
        larger of 128 px and 1.5x the model's native size (a multiple of its size step)."""
        most = self.limits.max_side
        if most is None:
            f = pipe.size_multiple
            most = max(SERVER_LIMITS.max_side, pipe.native_size * 3 // 2 // f * f)
        return replace(self.limits.sampling, max_side=most)

    # -- 1. checking a request -------------------------------------------------------------------
    def check(self, request: Request) -> Request:
        """The request with its defaults filled in, or a ValueError that says what to change."""
        lim, r = self.limits, request
        if not r.prompt or not r.prompt.strip():
            raise ValueError("type a prompt, e.g. 'a red circle above a blue square'")
        for name, text in (("prompt", r.prompt), ("negative prompt", r.negative or "")):
            if len(text) > lim.max_prompt_chars:
                raise ValueError(f"the {name} has {len(text)} characters; at most {lim.max_prompt_chars}")
        if isinstance(r.seed, str):  # digits: the exact number, any size; anything else is refused by the check
            text = r.seed.strip()
            r = replace(r, seed=int(text) if re.fullmatch(r"[+-]?\d+", text) else _number_or_text(text))
        model = r.model or self.default_model
        pipe = self.pipeline(model)
        size = pipe.native_size if r.size is None else r.size
        s = replace(r, size=size).sampling.check(self.sampling_limits(pipe), pipe, names=REQUEST_NAMES)
        if s.layout or s.excite:  # the words against the prompt, before sampling
            from .attention.guidance import resolve_targets
            kwargs = s.pipeline_kwargs()
            resolve_targets(pipe.prompt_tokens(r.prompt.strip()), kwargs["layout"], kwargs["excite"])
        return replace(r, prompt=r.prompt.strip(), negative=(r.negative or "").strip(), size=s.height, model=model,
                       steps=s.steps, num_images=s.num_images, seed=s.seed, guidance=s.guidance)

    # -- 2. generating ---------------------------------------------------------------------------
    def generate(self, request: Request, progress: Callable[[int, int], None] | None = None) -> Result:
        """Check the request, then sample its images recording all cross-attention with a step timeline
        and the x0 previews; write the downloads. `progress(step, steps)` runs after each step, over all images.
        Each image is sampled alone, as `t2i generate` samples it: a batch's float sums differ from one image's
        by 1/255, and its PNG's metadata must regenerate it bit for bit."""
        r = self.check(request)
        pipe = self.pipeline(r.model)
        t0 = time.perf_counter()
        one, n = replace(r.sampling, num_images=1), r.num_images
        recorders = [AttentionRecorder(timeline=True) for _ in range(n)]
        outs = []
        with self._lock:
            for i, (seed, recorder) in enumerate(zip(r.sampling.seeds(n), recorders)):
                done = i * r.steps
                outs.append(pipe(r.prompt, **one.pipeline_kwargs(), generator=generators([seed]),
                                 record_attention=recorder, previews=True, callback=None if progress is None else
                                 lambda step, t, x, done=done: progress(done + step + 1, n * r.steps)))
        used = one.scheduler or scheduler_name(pipe.scheduler, pipe.image_space)
        heatmaps = {ALL: Heatmaps.concat([out.attention for out in outs])}
        grids = recorders[0].grids
        if len(grids) > 1:
            heatmaps.update({f"{h}x{w}": Heatmaps.concat([rec.heatmaps(resolutions=[(h, w)]) for rec in recorders])
                             for h, w in grids})
        result = Result(r, [out.images[0] for out in outs], heatmaps, torch.cat([out.previews for out in outs], 1),
                        used, {}, 0.0)
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
                                model=self.models[r.model] or "default",  # what `t2i generate --model` accepts
                                **guide_metadata(r.sampling))
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
                                              height=image.height, width=image.width, upscale=1, precision="fp32",
                                              model=self.models[r.model] or "default", word_weights=weights,
                                              **guide_metadata(r.sampling)))
        result.files[f"reweighted:{i}:{slug(said)}"] = path  # every reweighting stays among the downloads,
        result.files[f"reweighted:{i}"] = path                # and this key names the latest

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
        if not is_whole(step) or not 0 <= step < steps:
            raise ValueError(f"step must be from 0 to {steps - 1}, got {step}")
        x0 = Image.fromarray((result.previews[int(step), i].permute(1, 2, 0) * 255).round().byte().numpy())
        if not word:
            return upscale(x0, DISPLAY), None
        heat = _heatmaps(result, resolution).word_timeline(i, word)[int(step)]   # shared scale over the steps
        return upscale(x0, DISPLAY), overlay(x0, heat, size=DISPLAY)

    def above_native(self, result: Result) -> str:
        """A hint when the image is larger than the model's training size, said for the page; '' when not."""
        native = self.pipeline(result.request.model).native_size
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
        weight = check_word_weight(word, weight, self.limits.sampling, name="a word's weight")
        i = _index(result, index)
        if word not in result.words:
            raise ValueError(f"{word!r} is not a word of the prompt; its words are: {', '.join(result.words)}")
        weights = {w: v for w, v in {**result.weights, word: weight}.items() if v != 1.0}
        result.weights = weights
        if not weights:                                   # all at 1: the image itself, no change
            changed = result.images[i]
        else:
            one = replace(result.request.sampling, num_images=1)
            pipe = self.pipeline(result.request.model)
            with self._lock:
                changed = pipe(result.request.prompt, **one.pipeline_kwargs(), word_weights=weights,
                               generator=generators(one.seeds(1, first=i)),
                               record_attention=True).images[0]   # recorded as the original was: same arithmetic
            self._write_reweighted(result, changed, i, weights)
        effect = effect_map(result.images[i], changed)
        peak, mean = float(effect.max()), float(effect.mean())
        result.effect_scale = (f"brightest = a change of {max(peak, EFFECT_FLOOR):.0%} of full; largest {peak:.0%}, "
                               f"mean {mean:.1%}")
        return upscale(changed, DISPLAY), overlay(result.images[i], effect_heat(effect), size=DISPLAY), weights


def _number_or_text(text: str):
    """'1.5' -> 1.5 (refused as not whole, in the seed's words); 'abc' -> 'abc' (refused as it was typed)."""
    try:
        return float(text)
    except ValueError:
        return text


def _index(result: Result, index: int) -> int:
    if not is_whole(index) or not 0 <= index < len(result.images):
        raise ValueError(f"image {index} is not one of the {len(result.images)} generated")
    return int(index)


def _heatmaps(result: Result, resolution: str) -> Heatmaps:
    if resolution not in result.heatmaps:
        raise ValueError(f"unknown resolution {resolution!r}; choose one of {', '.join(result.heatmaps)}")
    return result.heatmaps[resolution]
