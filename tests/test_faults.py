"""Fault injection on the command lines: damaged files, a full disk, Ctrl-C, two runs in one
folder and bad inputs each end in one ``error:`` line with the documented exit code (2: bad
input, 1: a failed write or an unusable result, 130: interrupted), print no traceback, and lose
nothing that was committed.

One tiny checkpoint (a random 6-layer Llama, rtn) is built in-process and reused; the faults are
injected into copies. A small wrapper runs a command line with one fault armed: a file-size
limit (RLIMIT_FSIZE, so a real write inside Orbax fails with EFBIG, as on a full disk) from the
n-th checkpoint write on, or a real SIGINT sent after a given layer is committed.
"""

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from batquant_jax import calibrate, checkpoint, cli
from batquant_jax.models import LlamaForCausalLM
from batquant_jax.qlayers import LINEAR_NAMES as LINEARS
from conftest import N_LAYERS, make_tiny

WRAPPER = r'''
import os, resource, runpy, signal, sys, time
from batquant_jax import checkpoint
kind, *arg = os.environ["FAULT"].split(":", 2)
if kind == "fsize":  # from the n-th save_tree call on, no file may exceed `limit` bytes
    call, limit = int(arg[0]), int(arg[1])
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    real_save, calls = checkpoint.save_tree, []
    def save_tree(path, items):
        calls.append(path)
        if len(calls) == call:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        return real_save(path, items)
    checkpoint.save_tree = save_tree
elif kind == "sigint":  # after layer n is committed, wait for the file `go`, then Ctrl-C
    layer, go = int(arg[0]), arg[1]
    # a process started in the background of a non-interactive shell inherits SIGINT ignored
    # (and Python then keeps it so): restore Python's own handler, as an interactive run has it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    real_layer = checkpoint.ResumeStore.save_layer
    def save_layer(self, i, *args):
        progress = real_layer(self, i, *args)
        if i + 1 == layer:
            while not os.path.exists(go):
                time.sleep(0.02)
            os.kill(os.getpid(), signal.SIGINT)
        return progress
    checkpoint.ResumeStore.save_layer = save_layer
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
'''

TRACE_MARKS = ("Traceback", "Event loop is closed", "Unable to initialize backend")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Paths shared by the module: the tiny model, its text, the wrapper, the subprocess env."""
    root = tmp_path_factory.mktemp("faults")
    text = make_tiny(root / "model")
    run_text = root / "run_text.txt"  # the interrupted run's own copy (one test edits it)
    shutil.copy(text, run_text)
    wrapper = root / "inject.py"
    wrapper.write_text(WRAPPER, encoding="utf-8")
    sub_env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"))
    return {"root": root, "model": root / "model", "text": text, "run_text": run_text,
            "wrapper": wrapper, "env": sub_env}


def flags(env, out, text=None):
    """rtn with --nsamples 2 < --batch_size 4: allowed, rtn does not train."""
    return [f"--model={env['model']}", f"--calib_data={text or env['text']}",
            f"--output_dir={out}", "--nsamples=2", "--seqlen=32", "--method=rtn"]


def run(env, module, args, fault=None, cwd=None, timeout=240):
    cmd = [sys.executable] + ([str(env["wrapper"])] if fault else ["-m"]) + [module, *args]
    e = dict(env["env"], FAULT=fault) if fault else env["env"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e, cwd=cwd)


def start(env, module, args, fault):
    return subprocess.Popen([sys.executable, str(env["wrapper"]), module, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(env["env"], FAULT=fault))


def last_error(stderr: str) -> str:
    """The last stderr line, after checking it is the only ``error:`` line and no traceback."""
    lines = stderr.strip().splitlines()
    assert [m for m in TRACE_MARKS if m in stderr] == []
    assert [ln for ln in lines if ln.startswith("error:")] == lines[-1:]
    return lines[-1]


def arrays_equal(a, b) -> list[str]:
    """Keys whose arrays differ between two finished checkpoints ([] when identical)."""
    got, want = checkpoint.read_arrays(a), checkpoint.read_arrays(b)
    assert sorted(got) == sorted(want)
    return [k for k in want if not np.array_equal(got[k], want[k])]


def tree_files(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def largest_file(folder: pathlib.Path) -> pathlib.Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.fixture(scope="module")
def ref(env):
    """The reference checkpoint, made in-process with the flags of ``flags``."""
    out = env["root"] / "ref"
    cfg = calibrate.CalibrateConfig(model=str(env["model"]), calib_data=str(env["text"]),
                                    output_dir=str(out), nsamples=2, seqlen=32, method="rtn")
    meta = calibrate.run_calibration(cfg, log=lambda s: None, out=lambda s: None)
    return out, meta


@pytest.fixture(scope="module")
def interrupted(env):
    """A run Ctrl-C'd after layer 2, and a second run started into its folder meanwhile."""
    out = env["root"] / "interrupted"
    go = env["root"] / "go"
    first = start(env, "batquant_jax.calibrate", flags(env, out, env["run_text"]),
                  f"sigint:2:{go}")
    progress = out / "resume" / "progress.json"
    deadline = time.time() + 200
    while time.time() < deadline and first.poll() is None:
        if progress.is_file() and json.loads(progress.read_text())["layers_done"] == 2:
            break
        time.sleep(0.05)
    lock = json.loads((out / ".lock").read_text())
    second = run(env, "batquant_jax.calibrate", flags(env, out, env["run_text"]))
    go.touch()
    _, err = first.communicate(timeout=200)
    return {"out": out, "first": (first.returncode, err), "second": second, "lock": lock}


def copy_of(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    return dst


# ----------------------------------------------------------------------------- silent wrong results

@pytest.mark.parametrize("name", ["resume.pdf", "checkpoint_notes.txt", "metadata", "lock",
                                  "tokenizer.json", "resume.pdf.tmp"])
def test_user_files_in_output_dir_are_refused_and_kept(env, tmp_path, name):
    """Only the exact names calibrate writes are its own; a user's resume.pdf is not."""
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / name).write_text("CV")
    for extra in ([], ["--overwrite"]):
        res = run(env, "batquant_jax.calibrate", flags(env, jobs) + extra)
        assert res.returncode == 2
        assert last_error(res.stderr) == (
            f"error: --output_dir {jobs} holds files this command did not write ({name}); "
            "pass an empty or new folder")
        assert sorted(os.listdir(jobs)) == [name] and (jobs / name).read_text() == "CV"


def _edit_meta(ck, edit, redigest=False):
    meta = json.loads((ck / "metadata.json").read_text())
    edit(meta)
    if redigest:  # a careful editor who also recomputes the metadata digest
        meta["metadata_sha256"] = checkpoint.meta_digest(meta)
    (ck / "metadata.json").write_text(json.dumps(meta, indent=1))


@pytest.mark.parametrize("edit, redigest, message", [
    (lambda m: m["calib_config"].update(setting="W4A8KV16"), False, "{ck}/metadata.json was "
     "changed after it was written (its metadata_sha256 does not match its contents); quantize "
     "the model again or restore the file"),
    (lambda m: m["model_config"].update(rope_theta=5e5), False, "{ck}/metadata.json was changed"),
    (lambda m: m["model_config"].update(rms_norm_eps=1e-3), False, "{ck}/metadata.json was "
     "changed"),
    (lambda m: m.pop("checksums"), False, "{ck}/metadata.json was changed"),
    (lambda m: m.pop("checksums"), True, "{ck}/metadata.json has no 'checksums' table; the "
     "arrays cannot be verified"),
    (lambda m: m.pop("metadata_sha256"), False, "{ck}/metadata.json was changed"),
])
def test_edited_metadata_never_loads(env, ref, tmp_path, edit, redigest, message):
    ck = copy_of(ref[0], tmp_path / "ck")
    _edit_meta(ck, edit, redigest)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load_quantized(ck)
    assert str(e.value).startswith(message.format(ck=ck))


def test_edited_tokenizer_never_loads(env, ref, tmp_path):
    ck = copy_of(ref[0], tmp_path / "ck")
    tok = ck / "tokenizer" / "tokenizer.json"
    spec = json.loads(tok.read_text())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab)[2:4]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two words swap ids: the text would change
    tok.write_text(json.dumps(spec))
    with pytest.raises(checkpoint.CheckpointError, match=rf"^{tok} was changed after it was "
                                                         r"written \(sha256 [0-9a-f]{12}, recorded "):
        checkpoint.load_quantized(ck)
    res = run(env, "batquant_jax.generate", [f"--checkpoint={ck}", "--prompt=the",
                                             "--max_new_tokens=2"])
    assert res.returncode == 2 and last_error(res.stderr).startswith(f"error: {tok} was changed")
    shutil.copy(ref[0] / "tokenizer" / "tokenizer.json", tok)
    checkpoint.load_quantized(ck)  # restored: loads again
    (ck / "tokenizer" / "added.json").write_text("{}")
    with pytest.raises(checkpoint.CheckpointError, match=rf"^{ck}/tokenizer/added.json was not "
                                                         "written with this checkpoint"):
        checkpoint.load_quantized(ck)


@pytest.mark.parametrize("target, what", [("{ckpt}/metadata.json", "lies inside --checkpoint"),
                                          ("{ckpt}/checkpoint/x.json", "lies inside --checkpoint"),
                                          ("{text}", "is --eval_data")])
def test_output_json_never_overwrites_an_input(env, ref, tmp_path, target, what):
    ckpt = copy_of(ref[0], tmp_path / "ckpt")
    before = tree_files(ckpt)
    text_before = pathlib.Path(env["text"]).read_bytes()
    out = target.format(ckpt=ckpt, text=env["text"])
    res = run(env, "batquant_jax.evaluate", [f"--checkpoint={ckpt}", f"--eval_data={env['text']}",
                                             f"--output_json={out}"])
    assert res.returncode == 2
    src = ckpt if "checkpoint" in what else env["text"]
    assert last_error(res.stderr) == (f"error: --output_json {out} {what} {src}: writing it "
                                      "would damage an input; name a file elsewhere")
    assert tree_files(ckpt) == before and pathlib.Path(env["text"]).read_bytes() == text_before
    acc = run(env, "batquant_jax.evaluate", [f"--checkpoint={ckpt}", "--tasks=piqa",
                                             f"--output_json={ckpt}/metadata.json"])
    assert acc.returncode == 2 and last_error(acc.stderr) == (
        f"error: --output_json {ckpt}/metadata.json lies inside --checkpoint {ckpt}: writing it "
        "would damage an input; name a file elsewhere")
    assert tree_files(ckpt) == before


def test_rtn_accepts_fewer_samples_than_the_batch_and_checksums_every_array(ref):
    out, meta = ref
    assert (meta["flags"]["batch_size"], meta["calib_config"]["batch_size"]) == (4, 2)
    arrays = checkpoint.read_arrays(out)
    assert meta["checksums"] == {k: checkpoint.array_digest(v) for k, v in arrays.items()}
    assert len([k for k in arrays if k.startswith("qweights/")]) == 2 * 7 * N_LAYERS


def test_changed_array_fails_load_naming_it(ref, tmp_path):
    """An array rewritten behind the metadata's back (a silent change of one MXFP4 code)."""
    ck = copy_of(ref[0], tmp_path / "ck")
    arrays = checkpoint.read_arrays(ck)
    arrays["qweights/layers/3/mlp/down_proj/codes"][5, 7] ^= 0x01
    trees = checkpoint._nest({tuple(k.split("/")): v for k, v in arrays.items()})
    checkpoint.save_tree(ck / "checkpoint", trees)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load_quantized(ck)
    assert str(e.value) == (f"{ck}/checkpoint: stored array qweights/layers/3/mlp/down_proj/codes "
                            "does not match the sha256 recorded when it was written: the file is "
                            "damaged or was changed after it was written")


def test_flipped_byte_on_disk_fails_evaluate(env, ref, tmp_path):
    ck = copy_of(ref[0], tmp_path / "ck")
    data = largest_file(ck / "checkpoint" / "qweights")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x11
    data.write_bytes(bytes(raw))
    res = run(env, "batquant_jax.evaluate", [f"--checkpoint={ck}", f"--eval_data={env['text']}",
                                             "--seqlen=32", "--max_tokens=512"])
    assert res.returncode == 2 and res.stdout == ""
    assert re.fullmatch(rf"error: {ck}/checkpoint: stored array qweights/layers/\d/\w+/\w+/(codes|"
                        r"scales) does not match the sha256 recorded when it was written: the "
                        r"file is damaged or was changed after it was written",
                        last_error(res.stderr)) is not None


def test_nonfinite_perplexity_exits_1(env, ref, tmp_path):
    ck = copy_of(ref[0], tmp_path / "ck")
    arrays = checkpoint.read_arrays(ck)
    arrays["params/lm_head/weight"][3] = np.nan
    items = checkpoint._nest({tuple(k.split("/")): v for k, v in arrays.items()})
    checkpoint.save_tree(ck / "checkpoint", items)
    meta = json.loads((ck / "metadata.json").read_text())
    meta = dict(meta, checksums=checkpoint.tree_digests(items))
    checkpoint.write_json(ck / "metadata.json", dict(meta, metadata_sha256=checkpoint.meta_digest(meta)))
    out_json = tmp_path / "ppl.json"
    res = run(env, "batquant_jax.evaluate", [f"--checkpoint={ck}", f"--eval_data={env['text']}",
                                             "--seqlen=32", "--max_tokens=512",
                                             f"--output_json={out_json}"])
    assert (res.returncode, res.stdout, out_json.exists()) == (1, "", False)
    assert last_error(res.stderr) == ("error: perplexity is inf over 512 tokens: the model's "
                                      "predictions are not finite (a damaged checkpoint or an "
                                      "overflow); no result is written")
    gen = run(env, "batquant_jax.generate", [f"--checkpoint={ck}", "--prompt=the cat",
                                             "--max_new_tokens=4"])
    assert (gen.returncode, gen.stdout) == (1, "\n")
    assert last_error(gen.stderr) == ("error: the model's logits are not finite at new token 1 "
                                      "(row 0): a damaged checkpoint or an overflow; no further "
                                      "token is produced")


def test_second_run_fails_at_once_naming_the_holder(env, interrupted):
    res, lock = interrupted["second"], interrupted["lock"]
    assert (lock["host"], res.returncode) == (socket.gethostname(), 2)
    assert re.fullmatch(rf"error: --output_dir {interrupted['out']} is in use by pid {lock['pid']} "
                        rf"on host {re.escape(lock['host'])} \(since [-0-9: ]+\); wait for that "
                        rf"run to end \(if it is gone, remove {interrupted['out']}/.lock\)",
                        last_error(res.stderr)) is not None
    assert res.stderr.count("\n") == 1  # nothing loaded before the refusal


def test_changed_calibration_text_is_refused_on_resume(env, interrupted, tmp_path):
    out = copy_of(interrupted["out"], tmp_path / "run")
    before = tree_files(out)
    original = env["run_text"].read_text(encoding="utf-8")
    try:
        env["run_text"].write_text("dog eats fish. " + original, encoding="utf-8")
        res = run(env, "batquant_jax.calibrate", flags(env, out, env["run_text"]))
    finally:
        env["run_text"].write_text(original, encoding="utf-8")
    assert res.returncode == 2
    assert re.fullmatch(rf"error: --calib_data {env['run_text']} changed since layers 1-2 in {out} "
                        r"were calibrated: the sampled calibration tokens differ \(sha256 "
                        r"[0-9a-f]{12} then, [0-9a-f]{12} now\); restore that text to resume, or "
                        r"pass --overwrite to start over", last_error(res.stderr)) is not None
    assert tree_files(out) == before


# ----------------------------------------------------------------------------- faults

def test_ctrl_c_keeps_the_committed_layers(interrupted):
    code, err = interrupted["first"]
    out = interrupted["out"]
    assert code == 130
    assert last_error(err) == (f"error: interrupted; layers 1-2 of {N_LAYERS} are kept in "
                               f"{out}/resume: rerun the same command to resume from layer 3")
    assert json.loads((out / "resume" / "progress.json").read_text())["layers_done"] == 2
    assert sorted(os.listdir(out)) == ["resume"]  # the lock is released


def test_rerun_after_ctrl_c_takes_over_a_stale_lock_and_resumes_exactly(env, ref, interrupted,
                                                                         tmp_path):
    out = copy_of(interrupted["out"], tmp_path / "run")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (out / ".lock").write_text(json.dumps({"pid": int(gone), "host": socket.gethostname(),
                                           "started": time.time() - 60, "argv": []}))
    res = run(env, "batquant_jax.calibrate", flags(env, out, env["run_text"]))
    assert res.returncode == 0, res.stderr[-2000:]
    assert [m for m in TRACE_MARKS if m in res.stderr] == []
    taking = [ln for ln in res.stderr.splitlines() if "taking over the lock" in ln]
    assert len(taking) == 1 and re.fullmatch(
        rf"calibrate: taking over the lock of pid {gone} on host {re.escape(socket.gethostname())}"
        rf" \(since [-0-9: ]+\) on {out}: that process no longer exists", taking[0]) is not None
    assert f"calibrate: resuming: layers 1-2 of {N_LAYERS} restored" in res.stderr
    assert sorted(os.listdir(out)) == ["checkpoint", "metadata.json", "tokenizer"]
    assert arrays_equal(out, ref[0]) == []


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_resume_state_is_refused(env, interrupted, tmp_path, damage):
    out = copy_of(interrupted["out"], tmp_path / "run")
    data = largest_file(out / "resume" / "layer_001" / "qweights")
    raw = data.read_bytes()
    if damage == "flip":
        data.write_bytes(raw[: len(raw) // 2] + bytes([raw[len(raw) // 2] ^ 0x11])
                         + raw[len(raw) // 2 + 1:])
    else:
        data.write_bytes(raw[: len(raw) // 3])
    before = tree_files(out)
    res = run(env, "batquant_jax.calibrate", flags(env, out, env["run_text"]))
    assert res.returncode == 2
    line = last_error(res.stderr)
    pattern = (rf"error: {out}/resume/layer_001: stored array qweights/\w+/\w+/(codes|scales) does "
               r"not match the sha256 recorded when it was written: the file is damaged or was "
               r"changed after it was written; pass --overwrite to start over"
               if damage == "flip" else
               rf"error: cannot restore {out}/resume/layer_001: array [\w.]+\.(codes|scales) is "
               r"unreadable: ValueError: .*; pass --overwrite to start over")
    assert re.fullmatch(pattern, line) is not None, line
    assert {k: v for k, v in tree_files(out).items() if k != "resume/progress.json"} == \
        {k: v for k, v in before.items() if k != "resume/progress.json"}
    assert json.loads((out / "resume" / "progress.json").read_text())["layers_done"] == 2


@pytest.mark.parametrize("damage", ["truncate", "remove"])
def test_damaged_checkpoint_file_fails_evaluate_in_one_line(env, ref, tmp_path, damage):
    ck = copy_of(ref[0], tmp_path / "ck")
    data = largest_file(ck / "checkpoint" / ("qweights" if damage == "truncate" else "params"))
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[:1000])
    else:
        data.unlink()
    res = run(env, "batquant_jax.evaluate", [f"--checkpoint={ck}", f"--eval_data={env['text']}",
                                             "--seqlen=32", "--max_tokens=512"])
    assert res.returncode == 2
    assert re.fullmatch(rf"error: cannot restore {ck}/checkpoint: array [\w.]+ is unreadable: "
                        r"ValueError: .{1,203}", last_error(res.stderr)) is not None


def test_damaged_checkpoint_file_fails_the_library_call_quietly(ref, tmp_path, capfd):
    """The Python API: one CheckpointError naming the array, and nothing on stderr (no
    tracebacks of Orbax's asyncio threads)."""
    ck = copy_of(ref[0], tmp_path / "ck")
    data = largest_file(ck / "checkpoint" / "qweights")
    data.write_bytes(data.read_bytes()[:1000])
    capfd.readouterr()
    with pytest.raises(checkpoint.CheckpointError, match=r"array [\w.]+\.(codes|scales) is "
                       r"unreadable: ValueError: "):
        checkpoint.load_quantized(ck)
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("call,where", [(4, "resume/inputs_001"), (2 * N_LAYERS + 1, "checkpoint")])
def test_full_disk_keeps_the_state_and_a_rerun_recovers(env, ref, tmp_path, call, where):
    """Writes fail inside Orbax (a ValueError there) between layers or at the final save; the
    committed layers restore (their checksums hold), and after the final save failed a rerun
    writes the same checkpoint as an uninterrupted run."""
    out = tmp_path / "run"
    res = run(env, "batquant_jax.calibrate", flags(env, out), fault=f"fsize:{call}:8000")
    assert res.returncode == 1
    assert last_error(res.stderr) == (f"error: cannot write the checkpoint in {out}: File too "
                                      f"large ({out}/{where}); the last committed layer is kept: "
                                      "fix the cause and rerun the same command to resume")
    done = json.loads((out / "resume" / "progress.json").read_text())["layers_done"]
    assert (done, (out / "metadata.json").exists()) == ((call - 1) // 2, False)
    if done < N_LAYERS:  # resuming from a partial run is checked after Ctrl-C; here its state
        fresh = LlamaForCausalLM(checkpoint.llama_config_from(ref[1]["model_config"]), None)
        cfg = checkpoint.calib_config_from(ref[1]["calib_config"])
        checkpoint.ResumeStore(out).restore(fresh, cfg, checkpoint.ResumeStore(out).progress())
        from batquant_jax.qlayers import packed_weights
        assert sorted(packed_weights(fresh.layers[0])) == sorted(LINEARS)
        return
    res = run(env, "batquant_jax.calibrate", flags(env, out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"calibrate: resuming: layers 1-{done} of {N_LAYERS} restored" in res.stderr
    assert arrays_equal(out, ref[0]) == []


def test_overwrite_clears_a_corrupt_progress_file(env, ref, interrupted, tmp_path):
    out = copy_of(interrupted["out"], tmp_path / "run")
    (out / "resume" / "progress.json").write_text('{"layers_done": 2, "flags"')
    res = run(env, "batquant_jax.calibrate", flags(env, out, env["run_text"]))
    assert res.returncode == 2
    assert re.fullmatch(rf"error: cannot read {out}/resume/progress.json \(JSONDecodeError: .+\); "
                        r"pass --overwrite to start over", last_error(res.stderr)) is not None
    res = run(env, "batquant_jax.calibrate", flags(env, out, env["run_text"]) + ["--overwrite"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert arrays_equal(out, ref[0]) == []


def test_overwrite_clears_a_corrupt_metadata_file(env, ref, tmp_path):
    out = copy_of(ref[0], tmp_path / "run")
    (out / "metadata.json").write_text("[]")
    res = run(env, "batquant_jax.calibrate", flags(env, out))
    assert res.returncode == 2
    assert last_error(res.stderr) == (f"error: cannot read {out}/metadata.json (a JSON list, not "
                                      "an object); pass --overwrite to start over")
    kind = calibrate.inspect_output_dir(calibrate.CalibrateConfig(
        output_dir=str(out), overwrite=True))  # a fresh run follows, as in the progress case
    assert kind == ("new", None)


# ----------------------------------------------------------------------------- bad inputs

@pytest.mark.parametrize("flag,message", [
    ("--clip_init=nan", "--clip_init must be a finite logit in [-16, 16], got nan"),
    ("--lr=inf", "--lr must be a finite number in (0, 1], got inf"),
    ("--clip_lr=inf", "--clip_lr must be a finite number in (0, 1], got inf"),
    ("--weight_decay=inf", "--weight_decay must be a finite number >= 0, got inf"),
    ("--max_cond=nan", "--max_cond must be a finite number >= 1 (a condition number), got nan"),
    ("--batch_size=0", "--batch_size must be >= 1, got 0"),  # rtn: the batch is otherwise cut
])
def test_float_flags_are_checked_before_anything_loads(env, tmp_path, flag, message):
    res = run(env, "batquant_jax.calibrate", flags(env, tmp_path / "run") + [flag])
    assert (res.returncode, res.stderr) == (2, f"error: {message}\n")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, message", [
    (["--tasks=piqa", "--limit=-1"], "flag --limit=-1: -1 is not a non-negative integer"),
    (["--limit=5"], "--limit only apply with --tasks (zero-shot accuracy); perplexity takes "
                    "--max_tokens"),
    (["--baseline_json={base}", "--token_budget=64"], "--baseline_json, --token_budget only "
     "apply with --tasks (zero-shot accuracy); perplexity takes --max_tokens"),
    (["--tasks={task}", "--baseline_json={base}"], "--baseline_json {base} shares no task with "
     "--tasks (mine); nothing to compare"),
])
def test_evaluate_flag_combinations_fail_before_any_work(env, tmp_path, args, message):
    base = tmp_path / "fp.json"
    base.write_text(json.dumps({"tasks": {"piqa": {"per_item": {"acc": [1, 0]}}}}))
    task = tmp_path / "mine.jsonl"
    task.write_text(json.dumps({"query": "a", "choices": ["b", "c"], "gold": 0}) + "\n")
    args = [a.format(base=base, task=task) for a in args]
    res = run(env, "batquant_jax.evaluate", ["--model=/no/such/model"] + args)
    assert res.returncode == 2
    assert last_error(res.stderr) == "error: " + message.format(base=base)


def test_unwritable_output_dir_fails_before_the_model_loads(env, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    res = run(env, "batquant_jax.calibrate", flags(env, blocker / "run"))
    assert (res.returncode, res.stderr) == (
        2, f"error: cannot create --output_dir {blocker}/run: {blocker} is not a folder\n")


def test_missing_relative_model_path_is_not_called_a_hub_id(env, tmp_path):
    args = flags(env, tmp_path / "run")
    res = run(env, "batquant_jax.calibrate", ["--model=models/tiny"] + args[1:], cwd=tmp_path)
    assert res.returncode == 2 and not (tmp_path / "run").exists()
    assert last_error(res.stderr) == (
        f"error: 'models/tiny' is not a local path ({tmp_path}/models/tiny does not exist) nor a "
        "hub id in the local Hugging Face cache (no network is used): pass a local model folder "
        "(config.json + *.safetensors) or a .gguf file")


def test_missing_checkpoint_folder(env, tmp_path):
    res = run(env, "batquant_jax.evaluate", [f"--checkpoint={tmp_path}/none",
                                             f"--eval_data={env['text']}"])
    assert res.returncode == 2
    assert last_error(res.stderr) == f"error: checkpoint folder {tmp_path}/none does not exist"


@pytest.mark.parametrize("target,message", [
    ("{tmp}", "--output_json {tmp} is a folder; name a file"),
    ("{tmp}/file/ppl.json", "--output_json {tmp}/file/ppl.json cannot be created: {tmp}/file is "
                            "not a folder"),
])
def test_output_json_is_checked_before_the_work(env, tmp_path, target, message):
    (tmp_path / "file").write_text("")
    res = run(env, "batquant_jax.evaluate", ["--checkpoint=/unused",
                                             f"--output_json={target.format(tmp=tmp_path)}"])
    assert (res.returncode, res.stderr) == (2, f"error: {message.format(tmp=tmp_path)}\n")


def test_failed_result_write_keeps_the_result_in_the_error(env, ref, tmp_path, monkeypatch):
    from batquant_jax import evaluate
    cfg = evaluate.EvalConfig(checkpoint=str(ref[0]), eval_data=str(env["text"]), seqlen=32,
                              max_tokens=512, output_json=str(tmp_path / "ppl.json"))

    def full(fd):  # the disk fills while the result is flushed
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(evaluate.ResultError) as e:
        evaluate.run_evaluation(cfg)
    head = f"cannot write {tmp_path}/ppl.json (No space left on device); the result was "
    assert str(e.value).startswith(head) and "\n" not in str(e.value)
    result = json.loads(str(e.value)[len(head):])
    assert (result["tokens"], result["windows"], result["model"]) == (512, 16, str(ref[0]))
    assert os.listdir(tmp_path) == []  # no 0-byte or partial ppl.json, no temporary file


def test_lock_of_another_host_is_never_taken_over(tmp_path):
    from batquant_jax import lockfile
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": 0}))
    with pytest.raises(lockfile.LockError) as e:
        lockfile.FolderLock(tmp_path, "--output_dir").acquire()
    assert re.fullmatch(rf"--output_dir {tmp_path} is in use by pid 1 on host elsewhere \(since "
                        rf"[-0-9: ]+\); wait for that run to end \(if it is gone, remove "
                        rf"{tmp_path}/.lock\)", str(e.value)) is not None
    assert sorted(os.listdir(tmp_path)) == [".lock"]
    (tmp_path / ".lock").write_text("garbage")
    with pytest.raises(lockfile.LockError, match="is not a lock of this program"):
        lockfile.FolderLock(tmp_path).acquire()
    (tmp_path / ".lock").unlink()
    with lockfile.FolderLock(tmp_path / "a" / "b") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    assert sorted(os.listdir(tmp_path)) == []  # the folders it created are removed again


def test_library_inputs_are_reported_as_given():
    import jax.numpy as jnp
    from flax import nnx

    from batquant_jax import generate as g
    from batquant_jax import mx
    from batquant_jax.models import LlamaConfig
    e, s = mx.quantize(jnp.zeros((0, 32))).to_jax()  # was ZeroDivisionError
    assert (e.shape, s.shape) == ((0, 32), (0, 1))
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, num_layers=1), nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"^tokens must be an integer array \[B, T\], got "
                                         r"float64\(1, 4\)$"):
        model(np.zeros((1, 4), np.float64))  # was reported as float32, JAX's narrowed type
    with pytest.raises(ValueError, match=r"^token id 64 is outside the vocabulary \[0, 64\)$"):
        model(np.array([[1, 64]], np.int64))  # was silently clipped to the last row
    with pytest.raises(g.GenerateError, match=r"^prompt 1 holds token id -3, outside the "
                                              r"vocabulary \[0, 64\)$"):
        g.generate_ids(model, [[1, 2], [-3]], max_new_tokens=2)


def test_unreadable_inputs_are_one_line(env, ref, tmp_path, monkeypatch):
    """Permission errors (simulated: the suite may run as root, which reads anything)."""
    from batquant_jax import data
    text = tmp_path / "calib.txt"
    text.write_text("some words")
    real_read = pathlib.Path.read_bytes

    def denied(self):
        if self.name in ("calib.txt", "tokenizer.json"):
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", denied)
    with pytest.raises(data.DataError, match=rf"^cannot read text file {text} \(Permission "
                                             r"denied\)$"):
        data.load_corpus(str(text))
    with pytest.raises(checkpoint.CheckpointError,
                       match=rf"^cannot read {ref[0]}/tokenizer \(Permission denied: "):
        checkpoint.load_quantized(ref[0])
    monkeypatch.setattr(pathlib.Path, "iterdir", lambda self: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied")))
    with pytest.raises(data.DataError, match=rf"^cannot read folder {tmp_path} \(Permission "
                                             r"denied\)$"):
        data.load_corpus(str(tmp_path))


def test_broken_chat_template_is_one_line():
    from batquant_jax import generate as g

    class Tok:
        chat_template = "{% for m in messages %}{{ m.content }"

        def apply_chat_template(self, *a, **k):
            import jinja2
            return jinja2.Template(self.chat_template).render(messages=a[0])

    with pytest.raises(g.GenerateError, match=r"^--chat: the tokenizer's chat template does not "
                                              r"render \(TemplateSyntaxError: "):
        g.encode_prompt(Tok(), "hello", chat=True)


def test_ctrl_c_in_evaluate_is_one_line(env, ref, tmp_path):
    import signal
    out = tmp_path / "ppl.json"
    long_text = tmp_path / "long.txt"  # thousands of windows: still running when the signal comes
    long_text.write_text((pathlib.Path(env["text"]).read_text() + "\n") * 40)
    # Python's Ctrl-C handler in the child even when this suite runs as a shell's background
    # job (which starts with SIGINT ignored, and children inherit that)
    main = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "runpy.run_module('batquant_jax.evaluate', run_name='__main__', alter_sys=True)")
    proc = subprocess.Popen([sys.executable, "-c", main,
                             f"--checkpoint={ref[0]}", f"--eval_data={long_text}",
                             "--seqlen=32", "--max_tokens=0", f"--output_json={out}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env["env"])
    seen = []
    for line in proc.stderr:  # Ctrl-C once the windows are being evaluated
        seen.append(line)
        if line.startswith("evaluate: ") and " windows of " in line:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 130
    assert last_error("".join(seen) + rest) == "error: interrupted; no result was written"
    assert not out.exists()


def test_too_many_samples_are_refused_before_allocating(env, tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "available_memory", lambda: 8 << 30)
    cfg = calibrate.CalibrateConfig(model=str(env["model"]), calib_data=str(env["text"]),
                                    output_dir=str(tmp_path / "run"), nsamples=100_000_000,
                                    seqlen=32, method="rtn")
    with pytest.raises(calibrate.ConfigError) as e:
        calibrate.run_calibration(cfg, log=lambda s: None, out=lambda s: None)
    assert str(e.value) == ("--nsamples 100000000 x --seqlen 32 needs about 2288.8 GiB of "
                            "calibration activations (hidden size 64); 8.0 GiB are available: "
                            "lower --nsamples or --seqlen")


def test_context_limits_are_checked_before_the_model_loads(env, ref):
    ev = run(env, "batquant_jax.evaluate", [f"--checkpoint={ref[0]}", f"--eval_data={env['text']}",
                                            "--seqlen=256"])
    assert ev.returncode == 2 and "evaluate: loading" not in ev.stderr
    assert last_error(ev.stderr) == "error: --seqlen 256 exceeds the model's context of 128 positions"
    gen = run(env, "batquant_jax.generate", [f"--model={env['model']}", "--prompt=the cat",
                                             "--max_new_tokens=128"])
    assert gen.returncode == 2 and "generate: loading" not in gen.stderr
    assert last_error(gen.stderr) == ("error: --max_new_tokens 128 leaves no room for a prompt in "
                                      "the model's context of 128 positions")
