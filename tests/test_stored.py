"""StoredWeight: GGML block formats and half floats decode exactly as the gguf package does."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from batquant_jax.models.stored import BLOCK_TYPES, StoredWeight
from conftest import random_blocks

@pytest.mark.parametrize("kind", sorted(BLOCK_TYPES))
def test_block_types_decode_bit_for_bit_as_gguf(kind):
    rows, cols = 6, 512
    blocks = random_blocks(kind, rows, cols)
    ref = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[kind])
    w = StoredWeight.from_ggml(blocks, kind, (rows, cols))
    assert ref.shape == (rows, cols) and w.nbytes == blocks.size
    eager = np.asarray(w.dense())
    np.testing.assert_array_equal(eager, ref.astype(np.float32))
    # jitted with the weight as argument and as a closure constant (folded): the same bits
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda w: w.dense())(w)), eager)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda: w.dense())()), eager)
    idx = jnp.asarray([[3, 0], [5, 3]])
    np.testing.assert_array_equal(np.asarray(w.take_rows(idx)), eager[np.asarray(idx)])


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K", "Q8_0"])
def test_dense_by_rows_is_dense_bit_for_bit(kind):
    # 7 rows in steps of 3: two loop steps and a tail of one row; a step larger than the weight
    blocks = random_blocks(kind, 7, 256)
    w = StoredWeight.from_ggml(blocks, kind, (7, 256))
    want = np.asarray(w.dense())
    for step in (3, 7, 100):
        np.testing.assert_array_equal(np.asarray(w.dense_by_rows(step)), want)


@pytest.mark.parametrize("kind, dtype", [("F16", np.float16), ("BF16", jnp.bfloat16)])
def test_half_floats_widen_exactly(kind, dtype):
    x = (np.random.default_rng(1).standard_normal((4, 64)) * 3).astype(dtype)
    w = StoredWeight.from_ggml(x.view(np.uint8), kind, (4, 64))
    np.testing.assert_array_equal(np.asarray(w.dense()), x.astype(np.float32))
    assert w.nbytes == 4 * 64 * 2


def test_bad_encoding_and_ragged_rows():
    with pytest.raises(ValueError, match="unsupported weight encoding 'IQ2_XS'"):
        StoredWeight.from_ggml(np.zeros((1, 8), np.uint8), "IQ2_XS", (1, 256))
    with pytest.raises(ValueError, match="Q4_K rows of 96 elements are not whole blocks of 256"):
        StoredWeight.from_ggml(np.zeros((1, 144), np.uint8), "Q4_K", (1, 96))
