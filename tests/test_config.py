"""Config: the embedded default loads; every validation rule fails early with the key path and the source."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dtback.config import SEED_KEYS, Config, describe_keys, load_config
from dtback.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "train" / "config.yaml"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def error_of(path=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


# Where the embedded default (a CPU run on the identity world) departs from the code defaults (real FLUX photos).
EMBEDDED_OVERRIDES = {
    "data.input_size": 128, "model.adapter_double_interval": 1, "model.adapter_single_interval": 1,
    "training.batch_size": 8, "training.learning_rate": 3e-4, "training.max_steps": 2500, "training.ema_decay": 0.995,
    "training.num_val_characters": 8, "training.identity_loss_max_samples": 2, "training.val_true_cfg": 3.0,
    "training.mixed_precision": "bf16",
}


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def test_embedded_default_loads_and_differs_from_code_defaults_only_where_listed():
    cfg = load_config(DEFAULT)
    yaml_keys, code = _flatten(cfg.model_dump()), _flatten(Config().model_dump())
    assert {k: v for k, v in yaml_keys.items() if code[k] != v} == EMBEDDED_OVERRIDES
    assert cfg.data.data_dir == Path("data/world")
    assert cfg.output.output_dir == Path("checkpoints/identity_preserving")


def test_every_seed_key_exists_under_its_section():
    cfg = Config()
    dumped = cfg.model_dump()
    found = {key for section in dumped.values() if isinstance(section, dict) for key in section}
    assert set(SEED_KEYS) <= found
    listed = {key.split(".")[-1] for key, _, _ in describe_keys()}
    assert set(SEED_KEYS) <= listed


def test_seed_flat_layout_is_accepted(tmp_path):
    path = write(tmp_path, "learning_rate: 3.0e-4\ndata_dir: photos\nnum_face_latents: 4\nuse_simple_model: false\n")
    cfg = load_config(path)
    assert cfg.training.learning_rate == 3e-4
    assert cfg.data.data_dir == Path("photos")
    assert cfg.identity.num_face_latents == 4
    assert cfg.model.use_simple_model is False


def test_flat_and_grouped_twice_is_an_error(tmp_path):
    path = write(tmp_path, "learning_rate: 1.0e-4\ntraining:\n  learning_rate: 2.0e-4\n")
    assert "learning_rate is given both at the top level and as training.learning_rate" in error_of(path)


def test_unknown_keys_name_the_path_and_file(tmp_path):
    path = write(tmp_path, "training:\n  learning_rat: 1.0e-4\nbogus: 1\n")
    message = error_of(path)
    assert f"{path}: training.learning_rat: unknown key; did you mean 'learning_rate'?" in message
    assert f"{path}: bogus: unknown key" in message


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("training:\n  batch_size: eight\n", "training.batch_size", "valid integer"),
        ("training:\n  batch_size: 2.5\n", "training.batch_size", "valid integer"),
        ("data:\n  bucketing: maybe\n", "data.bucketing", "valid boolean"),
        ("data:\n  val_characters: alice\n", "data.val_characters", "valid list"),
        ("training: 5\n", "training", "valid dictionary"),
    ],
)
def test_wrong_types(tmp_path, text, key, fragment):
    path = write(tmp_path, text)
    message = error_of(path)
    assert f"{path}: {key}: " in message and fragment in message


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("training:\n  learning_rate: -1.0e-4\n", "training.learning_rate", "greater than 0"),
        ("training:\n  learning_rate: 0\n", "training.learning_rate", "greater than 0"),
        ("training:\n  weight_decay: -0.1\n", "training.weight_decay", "greater than or equal to 0"),
        ("training:\n  batch_size: 0\n", "training.batch_size", "greater than or equal to 1"),
        ("training:\n  face_weight: -1\n", "training.face_weight", "greater than or equal to 0"),
        ("data:\n  input_size: 500\n", "data.input_size", "multiple of 16"),
        ("data:\n  min_images_per_char: 1\n", "data.min_images_per_char", "greater than or equal to 2"),
        ("data:\n  val_fraction: 1.0\n", "data.val_fraction", "less than 1"),
        ("data:\n  max_chars_per_bundle: 0\n", "data.max_chars_per_bundle", "greater than or equal to 1"),
        ("data:\n  caption_template: 'a {person}'\n", "data.caption_template", "unknown placeholder"),
        ("data:\n  val_characters: [alice]\n", "data.val_characters", "'bundle/character'"),
        ("data:\n  min_references: 4\n  max_references: 2\n", "data", "must not exceed max_references"),
        ("identity:\n  num_face_latents: 0\n", "identity.num_face_latents", "greater than or equal to 1"),
        ("identity:\n  face_backend: insightface\n", "identity", "needs face_model_dir"),
        ("identity:\n  face_backend: arcface\n", "identity.face_backend", "'dlib' or 'insightface'"),
        ("identity:\n  face_det_size: 600\n", "identity.face_det_size", "multiple of 32"),
        ("identity:\n  face_upsample: 5\n", "identity.face_upsample", "less than or equal to 3"),
        (
            "training:\n  content_weight: 0\n  face_weight: 0\n  body_weight: 0\n",
            "training",
            "nothing would be trained",
        ),
    ],
)
def test_impossible_values(tmp_path, text, key, fragment):
    path = write(tmp_path, text)
    message = error_of(path)
    assert f"{path}: {key}: " in message and fragment in message


def test_all_errors_are_reported_at_once(tmp_path):
    path = write(tmp_path, "training:\n  learning_rate: -1\n  batch_size: 0\ndata:\n  input_size: 100\n")
    message = error_of(path)
    assert message.count(str(path)) == 3


def test_string_numbers_from_yaml_are_accepted(tmp_path):
    # PyYAML's YAML 1.1 reads 1e-4 (no dot) as a string; it must still mean 0.0001, and a quoted one too.
    assert load_config(write(tmp_path, "training:\n  learning_rate: 1e-4\n")).training.learning_rate == 1e-4
    assert load_config(None, ['training.learning_rate="2e-4"']).training.learning_rate == 2e-4


def test_yaml_scalars_read_as_yaml_1_2_core_numbers_words_and_booleans(tmp_path):
    # YAML 1.1 reads 1:30 as sexagesimal 90, no/off/yes/on as booleans and 2024-05-01 as a date.
    assert load_config(None, ["data.caption_template=no"]).data.caption_template == "no"
    assert load_config(None, ["data.world.bundle=off"]).data.world.bundle == "off"
    assert load_config(None, ["data.world.bundle=2024-05-01"]).data.world.bundle == "2024-05-01"
    assert load_config(None, ["data.val_characters=[yes/no, on/off]"]).data.val_characters == ["yes/no", "on/off"]
    path = write(tmp_path, "data:\n  caption_template: off\n  world:\n    bundle: yes\n    generate_if_missing: off\n")
    cfg = load_config(path)
    assert (cfg.data.caption_template, cfg.data.world.bundle, cfg.data.world.generate_if_missing) == ("off", "yes", False)
    assert load_config(None, ["data.world.generate_if_missing=no"]).data.world.generate_if_missing is False
    assert load_config(None, ["training.mixed_precision=no"]).training.mixed_precision == "no"
    message = error_of(write(tmp_path, "training:\n  checkpoint_every: 1:30\n"))
    assert "training.checkpoint_every: Input should be a valid integer" in message and "(got '1:30')" in message
    assert "(got '1:30')" in error_of(None, ["training.learning_rate=1:30"])
    lr = load_config(None, ["training.learning_rate=5e-5", "training.weight_decay=1E2", "training.ema_decay=.5"])
    assert (lr.training.learning_rate, lr.training.weight_decay, lr.training.ema_decay) == (5e-5, 100.0, 0.5)
    cfg = load_config(None, ["seed=1_000", "data.world.seed=0o17", "training.batch_size=0b11"])
    assert (cfg.seed, cfg.data.world.seed, cfg.training.batch_size) == (1000, 15, 3)


def test_an_explicit_tag_on_a_bad_number_is_a_config_error_not_a_traceback():
    assert "--set seed=!!int abc: value is not valid YAML: 'abc' is not an integer" in error_of(None, ["seed=!!int abc"])
    assert "'x' is not a float" in error_of(None, ["training.learning_rate=!!float x"])


def test_strings_that_look_like_numbers_or_booleans_survive_the_saved_config(tmp_path):
    # The run's config.yaml is read back (resume, evaluate): "1e5" must be quoted for the core schema, "no" for 1.1.
    cfg = load_config(None, ['data.world.bundle="1e5"', "data.caption_template=no"])
    cfg.save(tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "bundle: '1e5'" in text and "caption_template: 'no'" in text
    assert load_config(tmp_path / "config.yaml") == cfg


def test_overrides_dotted_and_seed_alias():
    cfg = load_config(DEFAULT, ["training.batch_size=16", "learning_rate=5e-5", "data.val_characters=[a/b, c/d]"])
    assert cfg.training.batch_size == 16
    assert cfg.training.learning_rate == 5e-5
    assert cfg.data.val_characters == ["a/b", "c/d"]
    assert load_config(None, ["max_chars_per_bundle=null"]).data.max_chars_per_bundle is None


def test_override_errors_name_the_argument():
    message = error_of(DEFAULT, ["training.learning_rate=-1"])
    assert "--set training.learning_rate=-1: training.learning_rate: Input should be greater than 0" in message
    assert "--set data.nope=3: data.nope: unknown key" in error_of(DEFAULT, ["data.nope=3"])
    assert "expected key=value" in error_of(DEFAULT, ["learning_rate"])
    assert "training.learning_rate is a value, not a section" in error_of(DEFAULT, ["training.learning_rate.x=1"])


def test_file_problems(tmp_path):
    assert f"{tmp_path / 'missing.yaml'}: config file not found" in error_of(tmp_path / "missing.yaml")
    assert f"{tmp_path}: a folder, not a config file" in error_of(tmp_path)
    assert "not valid YAML" in error_of(write(tmp_path, "training: [unclosed\n"))
    assert "top level must be a mapping" in error_of(write(tmp_path, "- a\n- b\n"))
    assert load_config(write(tmp_path, "")) == Config()


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(DEFAULT, ["training.batch_size=3", "data.max_chars_per_bundle=5"])
    cfg.save(tmp_path / "run" / "config.yaml")
    assert load_config(tmp_path / "run" / "config.yaml") == cfg


def test_keys_of_earlier_versions_load_with_a_note(tmp_path):
    """A config.yaml written before the world setting moved (identity.world_models_dir) and with the removed
    data.num_workers still loads, as a file and as --set, and says what changed."""
    old = tmp_path / "config.yaml"
    old.write_text("data:\n  num_workers: 2\nidentity:\n  world_models_dir: /somewhere/world\n")
    with pytest.warns(FutureWarning, match="identity.world_models_dir is renamed data.world.components"):
        cfg = load_config(old)
    assert str(cfg.data.world.components) == "/somewhere/world"
    with pytest.warns(FutureWarning, match="data.num_workers is no longer used"):
        assert load_config(None, ["data.num_workers=4"]).data.world.components is None
    with pytest.warns(FutureWarning, match="renamed"):
        assert str(load_config(None, ["identity.world_models_dir=/w"]).data.world.components) == "/w"
    both = tmp_path / "both.yaml"
    both.write_text("identity:\n  world_models_dir: /a\ndata:\n  world:\n    components: /b\n")
    with pytest.warns(FutureWarning), pytest.raises(ConfigError, match="both identity.world_models_dir"):
        load_config(both)


def test_mixed_precision_no_survives_yaml_and_cudnn_attention_is_off_by_default(tmp_path):
    # YAML 1.1 reads a bare `no` as false; the key means the string.
    assert load_config(None, ["training.mixed_precision=no"]).training.mixed_precision == "no"
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  mixed_precision: no\n")
    cfg = load_config(path)
    assert cfg.training.mixed_precision == "no" and cfg.training.cudnn_attention is False


def test_attention_backends_switch_cudnn_and_restore_it():
    import torch

    from dtback.devices import attention_backends

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with attention_backends(cudnn=False):
        assert torch.backends.cuda.cudnn_sdp_enabled() is False
        with attention_backends(cudnn=True):
            assert torch.backends.cuda.cudnn_sdp_enabled() is True
        assert torch.backends.cuda.cudnn_sdp_enabled() is False
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_a_run_config_with_the_removed_duplicate_hash_bits_still_loads(tmp_path):
    old = tmp_path / "config.yaml"
    old.write_text("data:\n  build:\n    duplicate_hash_bits: 12\n    min_face_size: 40\n")
    with pytest.warns(FutureWarning, match="data.build.duplicate_hash_bits is no longer used"):
        cfg = load_config(old)
    assert cfg.data.build.min_face_size == 40


def test_the_licence_clean_recipe_names_only_permissive_models():
    """train/flux2_klein_licence_clean.yaml: FLUX.2 [klein] base 4B, dlib faces, DINOv2-small bodies, in the folders
    `dtback download` puts them in."""
    from dtback.download import DEFAULT_BODY_REPO, FLUX_LICENCES, FLUX_REPOS

    cfg = load_config(REPO / "train" / "flux2_klein_licence_clean.yaml")
    assert cfg.model.base == "flux2_klein" and not cfg.model.use_simple_model
    assert Path(cfg.model.pretrained_model).name == FLUX_REPOS["flux2-klein-base-4b"].split("/")[1]
    assert FLUX_LICENCES["flux2-klein-base-4b"] == "Apache-2.0"
    assert cfg.identity.face_backend == "dlib" and Path(cfg.identity.body_model).name == DEFAULT_BODY_REPO.split("/")[1]


def test_a_leading_zero_number_is_decimal_on_the_command_line_and_in_files(tmp_path):
    # YAML 1.1 reads 010 as octal 8 (and 09 as the string "09"): a person typing a seed means ten.
    cfg = load_config(None, ["seed=010", "training.batch_size=09", "data.world.seed=0_12"])
    assert (cfg.seed, cfg.training.batch_size, cfg.data.world.seed) == (10, 9, 12)
    assert "data.max_chars_per_bundle: Input should be greater than or equal to 1 (got -7)" in \
        error_of(None, ["data.max_chars_per_bundle=-007"])
    assert load_config(None, ["seed=0x10"]).seed == 16  # a prefix says the base: hex stays hex
    assert load_config(None, ["data.val_characters=[film/007]"]).data.val_characters == ["film/007"]
    path = tmp_path / "c.yaml"
    path.write_text("seed: 0012\ntraining:\n  batch_size: 08\n")
    cfg = load_config(path)
    assert (cfg.seed, cfg.training.batch_size) == (12, 8)


def test_a_run_inside_its_data_is_found_through_symlinks_and_dots_not_by_name_prefix(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    os.symlink(photos, tmp_path / "link")
    for out in (photos, tmp_path / "link" / "run", tmp_path / "x" / ".." / "photos" / "run"):
        assert "is inside data.data_dir" in error_of(None, [f"data_dir={photos}", f"output_dir={out}"])
    cfg = load_config(None, [f"data_dir={photos}", f"output_dir={tmp_path / 'photos2' / 'run'}"])
    assert cfg.output.output_dir == tmp_path / "photos2" / "run"


def test_an_embedding_cache_inside_the_data_is_refused(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    error = error_of(None, [f"data_dir={photos}", f"identity.cache_dir={photos / 'cache'}"])
    assert f"identity.cache_dir={photos / 'cache'} is inside data.data_dir={photos}" in error
    cfg = load_config(None, [f"data_dir={photos}", f"identity.cache_dir={tmp_path / 'photos-cache'}"])
    assert cfg.cache_dir() == tmp_path / "photos-cache"


def test_a_yaml_syntax_error_is_one_line_with_its_place(tmp_path):
    # PyYAML's own message spans five lines, quoting the source under a caret.
    message = error_of(write(tmp_path, "training:\n  batch_size: [4\n"))
    assert message == f"{tmp_path / 'cfg.yaml'}: not valid YAML: while parsing a flow sequence: expected ',' or ']', " \
                      "but got '<stream end>' at line 3, column 1"
    assert error_of(None, ["data.val_characters=[a/b"]) == "--set data.val_characters=[a/b: value is not valid YAML: " \
        "while parsing a flow sequence: expected ',' or ']', but got '<stream end>' at line 1, column 5"


def test_setting_a_key_below_a_value_says_so(tmp_path):
    # The validator said only "training.batch_size: Input should be a valid integer" for a value the user never gave.
    assert error_of(None, ["training.batch_size.x=1"]) == "--set training.batch_size.x=1: training.batch_size is a " \
        "value, not a section, so training.batch_size.x cannot be set (set training.batch_size=...)"
    assert "data.nope: unknown key" in error_of(None, ["data.nope.x=1"])  # unknown names keep their suggestions


def test_text_that_yaml_reads_as_a_mapping_says_to_quote_it(tmp_path):
    message = error_of(None, ["data.caption_template={character}"])
    assert message.endswith("data.caption_template: Input should be a valid string; YAML read the value as a mapping: "
                            "put it in quotes"), message
    assert error_of(None, ["data.caption_template={character} in a park"]).endswith(
        "at line 1, column 13; text that starts with '{' must be in quotes")
    assert load_config(None, ["data.caption_template='{character} in a park'"]).data.caption_template == \
        "{character} in a park"


def test_a_config_file_that_cannot_be_read_is_one_config_error(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    path.write_text("seed: 1\n")
    real = Path.read_text

    def refused(self, *args, **kwargs):  # root reads any file: fake the permission error a user gets
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", refused)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == f"{path}: unreadable (Permission denied)"
