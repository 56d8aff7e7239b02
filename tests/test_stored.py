"""StoredWeight: GGML block formats and half floats decode exactly as the gguf package does."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from batquant_jax import fused
from batquant_jax.models import stored
from batquant_jax.models.stored import BLOCK_TYPES, StoredWeight
from conftest import F16_FIELDS, random_blocks

KERNEL = fused.available()

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


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


@pytest.mark.skipif(not KERNEL, reason=f"C++ CPU kernels unavailable: {fused.unavailable_reason()}")
@pytest.mark.parametrize("kind", sorted(BLOCK_TYPES))
def test_the_cpu_decoder_gives_the_xla_decoders_bits(kind):
    """Every byte pattern, float16 fields included (subnormal, infinite, NaN): the C++ decoder
    and the XLA one agree bit for bit, NaN payloads too; batched (vmap) and in a scan as well."""
    per, size = BLOCK_TYPES[kind]
    rng = np.random.default_rng(7)
    raw = rng.integers(0, 256, size=(40, 2 * size), dtype=np.uint8)  # 40 rows of 2 blocks
    off = F16_FIELDS[kind][0]
    for row, half in ((0, 0x7E01), (1, 0xFC00), (2, 0x0001), (3, 0x8000)):  # NaN, -inf, sub, -0
        raw[row, off:off + 2] = np.array([half], "<u2").view(np.uint8)
    scaled = random_blocks(kind, 40, 2 * per, seed=3)
    for blocks in (raw, scaled):
        w = StoredWeight.from_ggml(blocks, kind, (40, 2 * per))
        fns = {"dense": lambda w: w.dense(),
               "vmap": lambda w: jax.vmap(lambda d: stored.decode_rows(d, kind, 2 * per))(
                   w.data.reshape(4, 10, -1)).reshape(40, -1),
               "scan": lambda w: jax.lax.scan(
                   lambda c, d: (c, stored.decode_rows(d, kind, 2 * per)), 0,
                   w.data.reshape(4, 10, -1))[1].reshape(40, -1)}
        for name, fn in fns.items():
            got = jax.jit(fn)(w)
            with stored.xla_decoders():
                want = jax.jit(fn)(w)
            assert np.array_equal(_bits(got), _bits(want)), (kind, name)
        assert np.isnan(np.asarray(got)).any() == (blocks is raw)
        ref = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[kind]).astype(np.float32)
        assert np.array_equal(np.asarray(got), ref, equal_nan=True)



@pytest.mark.skipif(not KERNEL, reason=f"C++ CPU kernels unavailable: {fused.unavailable_reason()}")
@pytest.mark.parametrize("kind", sorted(BLOCK_TYPES))
def test_the_block_product_equals_decode_then_dot_to_rounding(kind):
    """fused.stored_dot (each weight row decoded into a buffer, never the float matrix) equals
    x @ dense(W)^T within the float32 bound of a reordered sum, K * 2^-23 * (|x| @ |W|^T)."""
    per = BLOCK_TYPES[kind][0]
    k = 3 * per
    w = StoredWeight.from_ggml(random_blocks(kind, 37, k, seed=5), kind, (37, k))
    x = jax.random.normal(jax.random.key(0), (2, 5, k))
    got = np.asarray(jax.jit(fused.stored_dot)(x, w), np.float64)
    xd, wd = np.asarray(x, np.float64), np.asarray(w.dense(), np.float64)
    bound = k * 2.0 ** -23 * (np.abs(xd) @ np.abs(wd).T) + 1e-30
    assert got.shape == (2, 5, 37)
    assert float((np.abs(got - xd @ wd.T) / bound).max()) <= 1.0


def test_which_products_multiply_the_blocks_directly():
    from batquant_jax.models.llama import Linear
    w = StoredWeight.from_ggml(random_blocks("Q4_K", 8, 256), "Q4_K", (8, 256))
    assert fused.choose_stored(w, 1) == KERNEL and fused.choose_stored(w, 64) == KERNEL
    assert not fused.choose_stored(w, 65)  # "auto": decoding only
    assert not fused.choose_stored(w.dense(), 1)
    with fused.matmul_mode("on"):
        assert fused.choose_stored(w, 4096) == KERNEL
    with fused.matmul_mode("off"):
        assert not fused.choose_stored(w, 1)
    lin = Linear(256, 8)
    lin.weight.set_value(w)
    x = jax.random.normal(jax.random.key(1), (1, 256))
    np.testing.assert_array_equal(np.asarray(lin(x)), np.asarray(fused.stored_dot(x, w)))
    with fused.matmul_mode("off"):
        np.testing.assert_array_equal(np.asarray(lin(x)),
                                      np.asarray(jnp.einsum("...i,oi->...o", x, w.dense())))
