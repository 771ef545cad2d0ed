import os
import re
from pathlib import Path

import pytest

from detr import ConfigError, ModelConfig, load_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_dotted_overrides_make_typed_sections(tmp_path):
    path = write(tmp_path, "run_dir: runs/x\nmodel_preset: tiny\ntrain:\n  max_steps: 10\n  lr: 1\n")
    config = load_config(path, ["train.lr=3e-4", "--model.d_ff=128", "decode.beam_size=4"])
    assert config.train.lr == 3e-4 and isinstance(config.train.lr, float)
    assert config.model.d_model == 32 and config.model.d_ff == 128  # preset, then override
    assert config.decode.beam_size == 4


@pytest.mark.parametrize("text,message", [
    ("train:\n  max_stpes: 3\n", "unknown key 'train.max_stpes'; did you mean 'train.max_steps'?"),
    ("trian:\n  max_steps: 3\n", "unknown key 'trian'; did you mean 'train'?"),
    ("train:\n  max_steps: three\n", "train.max_steps: expected int, got 'three'"),
    ("train:\n  max_steps: 3\n  label_smoothing: 1.5\n", "train.label_smoothing must be in [0, 1)"),
    ("train:\n  max_steps: 3\nmodel:\n  norm: sandwich\n", "model.norm: expected one of 'pre', 'post'"),
    ("train: [1, 2\n", "c.yaml:"),
    ("train:\n  max_steps: 3\ndecode:\n  temperature: -1.0\n", "decode.temperature must be positive, got -1.0"),
    ("train:\n  max_steps: 3\ndecode:\n  max_len_a: -0.5\n", "decode.max_len_a must not be negative, got -0.5"),
    ("train:\n  max_steps: 3\nmodel:\n  n_decoder_layers: 0\n", "model.n_decoder_layers must be positive, got 0"),
    ("train:\n  max_steps: 3\n  freeze_encoder_layers: -1\n", "train.freeze_encoder_layers must not be negative"),
    ("train:\n  max_steps: 3\n  fsdp: true\n  freeze_encoder_layers: 2\n",
     "train.freeze_encoder_layers is not available with train.fsdp"),
])
def test_bad_configs_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert message in str(err.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_presets_are_independent_copies():
    a = ModelConfig.preset("tiny", d_model=64)
    assert ModelConfig.preset("tiny").d_model == 32 and a.d_model == 64
    with pytest.raises(ConfigError, match="unknown model preset"):
        ModelConfig.preset("huge")


def test_effective_config_round_trips_through_yaml(tmp_path):
    config = load_config(write(tmp_path, "model_preset: tiny\ntrain:\n  max_steps: 7\n"))
    config.save(tmp_path / "saved.yaml")
    again = load_config(tmp_path / "saved.yaml")
    assert again == config


RECIPES = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_in_configs_is_valid(name):
    from tests.conftest import ROOT

    config = load_config(ROOT / "configs" / f"{name}.yaml")
    assert config.data.train is not None and config.train.max_steps > 0
    if config.model.pretrained is None:  # what `detr model` shows = what training builds
        from detr.summary import describe_model

        assert config.model.src_vocab_size is None  # taken from the tokenizer: data.vocab_size
        assert f"src={config.data.vocab_size}" in describe_model(str(ROOT / "configs" / f"{name}.yaml"))[1]


# The quality recipes (benchmarks/quality.py's SPECS, some with splits it makes, and the backward runs
# trained beside them) are trained, decoded and scored by tests/test_quality.py: not twice.
QUALITY_SOURCE = (Path(__file__).resolve().parent.parent / "benchmarks" / "quality.py").read_text()
QUALITY_RECIPES = {*re.findall(r'^    "(\w+)": Spec\(', QUALITY_SOURCE, re.MULTILINE),
                   *re.findall(r'backward="(\w+)"', QUALITY_SOURCE)}


@pytest.mark.parametrize("name", [r for r in RECIPES if r not in {"base", "tiny", *QUALITY_RECIPES}])
def test_every_real_data_recipe_trains_a_few_steps(name, tmp_path):
    """Recipes on ../shared/data must not rot: two steps each, on the first few hundred examples."""
    from detr.trainer import Trainer
    from tests.conftest import ROOT, shared_data

    config = load_config(ROOT / "configs" / f"{name}.yaml", {
        "run_dir": str(tmp_path / "run"), "train.max_steps": 2, "train.max_epochs": 0, "train.save_every": 2,
        "train.max_tokens": 512, "data.valid": None, "data.pool_size": 300, "data.tokenizer_max_lines": 3000,
        "data.vocab_size": 1000})
    shared_data(str(Path(config.data.train).parent.relative_to("../shared/data")))
    cwd = os.getcwd()
    os.chdir(ROOT)  # recipes use paths relative to the repository root
    try:
        result = Trainer(config).run()
    finally:
        os.chdir(cwd)
    assert result.steps == 2 and (tmp_path / "run" / "model.safetensors").is_file()


def test_the_multi30k_recipe_points_at_the_shared_data():
    from detr.readers import check_split
    from tests.conftest import ROOT, shared_data

    shared_data("translation/multi30k/train.en")
    config = load_config(ROOT / "configs" / "multi30k_en_de.yaml")
    cwd = os.getcwd()
    os.chdir(ROOT)  # recipes use paths relative to the repository root
    try:
        for split in ("train", "valid", "test"):
            check_split(config.data, split)
    finally:
        os.chdir(cwd)
