"""The recipe: one place for every name, default and check (settings, methods, CalibConfig)."""

import dataclasses

import pytest

from batquant_jax import calibrate, recipe, transforms
from batquant_jax.recipe import CalibConfig, MethodSpec, QuantSpec, RecipeError


def test_every_library_field_is_a_flag_with_the_library_default():
    # The calibrate command builds its flags from CalibrateConfig's fields; each CalibConfig
    # field is one of them, with the library's default (epochs: the CPU budget of the command).
    run = {f.name: f.default for f in dataclasses.fields(calibrate.CalibrateConfig)}
    lib = {f.name: f.default for f in dataclasses.fields(CalibConfig)}
    assert sorted(set(lib) - set(run)) == []
    assert {k: (v, run[k]) for k, v in lib.items() if run[k] != v} == {"epochs": (5, 2)}
    assert set(calibrate.CalibrateConfig.RUN_FIELDS) == set(lib) | {
        "model", "calib_data", "nsamples", "seqlen"}
    assert all(f.metadata["help"] for f in dataclasses.fields(CalibConfig))


def test_errors_name_the_field_and_read_as_flags():
    with pytest.raises(RecipeError) as e:
        CalibConfig(method="awq")
    assert (e.value.fields, e.value.value) == (("method",), "awq")
    assert e.value.flag_message() == ("--method=awq is unknown; valid: rtn, gptq, quarot, brq, "
                                      "mr-gptq, flatquant, batquant")
    with pytest.raises(RecipeError) as e:
        CalibConfig(g1=8, g2=3)
    assert e.value.flag_message() == ("--g1 * --g2 (the transform block) must be one of 16, 32, "
                                      "64, 128, got 8 * 3 = 24")
    with pytest.raises(RecipeError) as e:
        CalibConfig(clip_lr=-1.0)
    assert e.value.flag_message() == "--clip_lr must be a finite number > 0, got -1.0"
    with pytest.raises(RecipeError, match="unknown a_fmt 'mxfp3'"):
        QuantSpec(a_fmt="mxfp3")
    with pytest.raises(RecipeError, match="unknown transform 'rotation'"):
        MethodSpec(transform="rotation")


def test_transform_kinds_come_from_the_registry(monkeypatch):
    assert recipe.TRANSFORMS is transforms.REGISTRY
    assert list(transforms.REGISTRY) == ["identity", "random_hadamard", "block_hadamard",
                                         "kronecker", "gpk", "block_affine", "dense"]
    monkeypatch.setitem(transforms.REGISTRY, "half_identity",
                        lambda d, **_: transforms.IdentityTransform(d))
    m = MethodSpec(transform="half_identity")  # a registered kind is a valid method transform
    t = transforms.build(m.transform, 64)
    assert type(t).__name__ == "IdentityTransform" and t.d == 64


def test_config_resolves_the_method_and_setting():
    cfg = CalibConfig(method="flatquant", setting="W4A8KV16", clip="none", scale_init="ones",
                      rounding="away")
    assert (cfg.spec.a_fmt, cfg.spec.rounding, cfg.method_spec.clip,
            cfg.method_spec.scale_init, cfg.method_spec.smooth_alpha) == (
        "mxfp8", "away", None, "ones", 0.3)
    assert CalibConfig.from_fields({"method": "brq", "unknown_field": 1}).method == "brq"
