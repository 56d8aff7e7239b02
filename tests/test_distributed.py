"""Data-parallel calibration and evaluation: 4 fake CPU devices and 2 processes match 1 device.

The device count must be fixed before JAX starts, so every multi-device run happens in a
subprocess running this file as a script (``python tests/test_distributed.py MODE OUT ...``)
that writes its results to an .npz file; the tests compare those files.
"""

import functools
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = pathlib.Path(__file__).resolve()
NSAMPLES, SEQLEN, BATCH = 8, 32, 4
HPARAMS = dict(epochs=2, batch_size=BATCH, seed=0)


# ----------------------------------------------------------------------------- worker side

def _model():
    """The tiny random model of test_calibration (hidden 64, 2 layers, outlier channels)."""
    import jax.numpy as jnp
    from flax import nnx

    from batquant_jax.models.llama import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(arch="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=2, num_kv_heads=1, head_dim=32, rope_theta=10000.0,
                      rope_scaling=None, rms_norm_eps=1e-5, tie_word_embeddings=True,
                      attention_bias=False, qk_norm=False, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg, nnx.Rngs(0))
    boost = jnp.ones((64,)).at[jnp.array([3, 40])].set(25.0)
    model.embed_tokens.weight[...] = model.embed_tokens.weight[...] * 20.0 * boost
    return model


def _windows(n, seed):
    return np.random.default_rng(seed).integers(0, 128, (n, SEQLEN)).astype(np.int32)


def _grads(mesh) -> dict:
    """Loss and gradients of one training step of layer 0 on one batch of 4 windows."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from batquant_jax.calibration import (CalibConfig, is_clip_param, is_transform_param,
                                          build_quantized_layer)
    from batquant_jax.distributed import DataParallel
    m = _model()
    x = m.embed(jnp.asarray(_windows(BATCH, 0)))
    y = m.layers[0](x)
    layer = build_quantized_layer(nnx.clone(m.layers[0]), CalibConfig(), 0)
    fetch = np.asarray
    if mesh is not None:
        dp = DataParallel(mesh)
        layer, x, y, fetch = dp.put_module(layer), dp.put(x, dp.rows()), dp.put(y, dp.rows()), dp.fetch
    g, tp, cp, rest = nnx.split(layer, is_transform_param, is_clip_param, ...)
    loss_fn = lambda tp, cp, x, y: jnp.mean(jnp.square(nnx.merge(g, tp, cp, rest)(x) - y))
    loss, grads = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(tp, cp, x, y)
    return {"loss": np.array(float(loss)),
            **{f"g{i}": fetch(v) for i, v in enumerate(jax.tree.leaves(grads))}}


def _calibrate(mesh, epochs, out_dir=None) -> dict:
    """Calibrates the tiny model on ``mesh`` (None: one device); the numbers to compare."""
    import jax
    from flax import nnx

    from batquant_jax import checkpoint, perplexity
    from batquant_jax.calibration import quantize_model
    from batquant_jax.distributed import DataParallel
    from batquant_jax.models import forward_nll
    fetch = np.asarray if mesh is None else DataParallel(mesh).fetch
    ids = _windows(8, 1).reshape(-1)

    def ppl(model):
        return np.array(perplexity.evaluate_perplexity(
            functools.partial(forward_nll, model), ids, seqlen=SEQLEN, batch_size=4,
            mesh=mesh).perplexity)

    out = {}
    model = _model()
    if mesh is not None:
        DataParallel(mesh).put_module(model)
    out["ppl_fp"] = ppl(model)
    model, res = quantize_model(model, _windows(NSAMPLES, 0), "batquant", log=lambda m: None,
                                mesh=mesh, **dict(HPARAMS, epochs=epochs))
    out["ppl"] = ppl(model)
    out["loss_final"] = np.array([r.loss_final for r in res.layers])
    out["loss_trained"] = np.array([r.loss_trained for r in res.layers])
    for path, v in nnx.to_flat_state(nnx.state(model)):
        if any(p in path for p in ("transform", "act_clip", "weight_clip")):
            out["p/" + "/".join(map(str, path))] = fetch(v[...])
    from batquant_jax.qlayers import packed_weights
    for name, q in packed_weights(model).items():
        out[f"q/{name}"] = fetch(q.codes)
    if out_dir is not None:
        checkpoint.save_quantized(out_dir, model, res)
    jax.effects_barrier()
    return out


def _all(mesh, out_dir=None) -> dict:
    """One training step; batquant trained (2 epochs); batquant untrained ("brq": block
    Hadamard init, fixed clipping), where only the Hessians' reduction order separates runs."""
    res = {f"grads/{k}": v for k, v in _grads(mesh).items()}
    for name, epochs in (("batquant", HPARAMS["epochs"]), ("brq", 0)):
        res.update({f"{name}/{k}": v for k, v in _calibrate(mesh, epochs, out_dir and
                                                            f"{out_dir}-{name}").items()})
    return res


def _worker(argv):
    mode, out = argv[0], argv[1]
    if mode == "multiprocess":  # argv: multiprocess OUT PORT PID NPROC CKPT
        from batquant_jax import distributed
        distributed.initialize(f"localhost:{argv[2]}", int(argv[4]), int(argv[3]))
    import jax

    from batquant_jax import distributed
    results = {}
    if mode == "devices":  # argv: devices OUT MESH...
        results.update({f"single/{k}": v for k, v in _all(None).items()})
        for spec in argv[2:]:
            mesh = distributed.make_mesh(spec)
            results.update({f"{spec}/{k}": v for k, v in _all(mesh).items()})
            try:  # a batch that does not split over the data axis is refused
                from batquant_jax.calibration import quantize_model
                bs = distributed.DataParallel(mesh).data_size + 1
                quantize_model(_model(), _windows(8, 0), "rtn", mesh=mesh, batch_size=bs)
            except ValueError as e:
                results[f"{spec}/refused"] = np.array("divisible by the data-axis size" in str(e))
    else:
        mesh = distributed.make_mesh(None)
        results.update({f"mp/{k}": v for k, v in _all(mesh, argv[5]).items()})
        results["process_rows"] = np.array(
            [distributed.DataParallel(mesh).process_rows(NSAMPLES).start, jax.process_count()])
    np.savez(out, **results)


# ----------------------------------------------------------------------------- tests

def _run(args, devices, timeout=600):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, str(HERE)] + args, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait(procs, timeout=600):
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out[-3000:]


LR, STEPS = 2e-3, HPARAMS["epochs"] * NSAMPLES // BATCH  # CalibConfig's default lr


def _compare(res, a, b):
    """Asserts that run ``a`` matches run ``b`` (e.g. "data:4" and "single")."""
    get = lambda run, k: res[f"{run}/{k}"]  # noqa: E731
    # one step: the data-parallel loss and gradients are the 1-device ones (float32 order)
    np.testing.assert_allclose(get(a, "grads/loss"), get(b, "grads/loss"), rtol=1e-5)
    grads = [k[len(b) + 7:] for k in res if k.startswith(f"{b}/grads/g")]
    assert len(grads) == 34  # 12 transform, 8 activation-clip, 14 weight-clip parameters
    for k in grads:
        ref = get(b, f"grads/{k}")
        assert np.max(np.abs(get(a, f"grads/{k}") - ref)) <= 1e-5 * np.max(np.abs(ref)), k
    # brq (no training): Hessians all-reduced over the data axis, then the same GPTQ
    for k in ("ppl_fp", "ppl", "loss_final"):
        np.testing.assert_allclose(get(a, f"brq/{k}"), get(b, f"brq/{k}"), rtol=1e-4)
    codes = [k for k in res if k.startswith(f"{b}/brq/q/")]
    assert len(codes) == 14
    flips = sum(int(np.sum(res[k] != get(a, k[len(b) + 1:]))) for k in codes)
    total = sum(res[k].size for k in codes)
    assert flips <= 1e-3 * total, (flips, total)
    # batquant: Adam turns float32-order noise in near-zero gradients into steps of up to lr,
    # so the learned parameters agree to lr * steps, the losses to a few percent
    params = [k[len(b) + 1:] for k in res if k.startswith(f"{b}/batquant/p/")]
    assert len(params) > 40
    for k in params:
        assert np.max(np.abs(get(a, k) - get(b, k))) <= LR * STEPS, k
    np.testing.assert_allclose(get(a, "batquant/ppl_fp"), get(b, "batquant/ppl_fp"), rtol=1e-5)
    for k in ("loss_trained", "loss_final"):
        np.testing.assert_allclose(get(a, f"batquant/{k}"), get(b, f"batquant/{k}"), rtol=0.05)


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "devices.npz"
    _wait([_run(["devices", str(out), "data:4", "data:2,model:2"], 4)])
    return dict(np.load(out))


@pytest.mark.parametrize("spec", ["data:4", "data:2,model:2"])
def test_four_devices_match_one(four_devices, spec):
    _compare(four_devices, spec, "single")
    assert bool(four_devices[f"{spec}/refused"])  # batch 5 on a data axis of 4, 3 on 2


def test_two_processes_match_one_device(four_devices, tmp_path):
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    ckpt = tmp_path / "ckpt"
    outs = [tmp_path / f"p{i}.npz" for i in range(2)]
    _wait([_run(["multiprocess", str(outs[i]), str(port), str(i), "2", str(ckpt)], 1)
           for i in range(2)])
    res = [dict(np.load(o)) for o in outs]
    # two processes of one device each; each read its own half of the windows
    assert [r["process_rows"].tolist() for r in res] == [[0, 2], [NSAMPLES // 2, 2]]
    _compare(dict(four_devices, **res[0]), "mp", "single")
    for k in res[0]:  # both processes hold the same model
        if k != "process_rows":
            np.testing.assert_array_equal(res[0][k], res[1][k], err_msg=k)
    # one checkpoint per method, written once through Orbax, holds those packed weights
    from batquant_jax import checkpoint
    arrays = checkpoint.read_arrays(f"{ckpt}-batquant")
    for name, path in (("layers.0.q_proj", "0/self_attn/q_proj"),
                       ("layers.1.down_proj", "1/mlp/down_proj")):
        np.testing.assert_array_equal(arrays[f"qweights/layers/{path}/codes"],
                                      res[0][f"mp/batquant/q/{name}"])


def test_parse_mesh():
    from batquant_jax import distributed
    assert distributed.parse_mesh("data:2,model:2", 4) == {"data": 2, "model": 2}
    assert distributed.parse_mesh(None, 8) == {"data": 8, "model": 1}
    assert distributed.parse_mesh("model:2", 8) == {"data": 4, "model": 2}
    assert distributed.parse_mesh("data:2", 4) == {"data": 2, "model": 1}
    for bad in ("data:3", "rows:2", "data:x", "data:0", "data:2,data:1"):
        with pytest.raises(ValueError, match="mesh"):
            distributed.parse_mesh(bad, 2)


def test_calibrate_mesh_flag_is_checked():
    from batquant_jax import calibrate
    cfg = calibrate.CalibrateConfig(output_dir="/tmp/unused", mesh="data:2")
    with pytest.raises(calibrate.ConfigError, match="needs 2 devices, 1 available"):
        calibrate._mesh(cfg)
    assert calibrate._mesh(calibrate.CalibrateConfig(output_dir="/tmp/unused")) is None


def test_memory_estimate_of_qwen3_8b():
    from batquant_jax.distributed import calibration_bytes_per_device
    est = calibration_bytes_per_device(hidden=4096, intermediate=12288, nsamples=128,
                                       seqlen=2048, batch_size=4, data=8)
    assert est["activations"] == 4 * 128 * 2048 * 4096 * 4 // 8  # 2 GiB: x, y and batched copies
    assert est["hessians"] == (3 * 4096 ** 2 + 12288 ** 2) * 4


if __name__ == "__main__":
    _worker(sys.argv[1:])
