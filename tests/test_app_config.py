"""jax_ddpm.app.config: the architecture in the config, identities written before it, the rules
imported from the modules that own them."""
from __future__ import annotations

import pytest

from jax_ddpm import data, parallel, sampling, schedules
from jax_ddpm.app import config as cfg
from jax_ddpm.models import registry


def _legacy(ident: dict) -> dict:
    """An identity as written before ``model.arch`` existed."""
    return {k: v for k, v in ident.items() if k != "model.arch"}


def test_identity_names_the_arch():
    ident = cfg.identity(cfg.TrainConfig(workdir="w"))
    assert ident["model.arch"] == registry.DEFAULT_ARCH == "chapter"


def test_identity_without_arch_equals_a_chapter_run():
    run = cfg.TrainConfig(workdir="w", model=cfg.ModelConfig(features=(4, 8, 8, 8), image_size=8))
    old = _legacy(cfg.identity(run))
    assert "model.arch" not in old
    assert cfg.identity_mismatch(old, cfg.identity(run)) is None
    assert cfg.identity_mismatch(cfg.identity(run), old) is None


def test_identity_without_arch_still_catches_other_changes():
    run = cfg.TrainConfig(workdir="w")
    other = cfg.TrainConfig(workdir="w", model=cfg.ModelConfig(time_emb_dim=64))
    assert cfg.identity_mismatch(_legacy(cfg.identity(run)), cfg.identity(other)) == "--time-emb-dim was 32, now 64"


def test_an_arch_change_is_named_as_the_option():
    saved = dict(cfg.identity(cfg.TrainConfig(workdir="w")), **{"model.arch": "unet2d"})
    assert cfg.identity_mismatch(saved, cfg.identity(cfg.TrainConfig(workdir="w"))) == "--arch was unet2d, now chapter"


def test_config_from_an_identity_without_arch_is_the_chapter_run():
    run = cfg.TrainConfig(workdir="w", model=cfg.ModelConfig(features=(4, 8, 8, 8), image_size=8), seed=3)
    rebuilt = cfg.train_config_from_identity("w", _legacy(cfg.identity(run)))
    assert rebuilt == run and rebuilt.model.arch == "chapter"


@pytest.mark.parametrize("model, needle", [
    (cfg.ModelConfig(features=(1, 2, 3)), "--features: the chapter's U-Net has four levels"),
    (cfg.ModelConfig(time_emb_dim=6 + 1), "--time-emb-dim: must be an even integer"),
    (cfg.ModelConfig(image_size=12), "--image-size must be a positive multiple of 8 for --arch chapter, got 12"),
    (cfg.ModelConfig(arch="nope"), "--arch: arch must be one of chapter"),
])
def test_check_arch_names_the_option(model, needle):
    with pytest.raises(cfg.ConfigError, match="^" + needle.replace("(", r"\(")):
        cfg.check_arch(model)


@pytest.mark.parametrize("field, value, option", [("features", (8, 8, 8, 8), "--features"),
                                                  ("time_emb_dim", 64, "--time-emb-dim")])
def test_a_setting_the_arch_does_not_read_is_refused_not_ignored(gn_like, field, value, option):
    with pytest.raises(cfg.ConfigError, match=f"^{option}: --arch {gn_like} has no such setting"):
        cfg.check_arch(cfg.ModelConfig(arch=gn_like, image_size=8, **{field: value}))
    assert cfg.check_arch(cfg.ModelConfig(arch=gn_like, image_size=8)).arch == gn_like  # defaults pass


@pytest.fixture
def gn_like(monkeypatch):
    """An architecture without ``features`` / ``time_emb_dim`` fields (tests/test_registry.py's)."""
    from test_registry import GN_ARCH

    monkeypatch.setitem(registry.ARCHITECTURES, GN_ARCH.name, GN_ARCH)
    return GN_ARCH.name


def test_arch_config_goes_through_the_registry():
    arch, config = cfg.arch_config(cfg.ModelConfig(channels=3, features=(4, 8, 8, 8), time_emb_dim=16))
    assert arch is registry.get_arch("chapter")
    assert config == arch.config_from_fields(3, features=(4, 8, 8, 8), time_emb_dim=16)
    assert cfg.model_config_from_arch(arch, config, 8) == cfg.ModelConfig(image_size=8, channels=3,
                                                                          features=(4, 8, 8, 8), time_emb_dim=16)


@pytest.mark.parametrize("text", ["8", "8,16", "8,16,32,64,128"])
def test_parse_features_takes_any_count(text):
    assert cfg.parse_features(text) == tuple(int(x) for x in text.split(","))


def test_timesteps_rule_is_the_schedules_one():
    assert cfg.check_timesteps_option(schedules.MIN_TIMESTEPS) == schedules.MIN_TIMESTEPS
    with pytest.raises(cfg.ConfigError, match=f"--timesteps must be an integer >= {schedules.MIN_TIMESTEPS}"):
        cfg.check_timesteps_option(schedules.MIN_TIMESTEPS - 1)


def test_choice_lists_are_imported_not_redefined():
    assert cfg.SCHEDULES is schedules.SCHEDULES and cfg.SAMPLERS is sampling.SAMPLERS
    assert cfg.BN_STATS is sampling.BN_STATS and cfg.DTYPES is parallel.DTYPES
    assert cfg.LAYOUTS is data.LAYOUTS and cfg.CHANNELS is data.CHANNELS and cfg.ARCH_NAMES is registry.ARCH_NAMES
