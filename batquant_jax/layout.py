"""What calibration needs to know about a model: a ``Layout``.

Calibration walks a model block by block (each block trained and quantized on the outputs of
the ones before). A Layout says where the blocks are, which linears of a block read the same
input (a ``qlayers.Group``: they share one input transform and one activation clip), how to
turn calibration data into the first block's inputs, and optionally which gain weights a
block's output in the objective. A block is run as ``block(x)``. ``LLAMA`` describes this
package's Llama / Qwen model; any other Flax NNX model whose blocks hold ``nnx.Linear`` s can
be described in a few lines and goes through the same ``calibration.quantize_model``, and saved
and loaded with ``save_module`` / ``load_module``:

>>> import tempfile
>>> import jax, jax.numpy as jnp, numpy as np
>>> from flax import nnx
>>> from batquant_jax.calibration import quantize_model
>>> class Block(nnx.Module):
...     def __init__(self, d, rngs):
...         self.up = nnx.Linear(d, 2 * d, rngs=rngs)
...         self.down = nnx.Linear(2 * d, d, rngs=rngs)
...     def __call__(self, x):
...         return x + self.down(jax.nn.gelu(self.up(x)))
>>> class Net(nnx.Module):
...     def __init__(self, d, depth, rngs):
...         self.blocks = nnx.List([Block(d, rngs) for _ in range(depth)])
...     def __call__(self, x):
...         for block in self.blocks:
...             x = block(x)
...         return x
>>> layout = Layout(groups=(Group("", ("up",), "up"), Group("", ("down",), "down")),
...                 blocks="blocks")
>>> net = Net(64, 2, nnx.Rngs(0))
>>> x = jax.random.normal(jax.random.key(1), (8, 16, 64))   # calibration inputs [N, T, d]
>>> net, result = quantize_model(net, x, "batquant", layout=layout, epochs=1,
...                              log=lambda msg: None)
>>> [r.index for r in result.layers], type(net.blocks[0].up).__name__
([0, 1], 'QuantLinear')
>>> folder = tempfile.mkdtemp()
>>> save_module(folder, net)
>>> again = load_module(folder, quantized_skeleton(Net(64, 2, nnx.Rngs(7)), result.config, layout))
>>> bool(jnp.array_equal(again(x), net(x)))
True

``quantized_skeleton`` builds the structure the checkpoint restores into (any weights: they are
all replaced); ``load_module`` verifies every array against the checksums written beside it.
Linears must be ``flax.nnx.Linear`` or this package's ``Linear``; an ``nnx.LinearGeneral`` or
``nnx.Einsum`` is refused with a one-line TypeError, a linear whose input size the MX block
(32) does not divide with a one-line ValueError (pad it).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable

import jax
import jax.numpy as jnp

from batquant_jax.qlayers import (GROUPS, Group, build_quantized_layer, container_of,
                                  quant_modules)

__all__ = ["Layout", "Group", "LLAMA", "quantized_skeleton", "save_module", "load_module"]


@dataclasses.dataclass(frozen=True)
class Layout:
    """How calibration walks a model.

    groups: the ``Group`` s of one block (the same in every block).
    blocks: dotted attribute path from the model to the sequence of blocks (an ``nnx.List``
      or list; calibration replaces its items with the quantized blocks).
    embed: (model, calibration data) -> the first block's inputs [N, T, d]; None: the data
      are those inputs already.
    next_gain: (model, block index) -> [d_out] channel weights of the block's output in the
      objective (``loss_weight="next_norm"``); None: that weighting is unavailable.
    """

    groups: tuple[Group, ...]
    blocks: str = "layers"
    embed: Callable[[Any, Any], jax.Array] | None = None
    next_gain: Callable[[Any, int], jax.Array] | None = None

    def __post_init__(self):
        object.__setattr__(self, "groups", tuple(Group(*g) for g in self.groups))
        if not self.groups:
            raise ValueError("a Layout needs at least one Group")

    def block_list(self, model):
        """The model's sequence of blocks."""
        return container_of(model, self.blocks)


def _llama_embed(model, tokens):
    return model.embed(tokens)


def _llama_next_gain(model, index: int) -> jax.Array:
    """The gain [d] of the RMSNorm that reads decoder layer ``index``'s output."""
    norm = model.layers[index + 1].input_layernorm if index + 1 < len(model.layers) else model.norm
    return jnp.asarray(norm.weight[...], jnp.float32)


# This package's Llama / Qwen model (models.llama): token ids in, decoder layers in `layers`.
LLAMA = Layout(groups=GROUPS, blocks="layers", embed=_llama_embed, next_gain=_llama_next_gain)


def quantized_skeleton(model, cfg, layout: Layout):
    """``model`` (a freshly built float model of the calibrated structure) with every block
    swapped for the quantized block ``cfg`` (``CalibrationResult.config``) builds, each linear
    at placeholder packed weights: the target ``load_module`` restores into."""
    blocks = layout.block_list(model)
    for i in range(len(blocks)):
        blocks[i] = build_quantized_layer(blocks[i], cfg, i, groups=layout.groups)
    for q in quant_modules(model):
        q.deploy_placeholder()
    return model


_SUMS, _ENCODINGS = "checksums.json", "encodings.json"


def save_module(folder, module) -> None:
    """Writes every array of ``module``'s state (packed weights as codes and scales) into
    ``folder`` (an Orbax checkpoint) with their sha256 in ``checksums.json``."""
    from batquant_jax import checkpoint
    folder = pathlib.Path(folder)
    items = checkpoint.state_arrays(module, device=True)
    checkpoint.save_tree(folder / "arrays", items)
    checkpoint.write_json(folder / _SUMS, checkpoint.tree_digests(items))
    # weights held in their source encoding (StoredWeight) are stored as those bytes
    checkpoint.write_json(folder / _ENCODINGS, checkpoint.stored_encodings(module))


def load_module(folder, skeleton):
    """Restores ``save_module``'s arrays into ``skeleton`` (same structure; e.g.
    ``quantized_skeleton``) and returns it; CheckpointError (one line) for a missing, damaged or
    mismatched array."""
    from batquant_jax import checkpoint
    folder = pathlib.Path(folder)
    digests = checkpoint.read_json(folder / _SUMS)
    if (folder / _ENCODINGS).is_file():
        checkpoint.apply_encodings(skeleton, checkpoint.read_json(folder / _ENCODINGS),
                                   str(folder / _ENCODINGS))
    trees = checkpoint.load_tree(folder / "arrays", checkpoint.abstract_state(skeleton), digests)
    checkpoint.set_state_arrays(skeleton, trees, str(folder))
    return skeleton

