"""`t2i evaluate`: prompt fidelity and heatmap localisation of a model on the shapes world, on prompts
seen in training against held-out ones (colour-shape pairs and shape-positions never shown together),
beside baselines scored with the same code: the training images (the segmenter's ceiling), noise and
another prompt's scene (chance), uniform and centre-prior maps, and DAAM's published noun mIoU.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .data.paraphrase import paraphrase
from .data.wording import DEFAULT_HOLDOUT, Grammar, reword
from .data.shapes import WORLD_FILE, ShapesConfig, ShapeScene, render_scene, shapes_world
from .faithfulness import faithfulness_table, sample_effects, score_faithfulness
from .metrics import (DAAM_TAU, FIDELITY, FIDELITY_HELP, GENEVAL, GENEVAL_HELP, TAUS, Tally, calibrate_tau,
                      centre_prior_map, iou_curve, pointing, score_fidelity, to_uint8, uniform_map)
from .scoring import (WORD_CLASSES, EvalConfig, MapSet, found_words, image_seed, object_words,  # noqa: F401
                      pct, sample_scenes, table, word_map)
from .segment import match_objects, segment

SPLITS = {"seen": "train", "held-out": "holdout"}  # report name -> ShapesConfig.split
PARAPHRASE = "paraphrase"  # seen-split scenes (another seed) re-worded as the training templates never do
UNSEEN_WORDING = "unseen-wording"  # seen-split scenes said with grammar elements that training held out
BENCHMARK_POSITION_PROB = 0.5  # prompts state positions as often for every model, whatever its training used
IMAGE_SOURCES = ("model", "training images", "noise", "another prompt's scene")
MAP_SOURCES = ("ours", "uniform", "centre prior")
# The hold-out of configs/shapes32.yaml, assumed for a model folder without train_config.yaml.
ASSUMED_HOLDOUT = {"holdout_pairs": ("green triangle", "purple circle"), "holdout_positions": ("square@bottom right",)}
DAAM_NOUN_MIOU = (58.8, 64.8)  # Tang et al. 2023, noun segmentation on COCO-Gen and Unreal-Gen


@dataclass
class EvalReport:
    """Numbers only, JSON-ready: fidelity[split][image source] = {"images": n, metric: {rate, hits, trials}};
    localisation[split][word class] = {"scored", "not_found", "no_token", map source: {"miou", "pointing"}};
    faithfulness[split][word class] = {"scored", ..., map source: {"pointing", "share", "correlation"}}
    (rates in [0, 1], None where nothing was scored); tau[map source]; world: the prompts' shapes world."""

    config: EvalConfig
    model: str
    world: dict
    fidelity: dict
    localisation: dict
    tau: dict
    calibration: dict
    seconds: float
    notes: list[str] = field(default_factory=list)
    faithfulness: dict = field(default_factory=dict)
    split_seconds: float = 0.0       # sampling the splits' images (not calibration, not effects)
    split_images: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def format_table(self) -> str:
        return format_report(self)


# ----------------------------------------------------------------------------------------------
# The world the model was trained on, and the prompt sets drawn from it.


def training_world(pipe) -> tuple[ShapesConfig, str]:
    """The shapes world of the model's training data (split 'train'), from train_config.yaml in its
    pipeline folder, and a note saying where it came from. Without that file: the hold-out of
    configs/shapes32.yaml at the UNet's sample size."""
    from .config import DataConfig, load_config
    folder = getattr(pipe, "name_or_path", None)
    path = Path(folder) / "train_config.yaml" if folder else None
    if path is not None and path.is_file():
        data, source = load_config(path).data, f"from {path}"
        if data.kind == "folder" and (Path(data.root) / WORLD_FILE).is_file():  # written by `t2i make-dataset shapes`
            world = ShapesConfig(**json.loads((Path(data.root) / WORLD_FILE).read_text()))
            return dataclasses.replace(world, split="train", position_prob=BENCHMARK_POSITION_PROB), \
                f"from {Path(data.root) / WORLD_FILE} (the image folder it trained on)"
        if data.kind != "shapes":
            raise ValueError(f"{path} trained on data.kind={data.kind!r} (data.root={data.root}, with no {WORLD_FILE} "
                             "of `t2i make-dataset shapes`): evaluate scores the shapes world only; score your own "
                             "prompts with t2i evaluate --prompts \"PROMPT\" ...")
    elif pipe.image_space.kind != "pixels":
        raise ValueError("t2i evaluate scores models of t2i's shapes world (it segments their flat-colour images "
                         "and scores maps against the objects' masks); on a Stable Diffusion model, score your own "
                         "prompts with t2i evaluate --prompts \"PROMPT\" ...")
    else:
        data = DataConfig(size=pipe.native_size, **ASSUMED_HOLDOUT)
        source = "assumed (no train_config.yaml beside the model): configs/shapes32.yaml's hold-out"
    world = dataclasses.replace(shapes_world(data, "train"), position_prob=BENCHMARK_POSITION_PROB)
    return world, source


def prompt_scenes(world: ShapesConfig, split: str, num: int, seed: int) -> list[ShapeScene]:
    """`num` scenes of `world` under `seed` from ShapesConfig split 'train', 'holdout' or 'all'."""
    config = dataclasses.replace(world, split=split, seed=seed, wording="templates")  # comparable across models
    return [render_scene(config, i) for i in range(num)]


def paraphrase_scenes(world: ShapesConfig, num: int, seed: int) -> list[ShapeScene]:
    """`num` seen-split scenes under seed + 2, each captioned in a wording training never used."""
    rng = np.random.default_rng([seed, 2])
    return [paraphrase(s, rng) for s in prompt_scenes(world, "train", num, seed + 2)]


def unseen_wording_scenes(world: ShapesConfig, num: int, seed: int) -> list[ShapeScene]:
    """`num` seen-split scenes under seed + 3, each captioned by the grammar with at least one of the wording
    elements training held out (world.holdout_wording; t2i.data.wording.DEFAULT_HOLDOUT for a model whose
    config names none)."""
    grammar = Grammar(world.holdout_wording or DEFAULT_HOLDOUT, "unseen")
    rng = np.random.default_rng([seed, 3])
    return [reword(s, grammar, rng) for s in prompt_scenes(world, "train", num, seed + 3)]


# ----------------------------------------------------------------------------------------------
# Sampling and scoring one prompt set.


def sample_and_score(pipe, scenes: list[ShapeScene], config: EvalConfig, split_id: int, images_per_prompt: int,
                     bar) -> tuple[Tally, MapSet, int]:
    """Generate `images_per_prompt` images per scene caption (batched, seeded per image), segment them,
    and return the fidelity tally, the word maps of found objects, and the number of images."""
    jobs = [(p, k) for p in range(len(scenes)) for k in range(images_per_prompt)]
    size = scenes[0].image.shape[0]
    tally, mapset = Tally(), MapSet()
    for start in range(0, len(jobs), config.batch_size):
        batch = jobs[start:start + config.batch_size]
        # 1. sample, recording cross-attention (words cut by the tokenizer are counted as no_token, not warned)
        seeds = [image_seed(config.seed, split_id, p, k) for p, k in batch]
        out = sample_scenes(pipe, [scenes[p].caption for p, _ in batch], seeds, config, size)
        # 2. segment each image; score it; keep the maps of the objects found
        for row, (p, _) in enumerate(batch):
            scene = scenes[p]
            detected = segment(to_uint8(out.images[row]))
            pairs = match_objects(scene.objects, detected)
            tally += score_fidelity(scene, detected, pairs)
            for word_class, _, heat, mask in found_words(scene, pairs, out.attention, row, mapset):
                mapset.maps[word_class].append(heat)
                mapset.masks[word_class].append(mask)
        bar.update(len(batch))
    return tally, mapset, len(jobs)


def score_baseline_images(scenes: list[ShapeScene], seed: int, split_id: int) -> dict[str, tuple[Tally, int]]:
    """Fidelity of images that did not come from the model, one per prompt: the scene's own rendering
    (ceiling), uniform RGB noise and the next prompt's scene (chance for a model that ignores the text)."""
    rng = np.random.default_rng([seed, split_id])
    n, size = len(scenes), scenes[0].image.shape[0]
    images = {
        "training images": [s.image for s in scenes],
        "noise": list(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)),
        "another prompt's scene": [scenes[(i + 1) % n].image for i in range(n)],
    }
    out = {}
    for source, ims in images.items():
        tally = Tally()
        for scene, image in zip(scenes, ims):
            tally += score_fidelity(scene, segment(image))
        out[source] = (tally, n)
    return out


def score_maps(mapset: MapSet, size: int, tau: dict[str, float]) -> dict:
    """mIoU at each map source's tau and pointing accuracy, per word class, with the counts."""
    baselines = {"uniform": uniform_map(size, size), "centre prior": centre_prior_map(size, size)}
    result = {}
    for word_class in WORD_CLASSES:
        maps, masks = mapset.arrays(word_class, size)
        entry = {"scored": len(maps), "not_found": mapset.not_found[word_class], "no_token": mapset.no_token[word_class]}
        for source in MAP_SOURCES:
            m = maps if source == "ours" else np.broadcast_to(baselines[source], masks.shape)
            entry[source] = {"miou": float(iou_curve(m, masks, [tau[source]]).mean()) if len(m) else None,
                             "pointing": float(pointing(m, masks).mean()) if len(m) else None}
        result[word_class] = entry
    return result


# ----------------------------------------------------------------------------------------------


def evaluate(pipe, config: EvalConfig = EvalConfig(), world: ShapesConfig | None = None,
             progress: bool = True) -> EvalReport:
    """Score `pipe` on prompts of the shapes world `world` (default: the one it was trained on, see
    `training_world`), seen and held-out, with baselines. Returns an EvalReport."""
    t0 = time.perf_counter()
    # 1. the world and the prompt sets: a seed apart from training's; calibration under seed + 1
    notes = []
    if world is None:
        world, source = training_world(pipe)
    else:
        source = "given to evaluate()"
    splits = {name: prompt_scenes(world, split, config.num_prompts, config.seed) for name, split in SPLITS.items()
              if split == "train" or world.holdout_pairs or world.holdout_positions}
    if "held-out" not in splits:
        notes.append("the model's training data holds nothing out, so there is no held-out split")
    splits[PARAPHRASE] = paraphrase_scenes(world, config.num_prompts, config.seed)
    if config.guide is None:  # guidance reads its boxes off template and paraphrase wordings only
        splits[UNSEEN_WORDING] = unseen_wording_scenes(world, config.num_prompts, config.seed)
    else:
        notes.append("guided: no unseen-wording split (guidance from the prompt reads the templates' and the "
                     "paraphrases' wordings only)")
    calibration = prompt_scenes(world, "train", config.calibration_prompts, config.seed + 1)
    size = world.size

    # 2. sample with the requested scheduler (each pipeline call builds it; the model's own is untouched)
    from .pipeline import scheduler_name
    used_scheduler = config.scheduler or scheduler_name(pipe.scheduler, pipe.image_space)
    total = len(calibration) + sum(len(s) for s in splits.values()) * config.images_per_prompt
    total += sum(min(len(s), config.effect_prompts) for s in splits.values())  # a scene with its variants counts one
    results, effects, split_seconds = {}, {}, 0.0
    with tqdm(total=total, desc="evaluate", unit="img", disable=not progress) as bar:
        cal_maps = MapSet()
        if calibration:
            bar.set_postfix_str("calibration")
            _, cal_maps, _ = sample_and_score(pipe, calibration, config, 0, 1, bar)
        for split_id, (name, scenes) in enumerate(splits.items(), start=1):
            bar.set_postfix_str(name)
            t_split = time.perf_counter()
            results[name] = sample_and_score(pipe, scenes, config, split_id, config.images_per_prompt, bar)
            split_seconds += time.perf_counter() - t_split
            if config.effect_prompts:
                bar.set_postfix_str(f"{name}: word effects")
                effects[name] = sample_effects(pipe, scenes[:config.effect_prompts], config, split_id, bar)
    sampled = time.perf_counter() - t0

    # 3. tau per map source on the calibration maps (nouns and colour words together)
    cal = [cal_maps.arrays(c, size) for c in WORD_CLASSES]
    cal_maps_all, cal_masks = np.concatenate([m for m, _ in cal]), np.concatenate([k for _, k in cal])
    tau, curves = {"uniform": 1.0}, {}  # a uniform map covers the image at every tau
    for map_source, maps in [("ours", cal_maps_all),
                             ("centre prior", np.broadcast_to(centre_prior_map(size, size), cal_masks.shape))]:
        tau[map_source], mean = calibrate_tau(maps, cal_masks)
        curves[map_source] = [None if np.isnan(v) else float(v) for v in mean]
    if not len(cal_masks):
        notes.append(f"calibration found no objects in the model's images: tau = DAAM's {tau['ours']}")

    # 4. fidelity of the model and of the baseline images; localisation of found objects
    fidelity, localisation = {}, {}
    for split_id, (name, scenes) in enumerate(splits.items(), start=1):
        tally, mapset, n = results[name]
        fidelity[name] = {"model": {"images": n, **tally.to_dict(FIDELITY), "geneval": tally.to_dict(GENEVAL)}}
        for image_source, (t, m) in score_baseline_images(scenes, config.seed, split_id).items():
            fidelity[name][image_source] = {"images": m, **t.to_dict(FIDELITY)}
        localisation[name] = score_maps(mapset, size, tau)
    faithfulness = {name: score_faithfulness(found, size) for name, found in effects.items()}
    cut = sum(e["no_token"] for split in localisation.values() for e in split.values())
    if cut:
        notes.append(f"{cut} words of found objects were cut from their prompts by the tokenizer's max length "
                     "and not scored")

    world_info = {"size": world.size, "min_objects": world.min_objects, "max_objects": world.max_objects,
                  "holdout_pairs": list(world.holdout_pairs), "holdout_positions": list(world.holdout_positions),
                  "source": source}
    calib_info = {"prompts": len(calibration), "objects": int(len(cal_masks)), "taus": list(TAUS),
                  "mean_iou": curves, "scheduler": used_scheduler, "sampling_seconds": round(sampled, 1)}
    return EvalReport(config=config, model=str(getattr(pipe, "name_or_path", "") or "(in memory)"),
                      world=world_info, fidelity=fidelity, localisation=localisation, tau=tau,
                      calibration=calib_info, seconds=round(time.perf_counter() - t0, 1), notes=notes,
                      faithfulness=faithfulness, split_seconds=round(split_seconds, 1),
                      split_images=sum(n for _, _, n in results.values()))


# ----------------------------------------------------------------------------------------------
# The printed report.


COMPARED = ("position", "relation", "count", "exact", "colour", "shape")


def overall(geneval: dict) -> float | None:
    """The GenEval-style overall: the mean of the categories that were scored."""
    known = [geneval[m]["rate"] for m in GENEVAL if geneval[m]["rate"] is not None]
    return sum(known) / len(known) if known else None


def format_comparison(alone: EvalReport, guided: EvalReport) -> str:
    """The model alone against the same model with attention guidance, split by split: the fidelity
    metrics guidance aims at and those it must not cost, the GenEval-style overall, and seconds per image."""
    rows = []
    for split in (s for s in alone.fidelity if s in guided.fidelity):
        for name, report in (("alone", alone), ("guided", guided)):
            model = report.fidelity[split]["model"]
            rows.append([split, name] + [pct(model[m]["rate"]) for m in COMPARED] + [pct(overall(model["geneval"]))])
    per_image = [r.split_seconds / max(1, r.split_images) for r in (alone, guided)]
    out = ["## Attention guidance: the model alone and guided (same prompts, seeds and settings)"]
    out += table(["split", "sampling"] + list(COMPARED) + ["overall"], rows)
    out += ["", f"Sampling time per image: alone {per_image[0]:.2f} s, guided {per_image[1]:.2f} s "
                f"({per_image[1] / per_image[0]:.2f}x), on this machine in this process."]
    return "\n".join(out)


def format_report(report: EvalReport) -> str:
    """The report as markdown tables: prompt fidelity, then heatmap localisation, with footnotes."""
    c, w = report.config, report.world
    held = ", ".join(w["holdout_pairs"] + w["holdout_positions"]) or "nothing"
    out = [f"# t2i evaluate: {report.model}",
           f"{w['size']}x{w['size']} shapes world, {w['min_objects']}-{w['max_objects']} objects; held out: {held} "
           f"({w['source']})",
           f"{c.num_prompts} prompts per split x {c.images_per_prompt} images, {c.steps} steps "
           f"({report.calibration['scheduler']}), guidance {c.guidance}, seed {c.seed}"
           f"{', attention guidance from each prompt' if c.guide else ''}; {report.seconds:.0f} s", "",
           "## GenEval-style summary (% of images, judged by the segmenter)"]
    rows = []
    for split, sources in report.fidelity.items():
        ge = sources["model"]["geneval"]
        rows.append([split, str(sources["model"]["images"])] + [pct(ge[m]["rate"]) for m in GENEVAL]
                    + [pct(overall(ge))])
    out += table(["split", "n"] + list(GENEVAL) + ["overall"], rows)
    out += [""] + [f"- {m}: {GENEVAL_HELP[m]}" for m in GENEVAL]
    out += ["", "## Prompt fidelity (% of trials, judged by the segmenter)"]
    labels = {"model": "model", "training images": "training images (ceiling)", "noise": "uniform noise (chance)",
              "another prompt's scene": "another prompt's scene (chance)"}
    rows = [[split, labels[src], str(r["images"])] + [pct(r[m]["rate"]) for m in FIDELITY]
            for split, sources in report.fidelity.items() for src, r in sources.items()]
    out += table(["split", "images", "n"] + list(FIDELITY), rows)
    out += [""] + [f"- {m}: {FIDELITY_HELP[m]}" for m in FIDELITY]

    out += ["", f"## Heatmap localisation (maps of the model's images vs. the segmented object; tau calibrated on "
                f"{report.calibration['prompts']} prompts, {report.calibration['objects']} object words)"]
    rows = []
    for split, classes in report.localisation.items():
        for word_class, e in classes.items():
            for src in MAP_SOURCES:
                tau = "any" if src == "uniform" else f"{report.tau[src]:.1f}"
                rows.append([split, "noun" if word_class == "noun" else "colour adj.", str(e["scored"]),
                             str(e["not_found"]), src, tau, pct(e[src]["miou"]), pct(e[src]["pointing"])])
    rows.append(["(published)", "noun", "–", "–", "DAAM, Stable Diffusion †", f"{DAAM_TAU:g}",
                 f"{DAAM_NOUN_MIOU[0]}–{DAAM_NOUN_MIOU[1]}", "–"])
    out += table(["split", "word", "scored", "not found", "map", "tau", "mIoU", "pointing"], rows)
    out += ["", "Words of objects the segmenter did not find are not scored (\"not found\"). Pointing: the map's "
                "maximum lies inside the object's mask (ties: the share inside).",
            "† Tang et al. 2023 (What the DAAM), noun mIoU on COCO-Gen and Unreal-Gen: Stable Diffusion's 512 px "
            f"images of natural scenes with human-annotated masks, tau = {DAAM_TAU:g}. Here: synthetic flat-colour "
            f"shapes at {w['size']} px, our own tiny model, masks from the learning-free segmenter, tau calibrated per map; "
            "a reference point, not a like-for-like comparison."]
    if report.faithfulness:
        out += ["", f"## Faithfulness: attention against what the word does ({c.effect_prompts} prompts per split, "
                    "each object word silenced in turn, same seed)"]
        out += faithfulness_table(report.faithfulness)
        out += ["", "Effect of silencing: the per-pixel change of the image when the word's attention is set to 0 "
                    "(prompt-to-prompt reweighting, conditional branch). Pointing: the map's maximum lies inside "
                    "the object's mask; share in mask: the share of the map's mass inside it (for the effect map: "
                    "of the change); corr. with effect: Pearson correlation over pixels with the effect map "
                    "(0 for a constant map)."]
    out += [f"Note: {n}" for n in report.notes]
    return "\n".join(out)
