"""The `t2i` command: generate | heatmap | effect | serve | info | train | train-vae | make-dataset | evaluate."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import warnings
from dataclasses import replace
from pathlib import Path

from . import __version__
from .sampling import (LIMITS, guide_metadata, new_out_folder, png_metadata, sampling_device, sampling_pipeline,
                       save_new_png, sigint_deferred, slug, staged_out, use_idle_cores)
from .settings import (DEFAULTS, GUIDES, QUICK, SCHEDULERS, SERVER_LIMITS, SamplingSettings, check_word_weight,
                       generators)

SAMPLING_COMMANDS = ("generate", "heatmap", "effect", "evaluate", "serve")


def cmd_generate(args) -> None:
    if len(args.prompt) > 1 and all(len(p.split()) == 1 for p in args.prompt):
        print(f"t2i generate: warning: {len(args.prompt)} one-word prompts make one image each; for one image of "
              f"\"{' '.join(args.prompt)}\", quote it", file=sys.stderr)
    weights = _word_weights(args.word_weights)
    pipe, settings = sampling_pipeline(args, progress=True)
    scheduler = _used_scheduler(pipe, settings)
    for prompt in args.prompt if weights else []:
        pipe.word_labels(prompt, list(weights))  # a word not in a prompt fails before sampling
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n = settings.num_images
    jobs = list(zip([p for p in args.prompt for _ in range(n)], settings.seeds(len(args.prompt) * n)))
    one = replace(settings, num_images=1)
    for prompt, seed in jobs:  # one image per call: batched float sums differ from a single image's by 1/255, and
        result = pipe([prompt], **one.pipeline_kwargs(),  # its PNG's metadata must regenerate it bit for bit
                      generator=generators([seed]), record_attention=args.heatmaps, word_weights=weights)
        _save_generated(args, settings, result, [(prompt, seed)], out, scheduler, weights)


def _save_generated(args, settings: SamplingSettings, result, batch: list[tuple[str, int]], out: Path,
                    scheduler: str, weights: dict[str, float] | None) -> None:
    """Each image of one batch of `t2i generate` as a PNG with its settings and word weights (and its heatmaps)."""
    from PIL import Image
    for i, (image, (prompt, seed)) in enumerate(zip(result.images, batch)):
        meta = _image_metadata(args, settings, prompt, seed, scheduler, image, args.upscale,
                               **({"word_weights": weights} if weights else {}))
        big = image.resize((image.width * args.upscale, image.height * args.upscale), Image.NEAREST)
        path = save_new_png(big, out, f"{slug(prompt)}-{seed}", pnginfo=png_metadata(**meta))
        print(path)
        if args.heatmaps:
            from .attention.export import write_heatmap_outputs
            with staged_out(out / f"{path.stem}-heatmaps") as stage:
                write_heatmap_outputs(result.attention, i, image, stage, words=None)


def _image_metadata(args, settings: SamplingSettings, prompt: str, seed: int, scheduler: str, image, upscale: int,
                    **extra):
    """The PNG text fields `t2i generate` regenerates an image from: its prompt, seed and settings."""
    return dict(prompt=prompt, negative_prompt=settings.negative or "", seed=seed, steps=settings.steps,
                guidance=settings.guidance, scheduler=scheduler, model=args.model or "default", height=image.height,
                width=image.width, upscale=upscale, precision=args.precision, **guide_metadata(settings), **extra)


def _used_scheduler(pipe, settings: SamplingSettings) -> str:
    from .pipeline import scheduler_name
    return settings.scheduler or scheduler_name(pipe.scheduler, pipe.image_space)


def _word_weights(text: str | None) -> dict[str, float] | None:
    """--word-weights 'red=0,circle=2' -> {'red': 0.0, 'circle': 2.0}; None or blank -> None."""
    weights = {}
    for item in [i.strip() for i in (text or "").split(",") if i.strip()]:
        word, _, value = item.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = None
        if not word.strip() or weight is None:
            raise ValueError(f"--word-weights must be WORD=WEIGHT, comma-separated, e.g. red=0,circle=2; got {item!r}")
        if word.strip() in weights:
            raise ValueError(f"--word-weights gives {word.strip()!r} two weights; give each word one")
        weights[word.strip()] = check_word_weight(word.strip(), weight, name=f"the weight of {word.strip()!r}")
    return weights or None


def _word_list(text: str | None) -> list[str] | None:
    """'red, circle' -> ['red', 'circle']; None or blank -> None."""
    words = [w.strip() for w in text.split(",") if w.strip()] if text else []
    return words or None


def cmd_heatmap(args) -> None:
    from .attention import AttentionRecorder
    from .attention.export import write_heatmap_outputs
    words = _word_list(args.words)
    out = new_out_folder(args.out, "heatmaps", args.prompt, args.seed)
    pipe, settings = sampling_pipeline(args, progress=True)
    if words:
        pipe.word_labels(args.prompt, words)  # fails before sampling
    recorder = AttentionRecorder(layers=args.layers, timeline=args.gif)
    result = pipe(args.prompt, **settings.pipeline_kwargs(), generator=generators(settings.seeds(1)),
                  record_attention=recorder)
    image = result.images[0]
    meta = _image_metadata(args, settings, args.prompt, settings.seed, _used_scheduler(pipe, settings), image,
                           args.size // max(image.size))
    with staged_out(out) as stage:  # a failed write leaves no half-written --out
        paths = write_heatmap_outputs(result.attention, 0, image, stage, words=words, size=args.size, metadata=meta)
    for path in paths.values():
        print(out / path.relative_to(stage))


def cmd_effect(args) -> None:
    from .attention.effects import word_effects
    from .attention.export import write_effect_outputs
    words = _word_list(args.words)
    if not words:
        raise ValueError("--words needs at least one word of the prompt, e.g. --words red,circle")
    weight = check_word_weight(words[0], args.weight, name="--weight")
    out = new_out_folder(args.out, "effects", args.prompt, args.seed)
    pipe, settings = sampling_pipeline(args, progress=True)
    effects = word_effects(pipe, args.prompt, words, weight, settings, reweight_text=not args.cross_attention_only)
    meta = _image_metadata(args, settings, args.prompt, settings.seed, _used_scheduler(pipe, settings), effects.image,
                           args.size // max(effects.image.size),
                           batch=f"row 0 of {1 + len(effects.images)}, beside each word reweighted: sampled alone, "
                                 "a pixel may differ by 1/255")
    with staged_out(out) as stage:
        paths = write_effect_outputs(effects, stage, size=args.size, metadata=meta)
    for path in paths.values():
        print(out / path.relative_to(stage))


def cmd_serve(args) -> None:
    import socket
    import time
    t0 = time.perf_counter()
    warnings.filterwarnings("ignore", category=ResourceWarning)  # the web server's event loops, at exit
    limits = {k: getattr(args, k) for k in ("max_steps", "max_images", "max_side", "max_prompt_chars", "concurrency",
                                            "max_queue")}
    for name, value in limits.items():
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be from 0 to 65535, got {args.port}")
    device = sampling_device(args.device)
    from .explorer import Explorer, Limits
    try:
        from .serve import serve
    except ImportError as e:  # the web extra is optional
        raise ValueError(str(e)) from None
    if device.type == "cpu":
        use_idle_cores()
    port = args.port
    with socket.socket() as s:  # port 0: a free one, chosen by the system
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: a closed port's TIME_WAIT is free
        try:
            s.bind((args.host, port))
        except OSError:
            raise ValueError(f"--port {port} on {args.host} is in use: pass another --port, or --port 0 for a free "
                             "one") from None
        port = s.getsockname()[1]
    explorer = Explorer(args.model or [None], str(device), Limits(**limits))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # so that `finally` cleans up
    try:
        app, url = serve(explorer, args.host, port)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"t2i serve: warning: bound to {args.host}: anyone who can reach it can use this model",
                  file=sys.stderr)
        print(f"t2i explorer at {url} (ready in {time.perf_counter() - t0:.1f} s); Ctrl+C stops it", flush=True)
        app.block_thread()
    finally:
        explorer.close()


def cmd_info(args) -> None:
    from .pipeline import load_pipeline, scheduler_name
    if args.folder and args.model and args.folder != args.model:
        raise ValueError(f"two pipeline folders given ({args.folder} and --model {args.model}): pass one")
    args.model = args.model or args.folder
    pipe = load_pipeline(args.model)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"pipeline: {args.model or 'default (shipped)'}")
    print(f"images: {pipe.native_size} px native, height and width multiples of {pipe.size_multiple}; "
          f"denoised as {pipe.image_space.describe()}")
    print(f"unet: {type(pipe.unet).__name__}, {count(pipe.unet):,} parameters, dtype {pipe.unet.dtype}")
    for k, v in dict(pipe.unet.config).items():
        if not k.startswith("_"):
            print(f"  {k}: {v}")
    if pipe.vae is not None:
        print(f"vae: {type(pipe.vae).__name__}, {count(pipe.vae):,} parameters, dtype {pipe.vae.dtype}")
    print(f"text: {pipe.conditioning.describe()}")
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipe, name)
        if encoder is not None:
            te = encoder.config
            print(f"{name}: {type(encoder).__name__}, {count(encoder):,} parameters, width {te.hidden_size}, "
                  f"{te.num_hidden_layers} layers")
    print(f"tokenizer: {type(pipe.tokenizer).__name__}, vocabulary {len(pipe.tokenizer)}, "
          f"max length {pipe.tokenizer.model_max_length}")
    sc = pipe.scheduler.config
    print(f"scheduler: {type(pipe.scheduler).__name__} ({scheduler_name(pipe.scheduler, pipe.image_space)}), "
          f"prediction {sc.prediction_type}, beta schedule {sc.beta_schedule}, {sc.num_train_timesteps} train steps")
    print(f"caption dropout in training: {pipe.config.caption_dropout}")


def cmd_train(args) -> int | None:
    import yaml

    from .config import config_to_dict, load_config
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:  # as the run resolves it (a Stable Diffusion start's noise schedule written in)
        from .components import resolve, sd_start
        print(yaml.safe_dump(config_to_dict(resolve(cfg, sd_start(cfg, args.resume))), sort_keys=False))
        return None
    from .checkpoint import Interrupted
    from .train import train
    again = shlex.join(["t2i", "train", *(["--config", args.config] if args.config else []), *args.overrides,
                        "--resume", "latest"])
    try:
        path = train(cfg, resume=args.resume, stop_at=args.stop_at, overwrite=args.overwrite)
    except Interrupted as e:
        print(f"t2i train: {e}; continue with: {again}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt as e:  # a second signal (StoppedAtOnce names it), or Ctrl-C before the loop
        print(f"t2i train: stopped at once; the last complete checkpoint is kept. Continue with: {again}",
              file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    print(f"exported pipeline: {path}" if path else f"stopped at step {args.stop_at}; continue with --resume latest")
    return None


def cmd_train_vae(args) -> int | None:
    from .vae import VAETrainConfig, train_vae
    given = {k: v for k, v in vars(args).items() if k in VAETrainConfig.__dataclass_fields__ and v is not None}
    try:
        report = train_vae(VAETrainConfig(**given), overwrite=args.overwrite)
    except KeyboardInterrupt:
        print("t2i train-vae: stopped; no VAE was exported (an earlier one in --out stays). There is no resume: run "
              "it again", file=sys.stderr)
        return 128 + signal.SIGINT
    vae = Path(args.out) / "vae"
    print(f"held-out reconstructions ({report['held_out_images']} images): mean abs error {report['mean_abs']:.4f} "
          f"({report['mean_abs'] * 255:.1f}/255), PSNR {report['psnr']:.2f} dB; {report['images_per_second']:.1f} "
          f"img/s in training")
    print(f"scaling_factor {report['scaling_factor']:.4f} (latents: std {report['latent_std']:.3f}, mean "
          f"{report['latent_mean']:.3f}); side by side: {Path(args.out) / 'reconstructions.png'}")
    print(f"exported VAE: {vae}; train in its latent space with model.vae={vae}")
    return None


def cmd_make_dataset(args) -> int | None:
    if args.name == "shards":
        if not args.source:
            raise ValueError("make-dataset shards needs --from FOLDER, the image folder to shard")
        from .data.shards import write_shards
        try:
            rows, shards = write_shards(args.source, args.out, args.shard_size)
        except KeyboardInterrupt:
            print(f"t2i make-dataset: stopped; nothing was written to {args.out}", file=sys.stderr)
            return 128 + signal.SIGINT
        print(f"wrote {rows} images in {shards} shard{'s' * (shards != 1)} to {args.out}; train on them with "
              f"data.kind=shards data.root={args.out}")
        return
    from .data.shapes import ShapesConfig, write_image_folder
    given = {"max_objects": args.max_objects} if args.max_objects is not None else {}  # else the world's default
    cfg = ShapesConfig(size=args.size, seed=args.seed, **given)
    write_image_folder(cfg, args.num, args.out)
    print(f"wrote {args.num} images and metadata.jsonl to {args.out}")


def cmd_evaluate(args) -> None:
    from .card import add_evaluation
    from .evaluate import EvalConfig, evaluate
    given = {k: getattr(args, k) for k in ("num_prompts", "images_per_prompt", "steps", "guidance", "scheduler",
                                           "seed", "calibration_prompts", "batch_size", "effect_prompts")}
    config = EvalConfig(**{k: v for k, v in given.items() if v is not None})  # unset: EvalConfig's defaults
    if args.json and Path(args.json).exists():
        raise ValueError(f"--json {args.json} exists; pass another file (nothing is overwritten)")
    if args.prompts:  # any model, any prompt: attention against what each word does, no shapes world
        from .attention.effects import faithfulness_lines, prompt_faithfulness
        pipe, settings = sampling_pipeline(args, base=config.sampling)
        result = prompt_faithfulness(pipe, args.prompts, settings)
        print("\n".join(faithfulness_lines(result)))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            with open(args.json, "x") as f:
                f.write(json.dumps(result, indent=2))
            print(f"wrote {args.json}")
        return
    pipe = sampling_pipeline(args, base=config.sampling)[0]
    report = evaluate(pipe, config)
    print(report.format_table())
    result = report.to_dict()
    if args.guide_kind:  # the same prompts and seeds again, guided, and the two side by side
        from .evaluate import format_comparison
        guided = evaluate(pipe, replace(config, guide=args.guide_kind))
        print("\n" + guided.format_table() + "\n\n" + format_comparison(report, guided))
        result = {"alone": result, "guided": guided.to_dict()}
    elif args.model and add_evaluation(args.model, report.format_table()):
        print(f"added the table to {Path(args.model) / 'README.md'}")
    if args.json:
        folder = Path(args.json).resolve().parent
        created = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        with open(args.json, "x") as f:
            f.write(json.dumps(result, indent=2))
        print(f"wrote {Path(args.json).resolve()}" + (f" (created the folder {folder})" if created else ""))


def _sampling_options(p: argparse.ArgumentParser, base: SamplingSettings = DEFAULTS, size: bool = True,
                      guide: bool = True) -> None:
    """The options of every command that samples from a pipeline; unset, they take `base`'s settings."""
    p.add_argument("--model", help="pipeline folder: t2i's, or a diffusers Stable Diffusion 1.x/2.x/XL folder or hub "
                   "name (default: the shipped shapes model)")
    p.add_argument("--steps", type=int, help=f"denoising steps (default: {base.steps})")
    p.add_argument("--guidance", type=float, help=f"classifier-free guidance scale; 1: none (default: {base.guidance})")
    p.add_argument("--scheduler", choices=list(SCHEDULERS), help="the sampler (default: the model's)")
    if size:
        for side in ("--height", "--width"):
            p.add_argument(side, type=int, help="in pixels, a multiple of the model's size step (its UNet's "
                           "downsampling times its VAE's factor; t2i info says it) (default: the model's native size, "
                           "32 for the shipped model, 512 for SD 1.5)")
    if guide:
        p.add_argument("--guide", action="store_true", help="attention guidance from the prompt's own words "
                       "(shapes world): each object goes into the box its stated position or relation names "
                       "(about 2x the time)")
        p.add_argument("--layout", action="append", metavar="WORD=X0,Y0,X1,Y1", help="attention guidance: put "
                       "WORD in the box (fractions of the image, y down), e.g. circle=0,0,0.4,0.4; repeat it for "
                       "more words")
        p.add_argument("--excite", help="attention guidance: comma-separated words to make appear, e.g. "
                       "circle,square; all: every object's colour and noun (shapes world)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="bf16 or fp16: the UNet computes under autocast (bf16: 1.4x on CPUs with bf16 units, slower on "
                   "others; fp16: for GPUs); latents stay float32 and a VAE decodes in its own precision")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t2i", description="Text-to-image diffusion: generate, train, see each word.")
    p.add_argument("--version", action="version", version=f"t2i {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate PNGs from prompts")
    g.add_argument("prompt", nargs="+", help="one or more prompts")
    _sampling_options(g)
    g.add_argument("--negative", help="negative prompt")
    g.add_argument("--seed", type=int, default=0, help="seed of the first image, from 0 to 2**64 - 1; image i uses "
                   "seed+i (default: 0)")
    g.add_argument("--num-images", type=int, default=1, help=f"images per prompt, at most {LIMITS.max_images}, sampled "
                   "one at a time, so that each PNG's settings regenerate it bit for bit (default: 1)")
    g.add_argument("--upscale", type=int, default=4, help="nearest-neighbour upscaling of the saved PNG (default: 4)")
    g.add_argument("--heatmaps", action="store_true", help="also write per-word attention heatmaps")
    g.add_argument("--word-weights", metavar="WORD=W,...", help="multiply each word's attention by its weight "
                   "(prompt-to-prompt reweighting, conditional branch; 0 silences it), e.g. red=0,circle=2: what "
                   "the explorer's weight slider does, recorded in the PNG")
    g.add_argument("--out", default="outputs", help="output folder; no file in it is replaced (default: outputs)")
    g.set_defaults(func=cmd_generate)

    h = sub.add_parser("heatmap", help="generate one image and draw where each word attended")
    h.add_argument("prompt", help="the prompt, e.g. 'a red circle above a blue square'")
    _sampling_options(h)
    h.add_argument("--words", help="comma-separated words to draw (default: all); 'circle#2' = the second circle")
    h.add_argument("--seed", type=int, default=0, help="from 0 to 2**64 - 1 (default: 0)")
    h.add_argument("--layers", help="regex on cross-attention module names to record (default: all)")
    h.add_argument("--gif", action="store_true", help="also write an animated GIF per word over the steps")
    h.add_argument("--size", type=int, default=256, help="display size of the drawings in px (default: 256)")
    h.add_argument("--out", help="a new or empty output folder (default: outputs/heatmaps/<prompt>-<seed>)")
    h.set_defaults(func=cmd_heatmap)

    f = sub.add_parser("effect", help="what each word does: the image with a word reweighted, beside where it looked")
    f.add_argument("prompt", help="the prompt, e.g. 'a red circle above a blue square'")
    _sampling_options(f)
    f.add_argument("--words", required=True, help="comma-separated words to reweight, one at a time; "
                   "'circle#2' = the second circle")
    f.add_argument("--weight", type=float, default=0.0, help="each word's attention is multiplied by this "
                   "(prompt-to-prompt reweighting, conditional branch only), in the UNet's cross-attention and in "
                   "every attention of the text path; 0 takes the word out of the picture (default: 0)")
    f.add_argument("--cross-attention-only", action="store_true", help="reweight in the UNet's cross-attention "
                   "only, as t2i did before: on a model whose text path mixes the words, 0 then leaves a trace")
    f.add_argument("--negative", help="negative prompt")
    f.add_argument("--seed", type=int, default=0, help="from 0 to 2**64 - 1 (default: 0)")
    f.add_argument("--size", type=int, default=256, help="display size of the drawings in px (default: 256)")
    f.add_argument("--out", help="a new or empty output folder (default: outputs/effects/<prompt>-<seed>)")
    f.set_defaults(func=cmd_effect)

    s = sub.add_parser("serve", help="the word explorer in the browser: words, maps, steps, weights and effects "
                       "(needs pip install -e \".[web]\")")
    s.add_argument("--model", action="append", help="a pipeline folder to offer; repeat for more (default: the "
                   "shipped model). Each is loaded once.")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=7860, help="port; 0: a free one (default: 7860)")
    s.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    for name, default, what in [("max-steps", SERVER_LIMITS.max_steps, "sampling steps of one request"),
                                ("max-images", SERVER_LIMITS.max_images, "images of one request"),
                                ("max-side", None, "height and width in px (default: per model, the larger of "
                                 f"{SERVER_LIMITS.max_side} and 1.5x its native size)"),
                                ("max-prompt-chars", 300, "characters of a prompt"),
                                ("concurrency", 1, "requests that sample at once"),
                                ("max-queue", 64, "requests waiting; more are turned away")]:
        s.add_argument(f"--{name}", type=int, default=default,
                       help=f"the most {what}" + ("" if default is None else f" (default: {default})"))
    s.set_defaults(func=cmd_serve)

    i = sub.add_parser("info", help="print a pipeline's config and parameter counts")
    i.add_argument("folder", nargs="?", help="pipeline folder (default: the shipped model)")
    i.add_argument("--model", help="the same, as every other command takes it")
    i.set_defaults(func=cmd_info)

    t = sub.add_parser("train", help="train on the shapes world or an image folder")
    t.add_argument("--config", help="YAML config (see configs/)")
    t.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.max_steps=100")
    t.add_argument("--resume", help="'latest' (the newest undamaged checkpoint) or a checkpoint folder")
    t.add_argument("--overwrite", action="store_true",
                   help="start over in a train.output_dir that holds a run, deleting its checkpoints, pipeline and logs")
    t.add_argument("--stop-at", type=int, help="stop after this step (with a checkpoint), to resume later")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.set_defaults(func=cmd_train)

    v = sub.add_parser("train-vae", help="train a small AutoencoderKL for latent training (model.vae=OUT/vae)")
    v.add_argument("--out", required=True, help="a new or empty folder, or an earlier train-vae run's (--overwrite)")
    v.add_argument("--data", help="shapes (the shapes world at --size) or a folder of captioned images or shards "
                   "(default: shapes)")
    for name, kind, what in [("size", int, "image side in px, a multiple of the VAE's factor 4 (default: 64)"),
                             ("steps", int, "training steps (default: 1000)"),
                             ("batch-size", int, "images per step (default: 8)"),
                             ("lr", float, "AdamW learning rate (default: 1e-3)"),
                             ("seed", int, "initialisation, data order and sampling (default: 0)"),
                             ("kl-weight", float, "weight of the KL per latent element beside the L1 loss per "
                              "pixel (default: 1e-4)")]:
        v.add_argument(f"--{name}", type=kind, help=what)
    v.add_argument("--report-to", choices=["tensorboard", "none"], help="logs in OUT/tensorboard (default: "
                   "tensorboard)")
    v.add_argument("--overwrite", action="store_true", help="replace the VAE of an earlier train-vae run in --out")
    v.set_defaults(func=cmd_train_vae)

    m = sub.add_parser("make-dataset", help="write the shapes world as an image folder, or shard an image folder")
    m.add_argument("name", choices=["shapes", "shards"], help="shapes: an image folder of the shapes world; "
                   "shards: an image folder (--from) as Arrow shards for data.kind=shards (needs datasets)")
    m.add_argument("--num", type=int, default=1000, help="shapes: images to write")
    m.add_argument("--size", type=int, default=32, help="shapes: image side in px")
    m.add_argument("--max-objects", type=int, help="shapes: most objects per image (default: ShapesConfig's, all "
                   "a scene can hold)")
    m.add_argument("--seed", type=int, default=0, help="shapes: seed of the scenes")
    m.add_argument("--from", dest="source", help="shards: the image folder (captions as for data.kind=folder)")
    m.add_argument("--shard-size", type=int, default=1000, help="shards: most images per shard (default: 1000)")
    m.add_argument("--out", required=True, help="a new folder")
    m.set_defaults(func=cmd_make_dataset)

    e = sub.add_parser("evaluate", help="score prompt fidelity and heatmap localisation on seen and held-out "
                       "prompts (unset sizes: t2i.evaluate.EvalConfig's defaults, printed in the report)")
    _sampling_options(e, QUICK, size=False, guide=False)
    e.add_argument("--guide", dest="guide_kind", nargs="?", const="layout", choices=GUIDES,
                   help="also score the model with "
                   "attention guidance from each prompt's own words, beside the model alone (same prompts and "
                   "seeds), with seconds per image: layout (boxes from the stated positions and relations; the "
                   "default), excite (every object made to appear) or both")
    e.add_argument("--num-prompts", type=int, help="prompts per split (seen, held-out)")
    e.add_argument("--images-per-prompt", type=int, help="images per prompt, each with its own seed")
    e.add_argument("--seed", type=int, help="draws the prompts and the noise (keep it apart from the training seed)")
    e.add_argument("--calibration-prompts", type=int, help="prompts for choosing the map threshold tau")
    e.add_argument("--batch-size", type=int, help="images per pipeline call")
    e.add_argument("--effect-prompts", type=int, help="prompts per split whose object words are silenced in turn "
                   "for the faithfulness table; 0: none")
    e.add_argument("--prompts", nargs="+", help="score these prompts instead of the shapes world (any model, Stable "
                   "Diffusion included): each word silenced in turn, its attention map's correlation with what "
                   "changed, beside a centre prior's")
    e.add_argument("--json", help="also write the report as JSON to this file")
    e.set_defaults(func=cmd_evaluate)
    return p


def _quiet_loading() -> None:
    """Loading a 4 MB model needs no progress bars; the commands show their own."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "train" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra  # section.key=value after an option (--resume latest train.max_steps=...)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    shown = warnings.formatwarning
    warnings.formatwarning = _warning_format(args.command, shown)
    try:
        if args.command in SAMPLING_COMMANDS:  # waiting OpenMP threads sleep, not spin; read once, when torch loads
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        with sigint_deferred():  # a Ctrl-C in torch's C++ start-up aborts the process; in the libraries' imports
            import torch  # noqa: F401  (some catch everything), it would be lost
            if args.command in (*SAMPLING_COMMANDS, "info"):
                from . import pipeline  # noqa: F401
        if args.command != "train":
            _quiet_loading()
            for module in ("diffusers", "transformers", "huggingface_hub"):  # their deprecations are not the user's
                warnings.filterwarnings("ignore", module=module)
        return args.func(args) or 0
    except (ValueError, OSError) as e:  # bad input, a missing file, a full disk: one clear line, no traceback
        print(f"t2i {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while importing, loading or sampling (train says more itself)
        print(f"t2i {args.command}: stopped (Ctrl-C); the files written so far are kept", file=sys.stderr)
        return 128 + signal.SIGINT
    finally:
        warnings.formatwarning = shown


def _warning_format(command: str, default):
    """t2i's own warnings as one line in its words ("t2i train: warning: ..."), without the file, line and
    source (contextlib.py:517 for a warning raised in a context manager); other libraries' as they are."""
    package = str(Path(__file__).parent)

    def format_warning(message, category, filename, lineno, line=None):
        if issubclass(category, UserWarning) and (filename.startswith(package) or filename.endswith("contextlib.py")):
            return f"t2i {command}: warning: {message}\n"
        return default(message, category, filename, lineno, line)
    return format_warning


if __name__ == "__main__":
    warnings.simplefilter("default")
    sys.exit(main())
