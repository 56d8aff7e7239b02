"""The run the commands share: load a model, quantize it on calibration windows, measure it.

``quantize_and_evaluate`` is what one study row, one method of ``experiments.compare`` and the
evaluation step of ``batquant_jax.calibrate`` do; ``perplexities`` is the one perplexity
protocol over several texts (``perplexity.evaluate_perplexity``, one window per device of a
mesh's data axis). The calibrate command adds the output folder, its lock and per-layer resume
around the same calls (``calibrate.run_calibration``).

>>> import numpy as np
>>> from batquant_jax.models import LlamaConfig, LlamaForCausalLM
>>> from flax import nnx
>>> model = LlamaForCausalLM(LlamaConfig(num_layers=1), nnx.Rngs(0))
>>> ids = (np.arange(600) * 7 % 256).astype(np.int32)
>>> out = quantize_and_evaluate(model, ids[:128].reshape(4, 32), "rtn", "W4A4KV16",
...                             {"text": ids}, eval_seqlen=64, log=lambda m: None)
>>> sorted(out), out["eval"]["text"]["windows"]
(['calib_seconds', 'eval', 'layers', 'trainable_params'], 9)
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Mapping

import numpy as np

from batquant_jax import perplexity
from batquant_jax.calibration import quantize_model
from batquant_jax.models import LlamaForCausalLM, forward_nll, load_model
from batquant_jax.qlayers import num_trainable


def perplexities(model: LlamaForCausalLM, evals: Mapping[str, np.ndarray], *, seqlen: int = 512,
                 max_tokens: int | None = None, mesh=None, progress=None
                 ) -> dict[str, perplexity.PerplexityResult]:
    """{name: PerplexityResult} of ``model`` on each text of ``evals`` ({name: int32 ids}):
    consecutive windows of ``seqlen`` tokens, the first ``max_tokens // seqlen`` (all if None);
    on a mesh, one window per device of its data axis."""
    batch = 1
    if mesh is not None:
        from batquant_jax.distributed import DataParallel
        DataParallel(mesh).put_module(model)
        batch = int(mesh.shape["data"])
    return {name: perplexity.evaluate_perplexity(
                functools.partial(forward_nll, model), ids, seqlen=seqlen, max_tokens=max_tokens,
                batch_size=batch, progress=progress, mesh=mesh)
            for name, ids in evals.items()}


def quantize_and_evaluate(model: LlamaForCausalLM | str, windows, method: str, setting: str,
                          evals: Mapping[str, np.ndarray], *, eval_seqlen: int = 512,
                          eval_max_tokens: int | None = None,
                          measure: Callable[[LlamaForCausalLM], Any] | None = None,
                          log: Callable[[str], None] | None = None, **hparams) -> dict:
    """Quantizes ``model`` (a model, or a name for ``load_model``) with ``method`` at
    ``setting`` on ``windows`` (int32 [N, T]; method "fp" skips calibration), then measures the
    perplexity of every text of ``evals``. hparams: any CalibConfig field (epochs, seed, ...)
    and quantize_model's tx / clip_tx / loss_fn.

    Returns {"calib_seconds", "layers": [LayerReport dicts], "trainable_params",
    "eval": {name: {"perplexity", "nll_mean", "tokens", "windows", "seconds", "window_nll"}}},
    plus "measured": measure(model) when ``measure`` is given (e.g. zero-shot accuracy).
    """
    if isinstance(model, str):
        model = load_model(model, with_tokenizer=False).model
    t0 = time.time()
    layers, params = [], 0
    if method != "fp":
        kw = {} if log is None else {"log": log}
        model, res = quantize_model(model, windows, method, setting, **kw, **hparams)
        layers = [dataclasses.asdict(r) for r in res.layers]
        params = sum(num_trainable(layer) for layer in model.layers)
    out = {"calib_seconds": time.time() - t0, "layers": layers, "trainable_params": int(params),
           "eval": {}}
    for name, ppl in perplexities(model, evals, seqlen=eval_seqlen,
                                  max_tokens=eval_max_tokens).items():
        out["eval"][name] = {"perplexity": ppl.perplexity, "nll_mean": ppl.nll_mean,
                             "tokens": ppl.tokens, "windows": ppl.windows, "seconds": ppl.seconds,
                             "window_nll": list(ppl.window_nll)}
    if measure is not None:
        out["measured"] = measure(model)
    return out
