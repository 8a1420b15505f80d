"""The quantize pass's labels, one grammar written and read here: <dtype><k>-<granularity>[-<flag>...], e.g.
int4-B64-full, nf3-channel, int4-B32-asym-fzp, kmeans4-B64-aw-row, int3-B64-gptq. The schemes write their part
(label_parts), the bit-budget allocator reads its candidates back into fields, the scaling sweep names its grid."""
import re

from passes import quant_primitives as qp
from passes.calibration import excerpt

LABEL_NAMES = {"int": "int", "nf": "nf", "float": "float", "log2": "log", "quantile": "quantile", "kmeans": "kmeans"}
# flag -> the fields it sets, in the order the schemes write them
FLAGS = {"asym": {"symmetric": False}, "fzp": {"zero_point": "float"}, "full": {"full_range": True},
         "aw": {"activation_weighted": True}, "row": {"codebook_scope": "row"}, "gptq": {"method": "gptq"},
         "mse": {"scale_search": "mse"}, "amse": {"scale_search": "activation"}}
# what a label leaves unsaid: the defaults of every field a label can name
UNSAID = {"symmetric": True, "full_range": False, "zero_point": "int", "method": "rtn", "exponent_bits": None,
          "codebook_scope": "tensor", "activation_weighted": False, "scale_search": "none"}


def granularity(block_size: int) -> str:
    return {qp.PER_CHANNEL: "channel", qp.PER_TENSOR: "tensor"}.get(block_size, f"B{block_size}")


def weight_label(dtype: str, bits: int, block_size: int, *flags: str) -> str:
    return "-".join([f"{LABEL_NAMES[dtype]}{bits}", granularity(block_size), *flags])


def weight_fields(label: str) -> dict:
    """A weight label (int4-B64-full, nf3-channel, int3-B32-asym, ...) -> the quantize fields it sets; every field a
    label can name is set, so nothing leaks in from elsewhere. ValueError (one line) for anything else."""
    parts = label.split("-") if isinstance(label, str) else []
    names = "|".join(LABEL_NAMES.values())
    head = re.fullmatch(rf"({names})([2-8])", parts[0]) if parts else None
    block = parts[1] if len(parts) > 1 else ""
    if head is None or not re.fullmatch(r"B\d+|channel|tensor", block) or not set(parts[2:]) <= set(FLAGS):
        raise ValueError(f"quantize.budget_candidates: {excerpt(label)} is not a candidate such as int4-B64-full, "
                         f"nf3-B128 or int3-channel-asym (flags: {', '.join(FLAGS)})")
    dtype = next(dtype for dtype, name in LABEL_NAMES.items() if name == head[1])
    block_size = {"channel": qp.PER_CHANNEL, "tensor": qp.PER_TENSOR}.get(block)
    fields = {"dtype": dtype, "bits": int(head[2]), **UNSAID,
              "block_size": int(block[1:]) if block_size is None else block_size}
    for flag in parts[2:]:
        fields.update(FLAGS[flag])
    return fields
