"""t2i.settings: the one owner of a sampling run's defaults, limits, check and seeds, and the front-ends
that derive from it giving the same image for the same settings."""
import math
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from t2i.settings import (DEFAULTS, QUICK, SCHEDULERS, SERVER_LIMITS, SamplingLimits, SamplingSettings,
                          check_word_weight, generators)


def test_the_same_seed_and_settings_give_the_same_image_through_every_front_end(model_dir, tmp_path):
    """The CLI, the explorer's Generate handler and evaluate's sampling call, at seed 11, 3 ddim steps,
    guidance 2.5, 16 px: the same pixels."""
    from t2i.cli import main
    from t2i.explorer import Explorer, Request
    from t2i.pipeline import load_pipeline
    from t2i.scoring import EvalConfig, sample_scenes
    prompt, seed = "a red circle above a blue square", 11
    assert main(["generate", prompt, "--model", str(model_dir), "--steps", "3", "--guidance", "2.5", "--scheduler",
                 "ddim", "--seed", str(seed), "--upscale", "1", "--device", "cpu", "--out", str(tmp_path)]) == 0
    cli = np.asarray(Image.open(next(tmp_path.glob("*.png"))).convert("RGB"))
    (tmp_path / "files").mkdir()
    explorer = Explorer([str(model_dir)], files_dir=tmp_path / "files")
    request = Request(prompt, seed=seed, steps=3, guidance=2.5, scheduler="ddim")
    served = np.asarray(explorer.generate(request).images[0])
    config = EvalConfig(steps=3, guidance=2.5, scheduler="ddim")
    evaluated = sample_scenes(load_pipeline(model_dir), [prompt], [seed], config, 16).images[0]
    evaluated = (evaluated * 255).round().astype(np.uint8)
    assert cli.shape == (16, 16, 3) and cli.std() > 0
    assert np.array_equal(cli, served) and np.array_equal(cli, evaluated)


def test_each_default_is_written_once_and_the_front_ends_read_it():
    import inspect

    from t2i.explorer import Limits, Request
    from t2i.pipeline import T2IPipeline
    from t2i.scoring import EvalConfig
    call = inspect.signature(T2IPipeline.__call__).parameters
    assert call["num_inference_steps"].default == DEFAULTS.steps and call["guidance_scale"].default == DEFAULTS.guidance
    assert (Request("x").steps, Request("x").guidance) == (QUICK.steps, QUICK.guidance)
    assert (EvalConfig().steps, EvalConfig().guidance, EvalConfig().scheduler) == (QUICK.steps, QUICK.guidance, None)
    assert Limits().sampling == replace(SERVER_LIMITS, max_side=None)     # the side: per model (Explorer)


def test_the_command_line_offers_exactly_the_schedulers_and_shows_the_defaults():
    from t2i.cli import build_parser
    sub = build_parser()._subparsers._group_actions[0].choices
    for command, base in (("generate", DEFAULTS), ("heatmap", DEFAULTS), ("effect", DEFAULTS), ("evaluate", QUICK)):
        options = {a.dest: a for a in sub[command]._actions}
        assert options["scheduler"].choices == list(SCHEDULERS)
        assert f"(default: {base.steps})" in options["steps"].help
        assert f"(default: {base.guidance})" in options["guidance"].help


@pytest.mark.parametrize("settings, limits, message", [
    (SamplingSettings(steps=0), SamplingLimits(), "steps must be a whole number at least 1, got 0"),
    (SamplingSettings(steps=2.5), SamplingLimits(), "steps must be a whole number"),
    (SamplingSettings(steps=51), SERVER_LIMITS, "steps must be a whole number from 1 to 50"),
    (SamplingSettings(num_images=5), SERVER_LIMITS, "num_images must be a whole number from 1 to 4"),
    (SamplingSettings(seed=-1), SamplingLimits(), "seed must be a whole number from 0"),
    (SamplingSettings(guidance=math.nan), SamplingLimits(), "guidance must be a finite number"),
    (SamplingSettings(guidance=True), SamplingLimits(), "guidance must be a finite number"),
    (SamplingSettings(guidance=0.5), SERVER_LIMITS, "guidance must be a number from 1 (none) to 30"),
    (SamplingSettings(scheduler="fast"), SamplingLimits(), "unknown scheduler 'fast'; choose one of ddpm, ddim"),
    (SamplingSettings(height=0), SamplingLimits(), "height must be a whole number at least 1, got 0"),
    (SamplingSettings(width=200), SERVER_LIMITS, "width must be a whole number from 1 to 128, got 200"),
])
def test_check_names_the_setting_and_its_bounds(settings, limits, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        settings.check(limits)


def test_check_against_a_model_bounds_steps_and_size_and_makes_whole_numbers_ints(pipe):
    ok = SamplingSettings(steps=4.0, num_images=2.0, height=8.0, width=32, guidance=2).check(SamplingLimits(), pipe)
    assert (ok.steps, ok.num_images, ok.height, ok.guidance) == (4, 2, 8, 2.0)
    assert isinstance(ok.steps, int) and isinstance(ok.height, int) and isinstance(ok.guidance, float)
    names = {"steps": "--steps", "height": "--height"}
    with pytest.raises(ValueError, match="--steps must be a whole number from 2 to 999, got 1000"):
        SamplingSettings(steps=1000).check(SamplingLimits(), pipe, names)
    with pytest.raises(ValueError, match=r"--height must be a multiple of 2 from 2 to 128 px \(8x the model's"):
        SamplingSettings(height=130).check(SamplingLimits(), pipe, names)
    with pytest.raises(ValueError, match="height must be a multiple of 2 from 2 to 128 px, got 7"):
        SamplingSettings(height=7).check(SERVER_LIMITS, pipe)


def test_image_i_draws_from_seed_plus_i_and_one_seed_gives_one_noise():
    settings = SamplingSettings(seed=40)
    assert settings.seeds(3) == [40, 41, 42] and settings.seeds(2, first=5) == [45, 46]
    a, b = generators([7, 7]), generators([8])
    import torch
    x = [torch.randn(4, generator=g) for g in a + b]
    assert torch.equal(x[0], x[1]) and not torch.equal(x[0], x[2])


def test_pipeline_kwargs_reach_the_pipeline_and_a_scheduler_is_per_call(pipe):
    import torch
    settings = SamplingSettings(steps=3, guidance=1.0, scheduler="ddim", num_images=2)
    out = pipe("a red circle", **settings.pipeline_kwargs(), generator=generators(settings.seeds(2)),
               output_type="np").images
    assert out.shape == (2, 16, 16, 3) and type(pipe.scheduler).__name__ == "DDPMScheduler"  # its own, untouched
    direct = pipe("a red circle", num_inference_steps=3, guidance_scale=1.0, scheduler="ddim",
                  generator=[torch.Generator().manual_seed(1)], output_type="np").images
    assert np.abs(out[1] - direct[0]).max() < 1e-5    # image 1 from seed 1 (in a batch of 2: float sums differ)


def test_word_weights_are_checked_by_one_rule():
    assert check_word_weight("red", 2) == 2.0
    with pytest.raises(ValueError, match=r"the weight of 'red' must be a finite number >= 0"):
        check_word_weight("red", -1)
    with pytest.raises(ValueError, match="must be a finite number from 0 to 3"):
        check_word_weight("red", 3.5, SERVER_LIMITS)
    with pytest.raises(ValueError, match="must be a finite number"):
        check_word_weight("red", True)


def test_settings_load_without_torch():
    """The CLI builds its options from t2i.settings before torch loads (OMP_WAIT_POLICY is read then)."""
    import subprocess
    import sys
    code = "import sys, t2i.settings; assert 'torch' not in sys.modules, 'torch loaded'"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("scheduler, least", [("euler", 2), ("euler-a", 2), ("heun", 4), ("ddim", 3), ("ddpm", 2),
                                              ("dpm", 1), ("unipc", 1)])
def test_each_scheduler_has_its_fewest_steps_and_says_so(scheduler, least, model_dir, tmp_path, capsys):
    """Below its minimum a scheduler gives a flat grey or noisy image with rc 0; the settings, the pipeline and the
    command line refuse it in one line naming the scheduler, and take the minimum itself."""
    from conftest import tiny_pipeline

    from t2i.cli import main
    if least > 1:
        with pytest.raises(ValueError, match=rf"^steps must be a whole number at least {least} for the {scheduler} "
                                             r"scheduler \(fewer give a flat grey or noisy image\), got"):
            SamplingSettings(steps=least - 1, scheduler=scheduler).check()
        with pytest.raises(ValueError, match=rf"num_inference_steps must be between {least} and"):
            tiny_pipeline()("a red circle", num_inference_steps=least - 1, scheduler=scheduler)
        assert main(["generate", "x", "--model", str(model_dir), "--scheduler", scheduler, "--steps", str(least - 1),
                     "--out", str(tmp_path)]) == 2
        assert (f"--steps must be a whole number at least {least} for the {scheduler} scheduler"
                in capsys.readouterr().err)
    assert SamplingSettings(steps=least, scheduler=scheduler).check().steps == least
    image = tiny_pipeline()("a red circle", num_inference_steps=least, scheduler=scheduler, output_type="np").images
    assert image.shape == (1, 16, 16, 3)


def test_seeds_above_2_to_the_53_are_whole_numbers(model_dir, tmp_path, capsys):
    """2**53 + 1 and 2**64 - 1 are whole numbers (not refused with 'from 0 to 18446744073709551615, got
    9007199254740993'); a float seed must still be whole; generate writes the seed it was given."""
    from t2i.cli import main
    from t2i.settings import is_whole
    for seed in (2**53 + 1, 2**64 - 1):
        assert SamplingSettings(seed=seed).check().seed == seed
        assert is_whole(seed)
    assert not is_whole(1.5) and is_whole(2.0) and not is_whole(True)
    with pytest.raises(ValueError, match="got 1.5"):
        SamplingSettings(seed=1.5).check()
    for command in (["generate", "a red circle"], ["heatmap", "a red circle"]):
        out = tmp_path / command[0]
        assert main([*command, "--model", str(model_dir), "--steps", "2", "--seed", str(2**53 + 1), "--out",
                     str(out)]) == 0, capsys.readouterr().err
    assert Image.open(tmp_path / "generate" / f"a-red-circle-{2**53 + 1}.png").text["seed"] == str(2**53 + 1)
