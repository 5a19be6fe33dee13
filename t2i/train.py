# The training loop on accelerate: one CPU, one GPU, or many (`accelerate launch`). Flat and short;
# the data stream (data/stream.py), text states (text.py) and the saved state (checkpoint.py) live in
# their own files, and EMA, previews and export are named functions beside the loop.
from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import time
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .card import write_model_card
from .config import RunConfig, config_to_dict, flatten, save_config
from .components import RunComponents, build_components, check_shape, resolve, sd_start
from .data.stream import build_dataset, data_stream, latent_dataset
from .diffusion import diffusion_loss, make_noise_scheduler
from .ema import EMA
from .grounding import capture_cross_attention, grounding_loss, token_indices
from .stable_diffusion import quiet_third_party
from .text import drop_captions


def train(cfg: RunConfig, resume: str | None = None, stop_at: int | None = None,
          overwrite: bool = False) -> Path | None:
    """Train and export a T2IPipeline with the EMA weights to `{output_dir}/pipeline`; returns that path.
    `stop_at` ends the session early at that step, after a checkpoint, to be resumed later (returns None).
    A fresh run refuses a folder that holds a run unless `overwrite` (which deletes that run); one training
    at a time holds the folder. SIGINT or SIGTERM save a checkpoint, then raise checkpoint.Interrupted."""
    start = sd_start(cfg, resume)  # a Stable Diffusion folder to fine-tune, or None
    cfg = resolve(cfg, start)  # what such a start decides: its noise schedule, a diffusers UNet
    check_shape(cfg)  # a bad data.size fails before any work
    if stop_at is not None and stop_at < 1:
        raise ValueError(f"--stop-at must be a step >= 1, got {stop_at}; leave it out to train to train.max_steps")
    no_accelerator = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    # mixed_precision None: accelerate's (ACCELERATE_MIXED_PRECISION from `accelerate launch`/config), else "no"
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, log_with=tracker(cfg.train.report_to),
                              gradient_accumulation_steps=cfg.train.grad_accum, project_dir=cfg.train.output_dir,
                              cpu=no_accelerator)  # cpu: gloo for >1 process
    with ExitStack() as session:  # let go however training ends: the folder's lock, signal handlers, progress bar
        session.enter_context(ckpt.claim_run_dir(cfg.train.output_dir, accelerator.is_main_process, resume, overwrite))
        stop = session.enter_context(ckpt.StopOnSignal())
        accelerator.wait_for_everyone()
        return _train(cfg, accelerator, resume, stop_at, stop, session, start)


def _train(cfg: RunConfig, accelerator: Accelerator, resume: str | None, stop_at: int | None,
           stop: ckpt.StopOnSignal, session: ExitStack, start: str | None = None) -> Path | None:
    """The loop of `train`, in the run folder it holds; `start`: the Stable Diffusion folder it fine-tunes."""
    tc, out = cfg.train, Path(cfg.train.output_dir)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes

    # 1. components, identically initialised on every process
    set_seed(tc.seed)
    with accelerator.main_process_first():  # the main process indexes the folder, learns the tokenizer and encodes
        dataset, corpus = build_dataset(cfg)  # the latent cache; the others then read all three from disk
        parts = build_components(cfg, corpus, out, resume, accelerator.is_main_process, start)
        space = parts.space.to(device, frozen_dtype(accelerator))
        dataset = latent_dataset(dataset, cfg, space, progress=accelerator.is_local_main_process)
    tokenizer, text_encoder, unet = parts.tokenizer, parts.text_encoder, parts.unet
    if parts.start is not None:
        load_start(unet, parts.start.unet, tc.init_from)
    noise_scheduler = (DDPMScheduler.from_config(parts.scheduler.config) if parts.scheduler is not None
                       else make_noise_scheduler(cfg.noise))
    layout = torch.channels_last if tc.channels_last else torch.contiguous_format
    unet.to(memory_format=layout)
    if tc.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if cfg.text.trainable else [])
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=device.type == "cuda")
    state = ckpt.TrainingState(
        unet, EMA(unet, tc.ema_decay), optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg)),
        generators={"noise": torch.Generator(device=device).manual_seed(tc.seed * 1000 + rank),  # timesteps, noise
                    "drop": torch.Generator().manual_seed(tc.seed * 1000 + rank + 500)},         # caption dropout
        text_encoder=text_encoder if cfg.text.trainable else None)

    # 2. resume: weights, EMA, optimiser, LR schedule, step, RNG and data position
    if resume:
        state.load(ckpt.resolve_resume(out, resume, accelerator.is_main_process), rank, cfg, world)
        if stop_at is not None and stop_at <= state.step < tc.max_steps:
            raise ValueError(f"--stop-at {stop_at} is not after the checkpoint's step {state.step}: give a later step")
    if cfg.text.trainable:
        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    else:  # a frozen module has nothing for DDP to synchronise
        unet, optimizer = accelerator.prepare(unet, optimizer)
        text_encoder = text_encoder.to(device).eval()
    text = parts.text_states(text_encoder, cfg.text.trainable, cfg.data.size, device)
    loader = data_stream(dataset, cfg, rank, world, start=state.samples)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        if tc.report_to != "none":
            accelerator.init_trackers("tensorboard" if tc.report_to == "tensorboard" else "t2i", config=_hparams(cfg))
        print(f"training {_count(unet)/1e6:.2f}M UNet + {_count(text_encoder)/1e6:.2f}M text encoder params "
              f"({'trained' if cfg.text.trainable else 'frozen'}) on {world} x {device} in "
              f"{'fp32' if accelerator.mixed_precision == 'no' else accelerator.mixed_precision} precision, "
              f"from step {state.step}")

    # 3. the loop: one optimiser step = grad_accum micro-batches on every process
    bar = session.enter_context(tqdm(total=tc.max_steps, initial=state.step, dynamic_ncols=True,
                                     disable=not accelerator.is_local_main_process))
    running, running_ground = torch.zeros((), device=device), torch.zeros((), device=device)
    n_running, t0, seen0, interrupted = 0, time.perf_counter(), state.samples, False
    unet.train(), text_encoder.train(cfg.text.trainable)
    end, grounded = min(tc.max_steps, stop_at or tc.max_steps), tc.grounding_weight > 0
    curve = tc.position_every > 0 and cfg.data.kind == "shapes"
    g_noise, g_drop = state.generators["noise"], state.generators["drop"]
    while state.step < end:
        for _ in range(tc.grad_accum):
            batch = next(loader)
            captions = drop_captions(batch["text"], tc.caption_dropout, g_drop)
            with accelerator.accumulate(unet, text_encoder), accelerator.autocast():
                cond = text(captions, device)
                x0 = training_sample(batch, space, g_noise, device).contiguous(memory_format=layout)
                with capture_cross_attention(state.unet) if grounded else nullcontext() as probs:
                    loss = diffusion_loss(unet, noise_scheduler, x0, cond.states, cond.mask, cfg.noise, g_noise,
                                          state.step, cond.added)
                if grounded:  # token grounding: object words' cross-attention onto their masks
                    words = token_indices(tokenizer, captions, batch["ground_spans"]).to(device)
                    ground = grounding_loss(probs, batch["ground_masks"].to(device), words)
                    running_ground += ground.detach() / tc.grad_accum
                    loss = loss + tc.grounding_weight * ground
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, tc.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            running += loss.detach() / tc.grad_accum
            state.samples += tc.batch_size * world
        state.lr_schedule.step()
        state.step, n_running = state.step + 1, n_running + 1
        state.ema.update(state.unet, state.step)
        bar.update(1)
        step = state.step
        if stop.requested(accelerator):  # SIGINT/SIGTERM on any process: save this step, then stop
            end, interrupted = step, True

        if step % tc.log_every == 0 or step % tc.checkpoint_every == 0 or step == end:  # before every save
            mean_loss = accelerator.reduce(running, "mean").item() / n_running
            if not math.isfinite(mean_loss):
                last = ckpt.checkpoints(out)
                raise FloatingPointError(
                    f"loss became {mean_loss} at step {step}; stopped without saving. The last good checkpoint is "
                    f"{last[-1] if last else 'none'}: resume from it with a lower train.lr, or mixed_precision=no.")
            rate = (state.samples - seen0) / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rate:.1f}")
            logs = {"loss": mean_loss, "lr": state.lr_schedule.get_last_lr()[0], "img_per_s": rate}
            if grounded:
                logs["grounding_loss"] = accelerator.reduce(running_ground, "mean").item() / n_running
                running_ground.zero_()
            accelerator.log(logs, step=step)
            running.zero_()
            n_running, t0, seen0 = 0, time.perf_counter(), state.samples
        if step % tc.checkpoint_every == 0 or step == end:
            state.save(accelerator, out, config_to_dict(cfg), tc.keep_checkpoints)
        if accelerator.is_main_process and tc.preview_every and (step % tc.preview_every == 0 or step == tc.max_steps):
            preview(accelerator, cfg, state, parts, noise_scheduler)
        if accelerator.is_main_process and curve and (step % tc.position_every == 0 or step == tc.max_steps):
            position_curve(accelerator, cfg, state, parts, noise_scheduler)
    bar.close()
    if state.step < tc.max_steps:
        accelerator.end_training()
        if interrupted:
            raise ckpt.Interrupted(stop.signum, state.step, out / f"checkpoint-{state.step:07d}")
        return None

    # 4. export the EMA weights as a pipeline
    path = out / "pipeline"
    if accelerator.is_main_process:
        pipe = ema_pipeline(cfg, state, parts, noise_scheduler, copy.deepcopy(parts.text_encoder))
        if tc.export_dtype == "float16":  # halves the folder; sampling upcasts where it needs to
            with quiet_third_party():  # diffusers warns of any cast
                pipe.to(torch.float16)
        then = f"checkpoint-{state.step:07d} is complete: free space, then export it with --resume latest"
        with ckpt.staged_folder(path, then) as stage:  # a failed export leaves no half-written pipeline/
            (sd_pipeline(pipe) if parts.sd_export else pipe).save_pretrained(stage)
            save_config(cfg, stage / "train_config.yaml")
            write_model_card(stage, cfg, final=path, stable_diffusion=parts.sd_export)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return path


# ----------------------------------------------------------------------------------------------


def lr_lambda(cfg: RunConfig):
    w, total = cfg.train.warmup_steps, cfg.train.max_steps

    def f(step: int) -> float:  # linear warm-up, then cosine to 10%
        if step < w:
            return (step + 1) / w
        progress = min(1.0, (step - w) / max(1, total - w))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def load_start(unet, start, name: str) -> None:
    """train.init_from: `start`'s weights into `unet`. Parts the config adds that start at zero (model.pos_embed's
    projections) keep their zeros, so the model begins as the pipeline it came from; any other difference in
    the UNet's shape is an error that names it."""
    mine, theirs = unet.state_dict(), start.state_dict()
    reshaped = [f"{k} is {tuple(v.shape)} there, {tuple(mine[k].shape)} here" for k, v in theirs.items()
                if k in mine and v.shape != mine[k].shape]
    dropped = [f"{k} is not in this config's UNet" for k in theirs if k not in mine]
    not_zero = [f"{k} is new and not zero-initialised" for k, v in mine.items() if k not in theirs and v.any()]
    differ = reshaped + dropped + not_zero
    if differ:
        raise ValueError(f"train.init_from={name}: its UNet does not fit model.* ({'; '.join(differ[:3])}"
                         f"{f' and {len(differ) - 3} more' if len(differ) > 3 else ''}); set model.* as in its unet/config.json")
    unet.load_state_dict(theirs, strict=False)


def ema_pipeline(cfg: RunConfig, state: ckpt.TrainingState, parts: RunComponents, noise_scheduler,
                 text_encoder=None):
    """A T2IPipeline of the EMA weights (a copy) and the run's text encoder (or `text_encoder`) and VAE,
    sampling with DPM-Solver++ (a Stable Diffusion start: with its own scheduler)."""
    from .pipeline import T2IPipeline, make_scheduler
    scheduler = parts.scheduler or make_scheduler("dpm", noise_scheduler.config, parts.space)
    vae = getattr(parts.space, "vae", None)
    return T2IPipeline(state.ema.averaged(state.unet), text_encoder or parts.text_encoder, parts.tokenizer, scheduler,
                       caption_dropout=cfg.train.caption_dropout, vae=vae,
                       mask_padding=None if vae is None or parts.sdxl else parts.mask_padding, **(parts.sdxl or {}))


def sd_pipeline(pipe):
    """A T2IPipeline of a diffusers UNet in a VAE's latents as the Stable Diffusion (XL) pipeline diffusers opens
    without remote code."""
    from .components import sd_pipeline as of_parts
    parts = dict(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                 scheduler=pipe.scheduler)
    if pipe.text_encoder_2 is not None:
        parts.update(text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2,
                     force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt)
    return of_parts(parts)


def training_sample(batch: dict, space, generator: torch.Generator, device) -> torch.Tensor:
    """The batch's x0 (B, C, h, w) in the space the UNet denoises: its pixels in [-1, 1]; a draw from its cached
    latent distributions; or its pixels encoded by the VAE now (a draw too: the generator decides it)."""
    if "latent_mean" in batch:
        return space.from_distribution(batch["latent_mean"].to(device), batch["latent_std"].to(device), generator)
    pixels = batch["pixel_values"].to(device)
    if space.kind == "pixels":
        return pixels
    with torch.no_grad():
        return space.encode((pixels + 1) / 2, generator).float()


def frozen_dtype(accelerator) -> torch.dtype | None:
    """The dtype of frozen parts (a VAE) on a GPU under mixed precision: bf16 or fp16; elsewhere as loaded."""
    if accelerator.device.type != "cuda":
        return None
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision)


@contextmanager
def eval_pipeline(cfg: RunConfig, state: ckpt.TrainingState, parts: RunComponents, noise_scheduler):
    """The EMA pipeline in eval mode, for previews and the position curve; the text encoder trains again after."""
    text_encoder = parts.text_encoder
    was_training = text_encoder.training
    text_encoder.eval()
    pipe = ema_pipeline(cfg, state, parts, noise_scheduler)
    pipe.unet.eval()
    pipe.set_progress_bar_config(disable=True)
    try:
        yield pipe
    finally:
        text_encoder.train(was_training)


@torch.no_grad()
def preview(accelerator, cfg: RunConfig, state: ckpt.TrainingState, parts: RunComponents, noise_scheduler) -> None:
    """Images for the fixed preview prompts with the EMA weights, saved and logged to TensorBoard."""
    import numpy as np
    from PIL import Image
    with eval_pipeline(cfg, state, parts, noise_scheduler) as pipe:
        images = pipe(list(cfg.train.preview_prompts), num_inference_steps=cfg.train.preview_steps,
                      generator=torch.Generator().manual_seed(0), output_type="np").images
    grid = np.concatenate(list(images), axis=1)
    folder = Path(cfg.train.output_dir) / "previews"
    folder.mkdir(exist_ok=True)
    Image.fromarray((grid * 255).round().astype("uint8")).resize((grid.shape[1] * 4, grid.shape[0] * 4), 0).save(
        folder / f"step-{state.step:07d}.png")
    if cfg.train.report_to == "tensorboard":
        accelerator.get_tracker("tensorboard", unwrap=True).add_image("previews", grid, state.step, dataformats="HWC")
    elif cfg.train.report_to == "wandb":
        import wandb
        accelerator.get_tracker("wandb", unwrap=True).log({"previews": wandb.Image(grid)}, step=state.step)


@torch.no_grad()
def position_curve(accelerator, cfg: RunConfig, state: ckpt.TrainingState, parts: RunComponents,
                   noise_scheduler) -> dict:
    """One point of the position curve with the EMA weights (t2i/probe.py): the probe ratio at t = T - 1 and
    the in-cell share of 18 fixed one-object prompts; logged to TensorBoard, appended to position.jsonl in the
    run folder and printed."""
    from .probe import in_cell_share, probe_table
    with eval_pipeline(cfg, state, parts, noise_scheduler) as pipe:
        _, ratio = probe_table(pipe, t=noise_scheduler.config.num_train_timesteps - 1)
        in_cell, found = in_cell_share(pipe, steps=cfg.train.preview_steps)
        unseen, _ = in_cell_share(pipe, steps=cfg.train.preview_steps, holdout_wording=cfg.data.holdout_wording)
    point = {"step": state.step, "probe_ratio": round(ratio, 4), "in_cell": round(in_cell, 4), "found": round(found, 4),
             "in_cell_unseen_wording": round(unseen, 4)}
    accelerator.log({f"position/{k}": v for k, v in point.items() if k != "step"}, step=state.step)
    with open(Path(cfg.train.output_dir) / "position.jsonl", "a") as f:
        f.write(json.dumps(point) + "\n")
    tqdm.write(f"step {state.step}: position probe ratio {ratio:.2f} (1.00: the words move nothing), "
               f"{in_cell:.0%} of one-object prompts in their cell ({unseen:.0%} in unseen wordings), {found:.0%} found")
    return point


def tracker(report_to: str) -> str | None:
    """accelerate's log_with for train.report_to; wandb only when installed."""
    if report_to == "none":
        return None
    if report_to == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ValueError("train.report_to=wandb needs wandb: `pip install wandb`, or use tensorboard or none")
    return report_to


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _hparams(cfg: RunConfig) -> dict:
    """The config as TensorBoard hparams, which take scalars only."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(config_to_dict(cfg)).items()}
