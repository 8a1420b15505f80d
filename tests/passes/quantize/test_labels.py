"""The label grammar: what the schemes write, the allocator reads back, to the same config."""
import pytest

from passes.bit_allocator import DEFAULT_CANDIDATES
from passes.quantize import QuantizeConfig
from passes.quantize.labels import weight_fields

LABELS = DEFAULT_CANDIDATES + ("int4-B32-asym-fzp", "int3-channel-asym", "int4-B64-gptq", "int3-B64-full-gptq",
                               "kmeans4-B64-aw-row", "quantile3-tensor-row", "log4-B128", "float5-B64",
                               "int4-B32-full-mse", "int4-B32-asym-amse")


@pytest.mark.parametrize("label", LABELS)
def test_a_label_reads_back_into_the_config_that_writes_it(label):
    assert QuantizeConfig(**weight_fields(label)).label() == label


@pytest.mark.parametrize("label", ["int9-B64", "int4", "int4-B64-wide", "uint4-B64", 4, ""])
def test_anything_else_is_one_line(label):
    with pytest.raises(ValueError, match="is not a candidate such as int4-B64-full"):
        weight_fields(label)
