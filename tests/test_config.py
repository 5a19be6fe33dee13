from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from t2i.config import RunConfig, config_to_dict, load_config
from t2i.unet import unet_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    kw = unet_config(**asdict(cfg.model), sample_size=cfg.data.size, cross_attention_dim=64)
    assert kw["sample_size"] == cfg.data.size


def test_overrides_types_and_round_trip(tmp_path):
    cfg = load_config(CONFIGS[0], ["train.lr=3e-4", "data.holdout_pairs=[red circle]", "text.pretrained=/x"])
    assert cfg.train.lr == 3e-4 and cfg.data.holdout_pairs == ("red circle",) and not cfg.text.trainable
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("override, message", [
    (["train.lrr=1"], "unknown config key 'train.lrr'; did you mean 'train.lr'"),
    (["trian.lr=1"], "did you mean 'train'"),
    (["train.max_steps=many"], "'train.max_steps' takes a int"),
    (["noise.prediction_type=x0"], "prediction_type must be"),
    (["data.kind=folder"], "needs data.root"),
    (["train.lr"], "must look like section.key=value"),
    (["noise.uncond_prob=0.1"], "'noise.uncond_prob' is now 'train.caption_dropout'"),
    (["train.caption_dropout=1"], r"train.caption_dropout must be in \[0, 1\)"),
    (["model.preset=huge"], None),
])
def test_bad_config_is_a_clear_error(override, message):
    if message is None:
        cfg = load_config(None, override)
        with pytest.raises(ValueError, match=r"unknown UNet preset 'huge' \(model.preset\)"):
            unet_config(**asdict(cfg.model), sample_size=32, cross_attention_dim=64)
        return
    with pytest.raises(ValueError, match=message):
        load_config(None, override)


def test_presets_are_merged_with_the_fields_a_config_sets():
    cfg = load_config(None, ["model.preset=tiny", "model.num_heads=4"])
    kw = unet_config(**asdict(cfg.model), sample_size=16, cross_attention_dim=8)
    assert kw["num_heads"] == 4 and kw["block_channels"] == (16, 32) and kw["cross_attention_dim"] == 8


FOLDER_CLIP = Path(__file__).parent.parent / "configs" / "folder-clip.yaml"


def test_a_frozen_offline_text_encoder_must_be_asked_for():
    assert load_config(FOLDER_CLIP, ["text.pretrained=null"]).text.trainable   # the offline encoder trains
    assert not load_config(FOLDER_CLIP).text.trainable                          # a pretrained CLIP stays frozen
    with pytest.raises(ValueError, match="frozen at its random initialisation.*text.allow_random_frozen=true"):
        load_config(None, ["text.train=false"])
    assert not load_config(None, ["text.train=false", "text.allow_random_frozen=true"]).text.trainable


@pytest.mark.parametrize("override, message", [
    (["train.checkpoint_every=0"], "train.checkpoint_every must be > 0"),
    (["train.log_every=0"], "train.log_every must be > 0"),
    (["train.preview_prompts=[]"], "train.preview_prompts is empty; give prompts or set train.preview_every=0"),
    (["text.max_length=0"], r"text.max_length must be >= 3"),
    (["train.lr=-1e-3"], "train.lr must be > 0"),
    (["train.ema_decay=2"], r"train.ema_decay must be in \[0, 1\)"),
    (["train.lr=.inf"], "train.lr must be a finite number"),
    (["noise.timestep_bias=.inf"], "noise.timestep_bias must be a finite number"),
    (["noise.beta_schedule=bogus"], "noise.beta_schedule must be linear, scaled_linear or squaredcos_cap_v2"),
    (["noise.num_train_timesteps=0"], "noise.num_train_timesteps must be >= 2"),
    (["noise.min_snr_gamma=-1"], "noise.min_snr_gamma must be > 0"),
    (["train.keep_checkpoints=0"], "train.keep_checkpoints must be >= 1"),
    (["train.keep_checkpoints=-1"], "train.keep_checkpoints must be >= 1"),
])
def test_settings_that_would_fail_mid_run_are_refused_at_start(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, override)


def test_mixed_precision_no_as_yaml_reads_it(tmp_path):
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    (tmp_path / "c.yaml").write_text("train:\n  mixed_precision: no\n")
    assert load_config(tmp_path / "c.yaml").train.mixed_precision == "no"


def test_a_folder_or_invalid_yaml_as_config_is_one_clear_line(tmp_path, capsys):
    from t2i.cli import main
    with pytest.raises(ValueError, match="is a folder; pass a YAML file"):
        load_config(tmp_path)
    (tmp_path / "bad.yaml").write_text("train:\n  lr: [1\n")
    with pytest.raises(ValueError, match=r"bad.yaml is not valid YAML \(line \d+"):
        load_config(tmp_path / "bad.yaml")
    assert main(["train", "--config", str(tmp_path), "--dry-run"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_num_heads_must_divide_every_attention_width():
    kw = dict(preset="tiny", sample_size=16)
    with pytest.raises(ValueError, match=r"model.num_heads=3 must divide every attention width \(32\).*=8"):
        unet_config(**kw, num_heads=3)
    with pytest.raises(ValueError, match=r"model.num_heads=0 must divide"):
        unet_config(**kw, num_heads=0)
    assert unet_config(**kw, num_heads=4)["num_heads"] == 4
