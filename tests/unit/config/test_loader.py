import pytest

from trainer.config.loader import list_presets, load_config, parse_override
from trainer.errors import ConfigError


def test_default_preset_and_overrides():
    cfg = load_config(None, ["train.max_steps=7", "lora.target_modules=[q_proj, v_proj]", "train.lr=1e-4"])
    assert cfg.train.max_steps == 7
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.lr == pytest.approx(1e-4)  # YAML reads 1e-4 as a string; we take it as a number
    assert cfg.model.name_or_path == "builtin:tiny-llama"


def test_output_dir_option_wins(tmp_path):
    assert load_config(None, ["output_dir=x"], str(tmp_path)).output_dir == str(tmp_path)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.max_stepz=5", "did you mean 'train.max_steps'"),
        ("trian.max_steps=5", "did you mean 'train'"),
        ("train.lr=fast", "train.lr: expected a number"),
        ("model.method=qlor", "did you mean 'qlora'"),
        ("train.micro_batch_size=0", "train.micro_batch_size: must be > 0"),
        ("checkpoint.remote=gs://b/x", "must start with s3:// or file://"),
        ("model.gradient_checkpointing=maybe", "expected true or false"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)
    assert "\n" not in str(e.value)


def test_yaml_file_with_base(tmp_path):
    p = tmp_path / "my.yaml"
    p.write_text("base: lora\ntrain:\n  max_steps: 3\n")
    cfg = load_config(str(p))
    assert cfg.model.method == "lora" and cfg.train.max_steps == 3


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="no such file or preset"):
        load_config("lorra")


def test_presets_exist_and_load():
    names = list_presets()
    assert {"default", "lora", "qlora", "full"} <= set(names)
    for name in names:
        load_config(name)


def test_parse_override_requires_equals():
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("train.max_steps")
