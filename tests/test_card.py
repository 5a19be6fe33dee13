import yaml

from t2i.card import add_evaluation, data_description, write_model_card
from t2i.config import load_config


def test_model_card_front_matter_holds_library_tags_recipe_config_and_data(tmp_path):
    cfg = load_config(None, ["data.kind=folder", "data.root=my/images", "model.preset=tiny", "train.max_steps=7"])
    text = write_model_card(tmp_path, cfg).read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "t2i" and "text-to-image" in meta["tags"]
    assert meta["t2i_recipe"]["unet_preset"] == "tiny" and meta["t2i_recipe"]["steps"] == 7
    assert meta["t2i_config"]["train"]["max_steps"] == 7 and meta["t2i_config"]["data"]["root"] == "my/images"
    assert "my/images" in meta["t2i_data"] and "Not evaluated yet" in text
    assert add_evaluation(tmp_path, "| a | b |\n|---|---|")
    assert add_evaluation(tmp_path, "| c | d |\n|---|---|")  # a second evaluation replaces the first
    text = (tmp_path / "README.md").read_text()
    assert "| c | d |" in text and "| a | b |" not in text and "Not evaluated yet" not in text
    assert yaml.safe_load(text.split("---\n")[1])["library_name"] == "t2i"
    assert not add_evaluation(tmp_path / "elsewhere", "| x |")  # no card: nothing written


def test_the_card_names_the_data_of_each_kind():
    shards = data_description(load_config(None, ["data.kind=shards", "data.root=my/shards"]))
    assert shards.startswith("the shards in my/shards") and "shapes" not in shards
    assert data_description(load_config(None, [])).startswith("t2i's procedural shapes world")
