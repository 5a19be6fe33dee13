"""How one sampling run is set: the defaults, the limits and the one check of every front-end.

`SamplingSettings` holds what a run asks for (steps, guidance, scheduler, negative prompt, size, images,
seed); `SamplingLimits` what a front-end lets it ask for (the CLI: what the model can do; the server:
less, so that one visitor cannot stall it). `check` is the one place their rules are written, and
`generators` the one place a seed becomes noise. The pipeline, the CLI, the explorer, the server and
`t2i evaluate` read their defaults from here. Nothing here imports torch at import time: the CLI builds
its options from this module before torch loads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Iterable

# short name -> the diffusers scheduler class (its name, as diffusers' own configs name it) and its options
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    # pixel space: thresholding at sample_max_value=1 clips the x0 estimate to [-1, 1]
    "dpm": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "thresholding": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),   # Stable Diffusion 1.x's own (PLMS)
}
# the fewest steps that give an image, not a flat grey (euler, heun at 1) or noise (ddpm at 1, ddim at 1-2, heun
# at 2-3); measured on the shipped model (docs/results.md, reliability round 3). Schedulers not named here: 1.
MIN_STEPS = {"DDPMScheduler": 2, "DDIMScheduler": 3, "EulerDiscreteScheduler": 2,
             "EulerAncestralDiscreteScheduler": 2, "HeunDiscreteScheduler": 4}
SEEDS = 2**64  # a torch generator's seed is from 0 to 2**64 - 1
MAX_GUIDANCE = 100.0  # |guidance scale|: far past any use (3 to 15), short of overflowing to NaN (1e308 did)
MAX_SIZE_FACTOR = 8  # height and width: at most 8x the model's sample size (pixel space: memory grows with the area)


@dataclass(frozen=True)
class SamplingLimits:
    """What one sampling run may ask for. None: no bound beyond the model's own (its scheduler's
    step limit; MAX_SIZE_FACTOR x its sample size)."""

    max_steps: int | None = None
    max_images: int | None = None                               # images per prompt
    max_side: int | None = None                                 # px, height and width
    guidance: tuple[float, float] = (-MAX_GUIDANCE, MAX_GUIDANCE)  # 1: no guidance
    word_weight: tuple[float, float] = (0.0, math.inf)          # 0 silences a word


SERVER_LIMITS = SamplingLimits(max_steps=50, max_images=4, max_side=128, guidance=(1.0, 30.0), word_weight=(0.0, 3.0))


GUIDES = ("layout", "excite", "both")  # what attention guidance from a prompt's own words steers (t2i evaluate --guide)
Box = tuple[float, float, float, float]  # (x0, y0, x1, y1): fractions of the image's width and height, y down


@dataclass(frozen=True)
class GuideSettings:
    """How strongly attention guidance (t2i.attention.guidance) steers: the share of the first sampling steps
    it acts on, gradient steps on the latents per sampling step, each step's size (RMS, in latent units),
    and the smoothed peak attention above which a word counts as present (presence guidance stops there).
    The defaults come from `bench/guidance.py`'s sweep (docs/results.md)."""

    fraction: float = 0.3
    iterations: int = 3
    step_size: float = 0.1
    threshold: float = 0.6

    def check(self) -> GuideSettings:
        if not (_number(self.fraction) and 0 <= self.fraction <= 1):
            raise ValueError(f"the guided fraction of steps must be from 0 to 1, got {self.fraction!r}")
        if not (_number(self.step_size) and self.step_size >= 0):
            raise ValueError(f"the guidance step size must be a finite number >= 0, got {self.step_size!r}")
        if not (_number(self.threshold) and 0 < self.threshold <= 1):
            raise ValueError(f"the presence threshold must be in (0, 1], got {self.threshold!r}")
        return replace(self, iterations=_whole("the guidance iterations", self.iterations, 0, 100))


def check_box(word: str, box) -> Box:
    """`box` as four floats with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1, or a ValueError naming the word."""
    values = tuple(box) if isinstance(box, (tuple, list)) else ()
    if len(values) != 4 or not all(_number(v) for v in values):
        raise ValueError(f"the box of {word!r} must be four finite numbers x0, y0, x1, y1, fractions of the image "
                         f"(y down), e.g. 0,0,0.4,0.4 for the top left; got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in values)
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError(f"the box of {word!r} must have 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (fractions of the "
                         f"image, y down), got {box!r}")
    return x0, y0, x1, y1


def one_box_each(pairs, name: str = "layout") -> list:
    """(word, box) pairs as a list, or a ValueError when a word has two boxes (the last would win in silence)."""
    pairs, seen = list(pairs), set()
    for pair in pairs:
        word = pair[0] if isinstance(pair, (tuple, list)) and pair else pair
        if word in seen:
            raise ValueError(f"{name} gives {word!r} two boxes; give each word one (the second {word} of a prompt "
                             f"is {word}#2)")
        seen.add(word)
    return pairs


@dataclass(frozen=True)
class SamplingSettings:
    """One sampling run's settings. Image i of a run is drawn from seed + i (the seed policy of every
    front-end but `t2i evaluate`, which draws one seed per image from its own, see t2i.evaluate)."""

    steps: int = 30
    guidance: float = 3.0                # classifier-free guidance scale; 1: none
    scheduler: str | None = None         # a SCHEDULERS name; None: the model's own
    negative: str | None = None          # negative prompt; None or "": none
    height: int | None = None            # px; None: the model's sample size
    width: int | None = None
    num_images: int = 1                  # per prompt
    seed: int = 0
    layout: tuple[tuple[str, Box], ...] | bool = ()  # (word, box): attention guidance puts the word in the box;
    excite: tuple[str, ...] | bool = ()             # the words it makes appear. True: from the prompt's own words
    guide: GuideSettings = GuideSettings()

    def check(self, limits: SamplingLimits = SamplingLimits(), pipe=None,
              names: dict[str, str] | None = None, images: int | None = None) -> SamplingSettings:
        """These settings with whole numbers made ints, or a ValueError naming the setting as the front-end
        calls it (`names`, e.g. {"steps": "--steps"}) and what to pass. Without `pipe`, only what needs no
        model; with it, also its scheduler's step limit and its UNet's size rules. `images`: how many images
        the run draws from seed, seed + 1, ... (default: num_images), each a torch generator's seed."""
        name = {f.name: f.name for f in fields(self)} | (names or {})
        # 1. the counts: steps (within the limit and the model's scheduler), images, seed
        most_steps, sampler = limits.max_steps, self.scheduler
        if pipe is not None:
            model_most = max_inference_steps(pipe.scheduler)
            most_steps = model_most if most_steps is None else min(most_steps, model_most)
            sampler = sampler or pipe.scheduler
        least = 1 if sampler is None else min_inference_steps(sampler)
        too_few = least > 1 and is_whole(self.steps) and self.steps < least
        steps = _whole(name["steps"], self.steps, least, most_steps,
                       f" for the {_short_name(sampler)} scheduler (fewer give a flat grey or noisy image)" if too_few
                       else "")
        num_images = _whole(name["num_images"], self.num_images, 1, limits.max_images)
        images = num_images if images is None else images
        seed = _whole(name["seed"], self.seed, 0, SEEDS - images,
                      f" for {images} images (image i uses seed + i)" if images > 1 else "")
        # 2. guidance and the scheduler's name
        low, high = limits.guidance
        if not _number(self.guidance) or not low <= self.guidance <= high:
            span = (f"a number from {low:g} (none) to {high:g}" if low == 1
                    else f"a finite number from {low:g} to {high:g} (1: none; beyond, the images overflow to NaN)")
            raise ValueError(f"{name['guidance']} must be {span}, got {self.guidance}")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        # 3. the image's sides (None: the model's sample size)
        sides = {side: None if getattr(self, side) is None else _side(name[side], getattr(self, side), limits, pipe)
                 for side in ("height", "width")}
        # 4. attention guidance: the boxes and the strengths (the words are checked against the prompt)
        pairs = self.layout.items() if isinstance(self.layout, dict) else self.layout  # {word: box} or pairs
        layout = self.layout if isinstance(self.layout, bool) else tuple(
            (word, check_box(word, box)) for word, box in one_box_each(pairs, name["layout"]))
        excite = self.excite
        if isinstance(excite, str):  # "red, circle": the words, not the letters
            excite = tuple(w.strip() for w in excite.split(",") if w.strip())
        return replace(self, steps=steps, num_images=num_images, seed=seed, guidance=float(self.guidance), **sides,
                       layout=layout, excite=excite, guide=self.guide.check())

    def seeds(self, count: int, first: int = 0) -> list[int]:
        """The seeds of images first .. first + count - 1: image i's is seed + i."""
        return [self.seed + i for i in range(first, first + count)]

    def pipeline_kwargs(self) -> dict:
        """These settings as T2IPipeline's arguments (all but the seeds: pass `generator=generators(...)`)."""
        return dict(negative_prompt=self.negative or None, num_inference_steps=self.steps,
                    guidance_scale=self.guidance, scheduler=self.scheduler, height=self.height, width=self.width,
                    num_images_per_prompt=self.num_images, layout=_words(self.layout, dict),
                    excite=_words(self.excite, list), guide=self.guide)


DEFAULTS = SamplingSettings()                 # the pipeline's own call, `t2i generate`, `heatmap` and `effect`
QUICK = replace(DEFAULTS, steps=20)           # the explorer and `t2i evaluate`: many images at interactive speed


def generators(seeds: Iterable[int]) -> list:
    """One CPU torch.Generator per image, seeded in turn: the pipeline draws each image's noise from its own,
    so an image depends on its seed alone, not on its batch or device."""
    import torch
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def check_word_weight(word: str, weight, limits: SamplingLimits = SamplingLimits(), name: str | None = None) -> float:
    """A word's attention weight as a float, or a ValueError saying the bounds."""
    low, high = limits.word_weight
    if not _number(weight) or not low <= weight <= high:
        span = f">= {low:g}" if math.isinf(high) else f"from {low:g} to {high:g}"
        raise ValueError(f"{name or f'the weight of {word!r}'} must be a finite number {span} (0 silences the word), "
                         f"got {weight!r}")
    return float(weight)


def max_inference_steps(scheduler) -> int:
    """The most sampling steps `scheduler` runs soundly: fewer than its training timesteps (at that
    many, DPM-Solver++ and UniPC repeat a timestep and return NaN; beyond, DDPM and DDIM refuse and
    DPM-Solver++ fails with an IndexError)."""
    return scheduler.config.num_train_timesteps - 1


def min_inference_steps(scheduler) -> int:
    """The fewest sampling steps that give an image with `scheduler` (a SCHEDULERS name, or an instance)."""
    cls = SCHEDULERS[scheduler][0] if isinstance(scheduler, str) and scheduler in SCHEDULERS else (
        scheduler if isinstance(scheduler, str) else type(scheduler).__name__)
    return MIN_STEPS.get(cls, 1)


def _short_name(scheduler) -> str:
    """A scheduler's SCHEDULERS name (for messages), else its class name."""
    if isinstance(scheduler, str):
        return scheduler
    cls = type(scheduler).__name__
    return next((name for name, (c, extra) in SCHEDULERS.items() if c == cls and not extra), cls)


def downsample_factor(unet) -> int:
    """How many times the UNet halves height and width: both must be multiples of it."""
    if hasattr(unet, "downsample_factor"):
        return unet.downsample_factor
    return 2 ** (len(unet.config.block_out_channels) - 1)  # diffusers UNet2DConditionModel


def _side(name: str, value, limits: SamplingLimits, pipe) -> int:
    """A height or width in px: whole and within the limit; with a model, a multiple of its UNet's downsampling
    up to limits.max_side or, without one, MAX_SIZE_FACTOR x its sample size."""
    if pipe is None:
        return _whole(name, value, 1, limits.max_side)
    f, sample_size = pipe.size_multiple, pipe.native_size     # in pixels (a VAE's factor included)
    most = MAX_SIZE_FACTOR * sample_size if limits.max_side is None else limits.max_side
    if not is_whole(value) or not f <= value <= most or value % f:
        why = f" ({MAX_SIZE_FACTOR}x the model's sample size {sample_size})" if limits.max_side is None else ""
        raise ValueError(f"{name} must be a multiple of {f} from {f} to {most} px{why}, got {value}")
    return int(value)


def _words(value, kind):
    """A guidance setting as the pipeline takes it: True, or a dict or list of the words (None: none)."""
    if isinstance(value, bool):
        return True if value else None
    return kind(value) or None


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def is_whole(x) -> bool:
    """An int, or a finite float with no fraction (a page's number inputs send floats), not a bool. An int is
    never made a float: above 2**53 that would change it (seeds go to 2**64 - 1)."""
    if isinstance(x, int):
        return not isinstance(x, bool)
    return _number(x) and float(x).is_integer()


def _whole(name: str, value, least: int, most: int | None, why: str = "") -> int:
    if not is_whole(value) or value < least or (most is not None and value > most):
        span = f"at least {least}" if most is None else f"from {least} to {most}"
        raise ValueError(f"{name} must be a whole number {span}{why}, got {value}")
    return int(value)
