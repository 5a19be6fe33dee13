# The training loop on accelerate: one CPU, one GPU, or many (`accelerate launch`). Flat and short;
# data order, EMA, checkpoints, previews and export are named functions beside it.
from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm
from transformers import CLIPTokenizer

from . import checkpoint as ckpt
from .config import RunConfig, config_to_dict, save_config
from .diffusion import diffusion_loss, make_noise_scheduler
from .grounding import capture_cross_attention, grounding_loss, token_indices
from .text import build_offline_text_encoder, build_offline_tokenizer, load_pretrained_clip, tokenize
from .unet import build_unet

# ----------------------------------------------------------------------------------------------
# Data: a global sample counter k -> dataset index, so the data position is one integer.


def build_dataset(cfg: RunConfig) -> tuple[Dataset, list[str]]:
    """The training set and the caption corpus the offline tokenizer is learned from."""
    d = cfg.data
    if d.kind == "shapes":
        from .data.shapes import ShapesDataset, caption_corpus, shapes_world
        world = shapes_world(d, "train")
        return ShapesDataset(world, length=2**31 - 1, grounding=cfg.train.grounding_weight > 0), caption_corpus(world)
    from .data.folder import ImageFolderDataset
    ds = ImageFolderDataset(d.root, size=d.size, crop=d.crop, flip=d.flip, seed=d.seed, caption_column=d.caption_column,
                            grounding=cfg.train.grounding_weight > 0)
    return ds, list(ds.captions)


class _Epoched(Dataset):
    """Adapts a dataset to (index, epoch) keys so that random crops and flips replay exactly on resume."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, key):
        index, epoch = key
        if hasattr(self.ds, "set_epoch"):
            self.ds.set_epoch(epoch)
        return self.ds[index]


class CounterSampler(Sampler):
    """Yields the (index, epoch) keys of global samples start, start+1, ... owned by this process.
    Sample k lives in epoch k // N at position k % N of a permutation seeded by (seed, epoch);
    process r of W takes, in each global micro-batch of W*b samples, the slice [r*b, (r+1)*b)."""

    def __init__(self, n: int, batch: int, rank: int, world: int, seed: int, start: int = 0, shuffle: bool = True):
        self.n, self.b, self.rank, self.world, self.seed, self.start = n, batch, rank, world, seed, start
        self.shuffle = shuffle and n <= 10_000_000  # a procedural set is already random: no permutation
        self._perm: tuple[int, torch.Tensor] | None = None

    def key(self, k: int) -> tuple[int, int]:
        epoch, pos = divmod(k, self.n)
        if not self.shuffle:
            return pos, epoch
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return int(self._perm[1][pos]), epoch

    def __iter__(self):
        k = self.start
        while True:
            base = k // (self.world * self.b) * self.world * self.b
            for j in range(self.b):
                yield self.key(base + self.rank * self.b + j)
            k = base + self.world * self.b


# ----------------------------------------------------------------------------------------------


def data_stream(dataset, cfg: RunConfig, rank: int = 0, world: int = 1, start: int = 0):
    """Batches of this process from global sample `start` on, in the order CounterSampler fixes."""
    b = cfg.train.batch_size
    sampler = CounterSampler(len(dataset), b, rank, world, cfg.train.seed, start=start)
    return iter(DataLoader(_Epoched(dataset), batch_size=b, sampler=sampler, num_workers=cfg.data.num_workers,
                           drop_last=True))


class EMA:
    """Exponential moving average of parameters, with the usual warm-up: decay_t = min(decay, (1+t)/(10+t))."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.float(), 1 - d)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, model: torch.nn.Module) -> None:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})

    def averaged(self, model: torch.nn.Module) -> torch.nn.Module:
        """A copy of `model` holding the averaged weights; `model` is left as it is."""
        import copy
        average = copy.deepcopy(model)
        self.copy_to(average)
        return average


def build_text(cfg: RunConfig, corpus: list[str], run_dir: Path | None = None):
    """Tokenizer and text encoder. An offline tokenizer is learned once per run and kept in
    `{run_dir}/tokenizer`, so a resumed run reads the same vocabulary even if the corpus changed."""
    if cfg.text.pretrained:
        tokenizer, encoder = load_pretrained_clip(cfg.text.pretrained)
    else:
        saved = run_dir / "tokenizer" if run_dir is not None else None
        if saved is not None and (saved / "tokenizer.json").exists():
            tokenizer = CLIPTokenizer.from_pretrained(saved)
        else:
            tokenizer = build_offline_tokenizer(corpus, cfg.text.max_length)
        encoder = build_offline_text_encoder(tokenizer, cfg.text.width, cfg.text.layers, cfg.text.heads)
    encoder.requires_grad_(cfg.text.trainable)
    return tokenizer, encoder


def lr_lambda(cfg: RunConfig):
    w, total = cfg.train.warmup_steps, cfg.train.max_steps

    def f(step: int) -> float:  # linear warm-up, then cosine to 10%
        if step < w:
            return (step + 1) / w
        progress = min(1.0, (step - w) / max(1, total - w))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))
    return f


class TextStates:
    """Captions -> (states, mask). A frozen encoder's states are cached per caption."""

    def __init__(self, tokenizer, encoder, trainable: bool, cache_size: int = 100_000):
        self.tokenizer, self.encoder, self.trainable = tokenizer, encoder, trainable
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.cache_size = cache_size

    def __call__(self, captions: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.trainable:
            batch = tokenize(self.tokenizer, captions)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            return self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask
        todo = sorted({c for c in captions if c not in self.cache})
        if todo:
            batch = tokenize(self.tokenizer, todo)
            with torch.no_grad():
                states = self.encoder(input_ids=batch["input_ids"].to(device),
                                      attention_mask=batch["attention_mask"].to(device)).last_hidden_state
            if len(self.cache) + len(todo) > self.cache_size:
                self.cache.clear()
            for c, s, m in zip(todo, states, batch["attention_mask"].to(device)):
                self.cache[c] = (s, m)
        return (torch.stack([self.cache[c][0] for c in captions]), torch.stack([self.cache[c][1] for c in captions]))


# ----------------------------------------------------------------------------------------------


def train(cfg: RunConfig, resume: str | None = None, stop_at: int | None = None) -> Path | None:
    """Train and export a T2IPipeline with the EMA weights to `{output_dir}/pipeline`; returns that path.
    `stop_at` ends the session early at that step, after a checkpoint, to be resumed later (returns None)."""
    tc, out = cfg.train, Path(cfg.train.output_dir)
    no_accelerator = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, gradient_accumulation_steps=tc.grad_accum,
                              log_with="tensorboard", project_dir=str(out), cpu=no_accelerator)  # cpu: gloo for >1 proc
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes

    # 1. components, identically initialised on every process
    set_seed(tc.seed)
    dataset, corpus = build_dataset(cfg)
    tokenizer, text_encoder = build_text(cfg, corpus, out if resume else None)
    unet = build_unet(**dataclasses.asdict(cfg.model), sample_size=cfg.data.size,
                      cross_attention_dim=text_encoder.config.hidden_size)
    noise_scheduler = make_noise_scheduler(cfg.noise)
    layout = torch.channels_last if tc.channels_last else torch.contiguous_format
    unet.to(memory_format=layout)
    ema = EMA(unet, tc.ema_decay)
    params = list(unet.parameters()) + (list(text_encoder.parameters()) if cfg.text.trainable else [])
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay, fused=device.type == "cuda")
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    g_noise = torch.Generator(device=device).manual_seed(tc.seed * 1000 + rank)   # timesteps and noise
    g_drop = torch.Generator().manual_seed(tc.seed * 1000 + rank + 500)           # caption dropout

    # 2. resume: weights, EMA, optimiser, LR schedule, step, RNG and data position
    step, samples = 0, 0
    if resume:
        step, samples = load_training_state(ckpt.resolve_resume(out, resume), unet, text_encoder, ema, optimizer,
                                            lr_schedule, (g_noise, g_drop), rank, cfg)
    if cfg.text.trainable:
        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    else:  # a frozen module has nothing for DDP to synchronise
        unet, optimizer = accelerator.prepare(unet, optimizer)
        text_encoder = text_encoder.to(device).eval()
    text = TextStates(tokenizer, text_encoder, cfg.text.trainable)
    loader = data_stream(dataset, cfg, rank, world, start=samples)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        if not cfg.text.pretrained:
            tokenizer.save_pretrained(out / "tokenizer")
        accelerator.init_trackers("tensorboard", config=_flat(config_to_dict(cfg)))
        print(f"training {_count(unet)/1e6:.2f}M UNet + {_count(text_encoder)/1e6:.2f}M text encoder params "
              f"({'trained' if cfg.text.trainable else 'frozen'}) on {world} x {device}, from step {step}")

    # 3. the loop: one optimiser step = grad_accum micro-batches on every process
    bar = tqdm(total=tc.max_steps, initial=step, disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    running, n_running, t0, seen0 = torch.zeros((), device=device), 0, time.perf_counter(), samples
    running_ground = torch.zeros((), device=device)
    unet.train(), text_encoder.train(cfg.text.trainable)
    end = min(tc.max_steps, stop_at or tc.max_steps)
    while step < end:
        for _ in range(tc.grad_accum):
            batch = next(loader)
            captions = [c if torch.rand((), generator=g_drop) >= cfg.noise.uncond_prob else "" for c in batch["text"]]
            with accelerator.accumulate(unet, text_encoder), accelerator.autocast():
                states, mask = text(captions, device)
                x0 = batch["pixel_values"].to(device).contiguous(memory_format=layout)
                if tc.grounding_weight > 0:
                    with capture_cross_attention(accelerator.unwrap_model(unet)) as probs:
                        loss = diffusion_loss(unet, noise_scheduler, x0, states, mask, cfg.noise, g_noise)
                    words = token_indices(tokenizer, captions, batch["ground_spans"]).to(device)
                    ground = grounding_loss(probs, batch["ground_masks"].to(device), words)
                    running_ground += ground.detach() / tc.grad_accum
                    loss = loss + tc.grounding_weight * ground
                else:
                    loss = diffusion_loss(unet, noise_scheduler, x0, states, mask, cfg.noise, g_noise)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, tc.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            running += loss.detach() / tc.grad_accum
            samples += tc.batch_size * world
        lr_schedule.step()
        step, n_running = step + 1, n_running + 1
        ema.update(accelerator.unwrap_model(unet), step)
        bar.update(1)

        if step % tc.log_every == 0 or step % tc.checkpoint_every == 0 or step == end:  # before every save
            mean_loss = accelerator.reduce(running, "mean").item() / n_running
            if not math.isfinite(mean_loss):
                last = ckpt.checkpoints(out)
                raise FloatingPointError(
                    f"loss became {mean_loss} at step {step}; stopped without saving. The last good checkpoint is "
                    f"{last[-1] if last else 'none'}: resume from it with a lower train.lr, or mixed_precision=no.")
            rate = (samples - seen0) / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rate:.1f}")
            logs = {"loss": mean_loss, "lr": lr_schedule.get_last_lr()[0], "img_per_s": rate}
            if tc.grounding_weight > 0:
                logs["grounding_loss"] = accelerator.reduce(running_ground, "mean").item() / n_running
                running_ground.zero_()
            accelerator.log(logs, step=step)
            running.zero_()
            n_running, t0, seen0 = 0, time.perf_counter(), samples
        if step % tc.checkpoint_every == 0 or step == end:
            save_training_state(accelerator, out, step, samples, unet, text_encoder, ema, optimizer, lr_schedule,
                                (g_noise, g_drop), cfg)
        if accelerator.is_main_process and tc.preview_every and (step % tc.preview_every == 0 or step == tc.max_steps):
            preview(accelerator, cfg, out, step, unet, text_encoder, tokenizer, ema, noise_scheduler)
    bar.close()
    if step < tc.max_steps:
        accelerator.end_training()
        return None

    # 4. export the EMA weights as a pipeline
    path = out / "pipeline"
    if accelerator.is_main_process:
        export_pipeline(cfg, accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder), tokenizer,
                        ema, noise_scheduler, path)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return path


# ----------------------------------------------------------------------------------------------


def save_training_state(accelerator, out, step, samples, unet, text_encoder, ema, optimizer, lr_schedule,
                        generators, cfg) -> None:
    """Each process stages its RNG; the main process writes the rest and renames the folder into place."""
    rank = accelerator.process_index
    weights = torch.stack([p.detach().double().sum() for p in accelerator.unwrap_model(unet).parameters()]).sum()
    spread = accelerator.gather(weights[None].float()).float()
    if (spread - spread[0]).abs().max() > 1e-3 * spread[0].abs().clamp(min=1):
        raise RuntimeError(f"processes hold different weights at step {step} ({spread.tolist()}): not saving")
    stage = ckpt.staging_dir(out, step)
    if accelerator.is_main_process:
        stage.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    rng = {"torch": torch.get_rng_state(), "noise": generators[0].get_state(), "drop": generators[1].get_state()}
    ckpt.save_file(rng, str(stage / f"rng-{rank}.safetensors"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        opt_tensors, opt_meta = ckpt.optimizer_to_tensors(optimizer.state_dict())
        tensors = {"unet": accelerator.unwrap_model(unet).state_dict(), "ema": ema.shadow, "optimizer": opt_tensors}
        if cfg.text.trainable:
            tensors["text_encoder"] = accelerator.unwrap_model(text_encoder).state_dict()
        schedule = {k: v for k, v in lr_schedule.state_dict().items() if k != "lr_lambdas"}
        state = {"step": step, "samples": samples, "world_size": accelerator.num_processes, "optimizer": opt_meta,
                 "lr_schedule": schedule, "config": config_to_dict(cfg)}
        ckpt.write_checkpoint(out, step, tensors, state, cfg.train.keep_checkpoints)
    accelerator.wait_for_everyone()


def load_training_state(path, unet, text_encoder, ema, optimizer, lr_schedule, generators, rank, cfg):
    tensors, state = ckpt.read_checkpoint(path)
    try:
        unet.load_state_dict(tensors["unet"])
        if cfg.text.trainable:
            text_encoder.load_state_dict(tensors["text_encoder"])
    except (RuntimeError, KeyError) as e:
        raise ValueError(f"checkpoint {path} does not match the model in this config ({str(e).splitlines()[0]}); "
                         f"resume with the run's own config ({path}/../config.yaml)") from None
    ema.shadow = {k: v.float() for k, v in tensors["ema"].items()}
    optimizer.load_state_dict(ckpt.optimizer_from_tensors(tensors["optimizer"], state["optimizer"]))
    lr_schedule.load_state_dict({**state["lr_schedule"], "lr_lambdas": [None]})
    rng = tensors.get(f"rng-{rank}")
    if rng is None:
        raise ValueError(f"checkpoint {path} has no RNG state for process {rank}: resume with the same number of "
                         f"processes ({state['world_size']})")
    torch.set_rng_state(rng["torch"])
    generators[0].set_state(rng["noise"].to(generators[0].get_state().device))
    generators[1].set_state(rng["drop"])
    return state["step"], state["samples"]


def build_pipeline(cfg, unet, text_encoder, tokenizer, noise_scheduler):
    from .pipeline import T2IPipeline, make_scheduler
    scheduler = make_scheduler("dpm", noise_scheduler.config)
    return T2IPipeline(unet, text_encoder, tokenizer, scheduler, uncond_dropout=cfg.noise.uncond_prob)


@torch.no_grad()
def preview(accelerator, cfg, out, step, unet, text_encoder, tokenizer, ema, noise_scheduler) -> None:
    """Images for the fixed preview prompts with the EMA weights, saved and logged to TensorBoard."""
    import numpy as np
    from PIL import Image
    model = ema.averaged(accelerator.unwrap_model(unet)).eval()
    encoder = accelerator.unwrap_model(text_encoder)
    was_training = encoder.training
    pipe = build_pipeline(cfg, model, encoder.eval(), tokenizer, noise_scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(list(cfg.train.preview_prompts), num_inference_steps=cfg.train.preview_steps,
                  generator=torch.Generator().manual_seed(0), output_type="np").images
    encoder.train(was_training)
    grid = np.concatenate(list(images), axis=1)
    (out / "previews").mkdir(exist_ok=True)
    Image.fromarray((grid * 255).round().astype("uint8")).resize((grid.shape[1] * 4, grid.shape[0] * 4), 0).save(
        out / "previews" / f"step-{step:07d}.png")
    tracker = accelerator.get_tracker("tensorboard", unwrap=True)
    tracker.add_image("previews", grid, step, dataformats="HWC")


def export_pipeline(cfg, unet, text_encoder, tokenizer, ema, noise_scheduler, path: Path) -> None:
    import copy
    model = ema.averaged(unet)
    encoder = copy.deepcopy(text_encoder)
    if cfg.train.export_dtype == "float16":  # halves the folder; sampling upcasts where it needs to
        model, encoder = model.half(), encoder.half()
    pipe = build_pipeline(cfg, model, encoder, tokenizer, noise_scheduler)
    pipe.save_pretrained(path)
    save_config(cfg, Path(path) / "train_config.yaml")


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _flat(d: dict, prefix: str = "") -> dict:
    """TensorBoard hparams take scalars only."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
