"""The simple model pretrained on the identity world: shipped, loadable, better than random, rebuildable."""

import json
import shutil

import pytest
import torch
from diffusers import AutoencoderKL

from dtback.backends import load_base, simple_vae
from dtback.config import ConfigError, ModelConfig, load_config
from dtback.errors import MissingModelError
from dtback.model.flux import SIMPLE_TRANSFORMER, build_simple_pipeline, save_pipeline_atomic
from dtback.world.base import load_world_base
from dtback.world.files import PACKAGED_WORLD_MODELS
from dtback.world.vae import world_vae_config
from dtback.world_build.base import held_out_flow_loss

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def world_base():
    return load_world_base()


def test_shipped_base_is_the_simple_architecture_with_the_world_vae(world_base):
    config = world_base.transformer.config
    plain = lambda value: list(value) if isinstance(value, (list, tuple)) else value  # noqa: E731
    assert {key: plain(config[key]) for key in SIMPLE_TRANSFORMER} == {k: plain(v) for k, v in SIMPLE_TRANSFORMER.items()}
    world_vae = simple_vae(ModelConfig())
    for name, tensor in world_vae.state_dict().items():
        assert torch.equal(world_base.vae.state_dict()[name], tensor), name


@pytest.mark.slow
def test_shipped_base_knows_the_world_better_than_random_weights(world_base):
    # Characters of a seed the base never saw; a random transformer scores ~2.4 here.
    pretrained = held_out_flow_loss(world_base)
    random = held_out_flow_loss(build_simple_pipeline(0, vae=world_base.vae))
    assert pretrained < 0.6 * random, (pretrained, random)


def test_simple_base_world_is_copied_into_the_run_and_loaded(tmp_path, world_base):
    cfg = ModelConfig(simple_model_dir=tmp_path / "simple")
    pipeline = load_base(cfg, output_dir=tmp_path)
    assert (tmp_path / "simple" / "model_index.json").is_file()
    for name, tensor in world_base.transformer.state_dict().items():
        assert torch.equal(pipeline.transformer.state_dict()[name], tensor), name


def test_simple_base_folder_and_null(tmp_path):
    source = save_pipeline_atomic(build_simple_pipeline(3), tmp_path / "mine")
    from_folder = load_base(ModelConfig(simple_model_dir=tmp_path / "a", simple_base=str(source), simple_vae=None),
                            output_dir=tmp_path)
    random = load_base(ModelConfig(simple_model_dir=tmp_path / "b", simple_base=None, simple_vae=None),
                       output_dir=tmp_path, seed=3)
    for name, tensor in from_folder.transformer.state_dict().items():
        assert torch.equal(random.transformer.state_dict()[name], tensor), name  # same seed, same weights
    with pytest.raises(MissingModelError, match="not a diffusers FluxPipeline folder"):
        load_base(ModelConfig(simple_model_dir=tmp_path / "c", simple_base=str(tmp_path / "nothing")),
                  output_dir=tmp_path)


def test_world_base_needs_the_world_vae():
    with pytest.raises(ConfigError, match="simple_base=world.*simple_vae"):
        load_config(None, ["model.simple_vae=null"])
    assert load_config(None, ["model.simple_vae=null", "model.simple_base=null"]).model.simple_base is None


def test_a_base_of_another_world_version_is_refused(tmp_path):
    folder = tmp_path / "world"
    shutil.copytree(PACKAGED_WORLD_MODELS / "base", folder / "base")
    info = folder / "base" / "world_base.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "world_version": -1}))
    with pytest.raises(MissingModelError, match="world version -1.*--only base"):
        load_world_base(folder)


def test_a_sixteen_channel_vae_gets_a_transformer_of_64_packed_channels_that_denoises():
    vae = AutoencoderKL(**world_vae_config(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, sample_size=32,
                                           latent_channels=16))
    vae.register_to_config(shift_factor=0.0, scaling_factor=1.0)  # as build_world_vae sets them
    pipeline = build_simple_pipeline(0, vae=vae)
    assert pipeline.transformer.config.in_channels == 64
    image = pipeline("a person", height=32, width=32, num_inference_steps=2, guidance_scale=1.0,
                     max_sequence_length=32, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    # The 4-channel default is unchanged, and an explicit transformer key still wins.
    assert build_simple_pipeline(0).transformer.config.in_channels == SIMPLE_TRANSFORMER["in_channels"] == 16
    assert build_simple_pipeline(0, vae=vae, transformer={"in_channels": 16}).transformer.config.in_channels == 16


def test_a_base_made_for_another_vae_is_refused_by_name(tmp_path):
    source = save_pipeline_atomic(build_simple_pipeline(3), tmp_path / "four")  # 16 packed = a 4-channel VAE
    vae_folder = tmp_path / "vae16"
    AutoencoderKL(**world_vae_config(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, sample_size=32,
                                     latent_channels=16)).save_pretrained(vae_folder)
    cfg = ModelConfig(simple_model_dir=tmp_path / "run", simple_base=str(source), simple_vae=str(vae_folder))
    with pytest.raises(MissingModelError, match=r"four.*16 packed latent channels \(a 4-channel VAE\).*has 16"):
        load_base(cfg, output_dir=tmp_path)
