import numpy as np
import pytest

from precision_policy import dtypes
from precision_policy.errors import DTypeError


@pytest.mark.parametrize(
    "alias,canon",
    [
        ("float", "float32"), ("fp32", "float32"), ("FP32", "float32"), ("float32", "float32"),
        ("half", "float16"), ("fp16", "float16"), ("torch.float16", "float16"), ("torch.half", "float16"),
        ("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("double", "float64"), ("DT_HALF", "float16"),
        ("int", "int32"), ("bool", "bool"),
    ],
)
def test_aliases(alias, canon):
    assert dtypes.canonical(alias) == canon


def test_numpy_objects_and_bfloat16_mapping():
    assert dtypes.canonical(np.float16) == "float16"
    assert dtypes.canonical(np.dtype("float32")) == "float32"
    bf = dtypes.to_numpy("bf16")
    assert bf.name == "bfloat16" and bf.itemsize == 2
    assert dtypes.from_numpy(bf) == "bfloat16"
    x = np.array([1.0 + 2**-9], dtype=np.float32).astype(bf)
    assert float(x[0]) == 1.0  # bfloat16 has 8 bits of mantissa


def test_unknown_dtype_lists_choices_and_closest():
    with pytest.raises(DTypeError) as err:
        dtypes.canonical("flaot16")
    text = str(err.value)
    assert "float16" in text and "Did you mean" in text and "bfloat16" in text


def test_ranks_and_kinds():
    assert dtypes.rank("float64") > dtypes.rank("float32") > dtypes.rank("float16") == dtypes.rank("bfloat16")
    assert dtypes.is_float("bfloat16") and not dtypes.is_float("int32")
    assert dtypes.is_low("float16") and not dtypes.is_low("float32")
    assert dtypes.bits("bfloat16") == 16
    assert dtypes.ascend_name("float32") == "float"
