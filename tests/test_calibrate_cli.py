"""End-to-end tests of ``python -m batquant_jax.calibrate`` on a tiny random Llama folder."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from batquant_jax import calibrate, checkpoint, data
from batquant_jax.models import ModelLoadError

from conftest import N_LAYERS, make_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    text = make_tiny(root / "model")
    return root / "model", text


def flags_for(model, text, out):
    return [f"--model={model}", f"--calib_data={text}", f"--output_dir={out}", "--nsamples=8",
            "--seqlen=32", "--epochs=1", "--batch_size=4"]


def config_for(model, text, out, **kw):
    return calibrate.CalibrateConfig(model=str(model), calib_data=str(text), output_dir=str(out),
                                     nsamples=8, seqlen=32, epochs=1, batch_size=4, **kw)


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """An uninterrupted in-process run with evaluation: (config, metadata, stdout lines)."""
    model, text = tiny
    out = tmp_path_factory.mktemp("ref") / "run"
    cfg = config_for(model, text, out, eval_data=str(text), eval_seqlen=32, eval_max_tokens=512)
    lines = []
    meta = calibrate.run_calibration(cfg, log=lambda s: None, out=lines.append)
    return cfg, meta, "\n".join(lines).splitlines()


def run_cli(module, args, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_reference_run_writes_only_the_artifact(reference):
    cfg, meta, lines = reference
    assert sorted(os.listdir(cfg.output_dir)) == ["checkpoint", "metadata.json", "tokenizer"]
    assert (meta["method"], meta["setting"], meta["seed"]) == ("batquant", "W4A4KV16", 0)
    assert [r["index"] for r in meta["layers"]] == list(range(N_LAYERS))
    assert meta["model_config"]["num_layers"] == N_LAYERS and meta["sizes"]["linears"] == 7 * N_LAYERS
    n = N_LAYERS * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3)
    s = meta["sizes"]
    assert (s["elements"], s["bits_per_element"], s["float32_bytes"]) == (n, 4.25, 4 * n)
    assert meta["calib_data"]["tokens"] == 4504 and meta["flags"]["nsamples"] == 8
    assert lines[0].split() == ["layer", "token_mse", "rtn", "init", "trained", "final", "steps", "seconds"]
    assert len(lines) == 1 + N_LAYERS + 4
    assert lines[-3] == f"perplexity fp: {meta['eval']['perplexity_fp']:.4f}"


def test_evaluate_checkpoint_gives_the_same_perplexity(reference, tmp_path):
    cfg, meta, _ = reference
    out_json = tmp_path / "ppl.json"
    res = run_cli("batquant_jax.evaluate", [f"--checkpoint={cfg.output_dir}",
                                            f"--eval_data={cfg.eval_data}", "--seqlen=32",
                                            "--max_tokens=512", f"--output_json={out_json}"])
    assert res.returncode == 0, res.stderr[-2000:]
    ppl = json.loads(out_json.read_text())["perplexity"]
    assert abs(ppl / meta["eval"]["perplexity_quantized"] - 1) <= 1e-4
    assert res.stdout.strip().splitlines()[-1] == f"perplexity: {ppl:.4f}"


def test_killed_run_resumes_to_the_same_checkpoint(tiny, reference, tmp_path):
    model, text = tiny
    out = tmp_path / "run"
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"))
    args = [sys.executable, "-m", "batquant_jax.calibrate", *flags_for(model, text, out)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    progress = out / "resume" / "progress.json"
    deadline = time.time() + 200
    while time.time() < deadline and proc.poll() is None:
        if progress.is_file() and json.loads(progress.read_text())["layers_done"] >= 1:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(progress.read_text())["layers_done"]
    assert 1 <= done < N_LAYERS and not (out / "metadata.json").exists()
    res = run_cli("batquant_jax.calibrate", flags_for(model, text, out), env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"calibrate: resuming: layers 1-{done} of {N_LAYERS} restored" in res.stderr
    assert sorted(os.listdir(out)) == ["checkpoint", "metadata.json", "tokenizer"]
    got, want = checkpoint.read_arrays(out), checkpoint.read_arrays(reference[0].output_dir)
    assert sorted(got) == sorted(want)
    assert [k for k in want if not np.array_equal(got[k], want[k])] == []
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["sessions"] == 2
    assert [(c["from_layer"], c["backend"], c["cpu_threads"]) for c in meta["compute"]] == [
        (0, "cpu", len(os.sched_getaffinity(0))), (done, "cpu", len(os.sched_getaffinity(0)))]
    assert [r["loss_final"] for r in meta["layers"]] == [r["loss_final"] for r in reference[1]["layers"]]


def test_save_failure_keeps_last_commit_then_resumes(tiny, reference, tmp_path, monkeypatch):
    model, text = tiny
    cfg = config_for(model, text, tmp_path / "run")
    real_save, calls = checkpoint.save_tree, []

    def failing(path, items):  # layer 2's item is written, then its inputs hit a full disk
        calls.append(path)
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        real_save(path, items)

    monkeypatch.setattr(checkpoint, "save_tree", failing)
    with pytest.raises(calibrate.SaveError) as e:
        calibrate.run_calibration(cfg, log=lambda s: None, out=lambda s: None)
    assert "No space left on device" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.undo()
    progress = checkpoint.ResumeStore(cfg.output_dir).progress()
    assert progress["layers_done"] == 1 and len(progress["reports"]) == 1
    meta = calibrate.run_calibration(cfg, log=lambda s: None, out=lambda s: None)
    assert meta["sessions"] == 2
    got, want = checkpoint.read_arrays(cfg.output_dir), checkpoint.read_arrays(reference[0].output_dir)
    assert [k for k in want if not np.array_equal(got[k], want[k])] == []


def test_rerun_with_other_flags_is_refused(reference):
    cfg, meta, _ = reference
    with pytest.raises(calibrate.ConfigError) as e:
        calibrate.run_calibration(dataclasses.replace(cfg, epochs=2, lr=1e-3), log=lambda s: None)
    assert "different flags: --epochs=1 (now 2), --lr=0.01 (now 0.001);" in str(e.value)
    again = calibrate.run_calibration(cfg, log=lambda s: None)  # same flags: nothing to redo
    assert again["wall_time_s"] == meta["wall_time_s"]


def test_a_run_recorded_before_a_flag_existed_has_its_default(reference, monkeypatch):
    cfg, _, _ = reference
    real = checkpoint.read_json

    def older(path):  # the record of a version without --anchor
        record = real(path)
        del record["flags"]["anchor"]
        return record

    monkeypatch.setattr(checkpoint, "read_json", older)
    assert calibrate.inspect_output_dir(cfg)[0] == "done"
    with pytest.raises(calibrate.ConfigError) as e:
        calibrate.inspect_output_dir(dataclasses.replace(cfg, anchor=0.5))
    assert "different flags: --anchor=0.0 (now 0.5);" in str(e.value)


@pytest.mark.parametrize("change,error,message", [
    (dict(method="awq"), calibrate.ConfigError, "--method=awq is unknown; valid: rtn, gptq,"),
    (dict(setting="W4A2"), calibrate.ConfigError, "--setting=W4A2 is unknown"),
    (dict(g1=8, g2=3), calibrate.ConfigError,
     "--g1 * --g2 (the transform block) must be one of 16, 32, 64, 128, got 8 * 3 = 24"),
    (dict(nsamples=2), calibrate.ConfigError, "--nsamples (2) must be >= --batch_size (4)"),
    (dict(seqlen=256), calibrate.ConfigError, "--seqlen 256 exceeds the model's context of 128"),
    (dict(setting="W4A8KV4"), calibrate.ConfigError, "--setting W4A8KV4 quantizes keys and "
     "values in blocks of 32 along head_dim, but "),
    (dict(kv_transform="rotate"), calibrate.ConfigError,
     "--kv_transform=rotate is unknown; valid: none, block_hadamard, learned"),
    (dict(model="/nonexistent/model"), ModelLoadError, "model path /nonexistent/model does not exist"),
    (dict(calib_data="/nonexistent.txt"), data.DataError, "corpus '/nonexistent.txt' not found"),
])
def test_bad_input_fails_before_any_work(tiny, tmp_path, change, error, message):
    model, text = tiny
    cfg = dataclasses.replace(config_for(model, text, tmp_path / "run"), **change)
    with pytest.raises(error) as e:
        calibrate.run_calibration(cfg, log=lambda s: None)
    assert message in str(e.value) and not (tmp_path / "run").exists()


def test_cli_bad_flags_exit_2_with_one_line(tiny, reference, tmp_path):
    model, text = tiny
    res = run_cli("batquant_jax.calibrate", flags_for(model, text, tmp_path / "a") + ["--g2=3"])
    assert (res.returncode, res.stderr) == (2, "error: --g1 * --g2 (the transform block) must be "
                                               "one of 16, 32, 64, 128, got 8 * 3 = 24\n")
    res = run_cli("batquant_jax.calibrate",
                  flags_for(model, text, reference[0].output_dir)[:-1] + ["--batch_size=2"])
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert "different flags: --batch_size=4 (now 2);" in res.stderr


def test_flags_accept_what_the_library_accepts():
    # Before the fix the command accepted only g1 * g2 == 32 while CalibConfig takes every
    # transform block of TRANSFORM_BLOCKS; scale modes were a literal copy of mx.SCALE_MODES.
    from batquant_jax import mx
    from batquant_jax.calibration import TRANSFORM_BLOCKS
    for g1, g2 in [(4, 4), (8, 4), (8, 8), (16, 8)]:
        cfg = calibrate.CalibrateConfig(output_dir="x", g1=g1, g2=g2).validate()
        assert (cfg.g1 * cfg.g2 in TRANSFORM_BLOCKS, cfg.g1, cfg.g2) == (True, g1, g2)
    for mode in mx.SCALE_MODES:
        assert calibrate.CalibrateConfig(output_dir="x", scale_mode=mode).validate().scale_mode == mode
    with pytest.raises(calibrate.ConfigError) as e:
        calibrate.CalibrateConfig(output_dir="x", scale_mode="round").validate()
    assert str(e.value) == "--scale_mode=round is unknown; valid: floor, ceil, even, rceil"


def test_two_calibration_sources_share_the_windows(tiny, tmp_path):
    model, text = tiny
    code = tmp_path / "code.py"
    code.write_text("def f(x):\n    return [i * x for i in range(10)]\n" * 40)
    cfg = dataclasses.replace(config_for(model, text, tmp_path / "run"), epochs=0,
                              calib_data=f"{text},{code}")
    meta = calibrate.run_calibration(cfg, log=lambda s: None, out=lambda s: None)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(model))
    ids = [data.tokenize_corpus(data.load_corpus(p), tok) for p in (text, code)]
    want = data.sample_mixed(ids, 8, 32, 0)
    assert meta["calib_data"]["tokens_sha256"] == checkpoint.array_digest(want)
    assert meta["calib_data"]["tokens"] == sum(int(i.size) for i in ids)
    with pytest.raises(calibrate.ConfigError, match="--nsamples 1 is fewer than the 2"):
        dataclasses.replace(cfg, nsamples=1, batch_size=1).validate()
