"""t2i train-vae: a tiny AutoencoderKL trained on the shapes world lowers its reconstruction error, exports a
folder that AutoencoderKL.from_pretrained opens with a scaling factor that gives unit-variance latents,
atomically, and the command turns bad input into one line."""
import json
from pathlib import Path

import pytest
import torch

from t2i.cli import main
from t2i.vae import (VAETrainConfig, build_vae, calibrate, claim_out, export_vae, reconstruction_error, train_vae,
                     vae_datasets)

TINY = dict(size=16, steps=40, batch_size=8, lr=2e-3, warmup_steps=5, block_out_channels=(16, 32), norm_num_groups=8,
            holdout=16, calibration_batches=4, report_to="none")  # factor 2: 8 x 8 x 4 latents; a few seconds
TINY_CLI = ["--size", "16", "--steps", "12", "--batch-size", "4"]


def held_out(cfg):
    return [b["pixel_values"] for b in torch.utils.data.DataLoader(vae_datasets(cfg)[1], batch_size=8)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cfg = VAETrainConfig(out=str(tmp_path_factory.mktemp("vae") / "run"), **TINY)
    return cfg, train_vae(cfg, progress=False)


def test_training_lowers_the_reconstruction_error(trained):
    cfg, report = trained
    before = reconstruction_error(build_vae(cfg).eval(), held_out(cfg))  # the same initialisation, untrained
    assert report["mean_abs"] < 0.5 * before["mean_abs"]
    assert report["psnr"] > before["psnr"] + 5
    assert report["held_out_images"] == 16 and report["images_per_second"] > 0


def test_export_opens_and_its_scaling_factor_gives_unit_variance(trained):
    from diffusers import AutoencoderKL

    from t2i.image_space import LatentSpace
    cfg, report = trained
    vae = AutoencoderKL.from_pretrained(f"{cfg.out}/vae").eval()
    assert vae.config.scaling_factor == pytest.approx(report["scaling_factor"])
    assert json.loads((Path(cfg.out) / "vae" / "train_vae.json").read_text())["config"]["size"] == 16
    x = torch.cat(held_out(cfg))                                       # scenes the calibration never saw
    with torch.no_grad():
        z = LatentSpace(vae).encode((x + 1) / 2, generator=torch.Generator().manual_seed(1))  # what the trainer draws
    assert z.shape == (16, 4, 8, 8)
    assert z.std().item() == pytest.approx(1.0, abs=0.15)
    assert reconstruction_error(vae, held_out(cfg))["psnr"] == pytest.approx(report["psnr"], abs=1e-4)
    assert (Path(cfg.out) / "reconstructions.png").is_file()


def test_calibration_is_one_over_the_latent_std():
    vae = build_vae(VAETrainConfig(out="unused", **TINY)).eval()
    batches = [torch.rand(4, 3, 16, 16) * 2 - 1 for _ in range(3)]
    scaling, std, _ = calibrate(vae, batches, torch.Generator().manual_seed(0))
    z = torch.cat([vae.encode(b).latent_dist.sample(torch.Generator().manual_seed(0)) for b in batches[:1]])
    assert scaling == pytest.approx(1 / std)
    assert (z * scaling).std().item() == pytest.approx(1.0, abs=0.2)


def test_the_export_is_atomic(tmp_path, monkeypatch):
    vae = build_vae(VAETrainConfig(out="unused", **TINY))
    folder = tmp_path / "vae"

    def half_written(self, stage, **kwargs):
        stage.mkdir()
        (stage / "config.json").write_text("{}")
        raise OSError("disk gone mid-save")
    monkeypatch.setattr(type(vae), "save_pretrained", half_written)
    with pytest.raises(OSError, match="mid-save"):
        export_vae(vae, folder, {})
    assert list(tmp_path.iterdir()) == []                              # no folder, no staging left
    monkeypatch.undo()
    export_vae(vae, folder, {"run": 1})
    monkeypatch.setattr(type(vae), "save_pretrained", half_written)
    with pytest.raises(OSError):
        export_vae(vae, folder, {"run": 2})
    assert json.loads((folder / "train_vae.json").read_text()) == {"run": 1}  # the earlier export stays whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vae"]


def test_training_is_deterministic_under_a_seed(tmp_path):
    few = {**TINY, "steps": 3, "holdout": 4, "calibration_batches": 1}
    a = train_vae(VAETrainConfig(out=str(tmp_path / "a"), **few), progress=False)
    b = train_vae(VAETrainConfig(out=str(tmp_path / "b"), **few), progress=False)
    assert (a["mean_abs"], a["scaling_factor"]) == (b["mean_abs"], b["scaling_factor"])


def test_an_image_folder_trains_with_its_last_images_held_out(tmp_path):
    from t2i.data.shapes import ShapesConfig, write_image_folder
    write_image_folder(ShapesConfig(size=16), 12, tmp_path / "images", progress=False)
    cfg = VAETrainConfig(out=str(tmp_path / "run"), data=str(tmp_path / "images"), **{**TINY, "steps": 2})
    train, held = vae_datasets(cfg)
    assert (len(train), len(held)) == (11, 1)
    assert train_vae(cfg, progress=False)["held_out_images"] == 1


@pytest.mark.parametrize("argv, says", [
    (["--size", "30"], "--size 30 is not a multiple of the VAE's factor 4"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--kl-weight", "-1"], "--kl-weight must be >= 0"),
    (["--data", "/no/such/folder"], "--data /no/such/folder: no such folder"),
])
def test_bad_input_is_one_line(tmp_path, capsys, argv, says):
    assert main(["train-vae", "--out", str(tmp_path / "run"), *argv]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_out_refuses_foreign_files_and_an_earlier_vae_without_overwrite(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="did not write \\(notes.txt\\)"):
        claim_out(tmp_path / "mine", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    claim_out(tmp_path / "run", overwrite=False)                       # a new folder: taken and marked
    (tmp_path / "run" / "vae").mkdir()
    with pytest.raises(ValueError, match="pass --overwrite"):
        claim_out(tmp_path / "run", overwrite=False)
    claim_out(tmp_path / "run", overwrite=True)
    assert (tmp_path / "run" / "vae").is_dir()                         # replaced only when a new one is complete


def test_cli_end_to_end(tmp_path, capsys):
    from diffusers import AutoencoderKL
    out = tmp_path / "run"
    assert main(["train-vae", "--out", str(out), *TINY_CLI]) == 0
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "scaling_factor" in printed and f"model.vae={out / 'vae'}" in printed
    assert AutoencoderKL.from_pretrained(out / "vae").config.sample_size == 16
    assert (out / "tensorboard").is_dir() and (out / "reconstructions.png").is_file()
    assert main(["train-vae", "--out", str(out), *TINY_CLI]) == 2      # an earlier VAE: refused...
    assert "--overwrite" in capsys.readouterr().err
    assert main(["train-vae", "--out", str(out), *TINY_CLI, "--overwrite", "--report-to", "none"]) == 0  # ...or replaced


def test_an_interrupted_run_exports_nothing(tmp_path, capsys, monkeypatch):
    import t2i.vae

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(t2i.vae, "reconstruction_error", interrupt)  # Ctrl-C after training, before the export
    assert main(["train-vae", "--out", str(tmp_path / "run"), *TINY_CLI, "--report-to", "none"]) == 130
    assert "no VAE was exported" in capsys.readouterr().err
    assert not (tmp_path / "run" / "vae").exists()
