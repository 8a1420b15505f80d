"""Whether a decoder graph can keep its KV cache in one buffer per layer for a whole generation.

GroupQueryAttention, given the same tensor as its past and its present (I/O binding), writes each new key and
value into it at the sequence's position and attends over the mask's length: ONNX Runtime GenAI runs it so
(past_present_share_buffer), and no step copies the cache (SmolLM2 int4, 2 CPU threads: 70 -> 93-100 tokens/s
over 512 new tokens, the same tokens). Any other reader of a past (a Concat) grows it, so needs the copy.
"""
PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."
IN_PLACE = "in_place"  # the metadata_keys.KV_CACHE value an in-place graph carries (finalize)


def writes_cache_in_place(graph) -> bool:
    """Every past input is read only as a GroupQueryAttention's past_key / past_value (inputs 3, 4), and that
    node's present_key / present_value (outputs 1, 2) are the graph outputs of the same layer."""
    pasts = {arg.name for arg in graph.input if arg.name.startswith(PAST_PREFIX)}
    presents = {arg.name for arg in graph.output if arg.name.startswith(PRESENT_PREFIX)}
    paired = set()
    for node in graph.node:
        if not (pasts.intersection(node.input) or presents.intersection(node.output)):
            continue
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft" or len(node.input) < 5 \
                or len(node.output) < 3:
            return False
        pairs = [(node.input[3], node.output[1]), (node.input[4], node.output[2])]
        if any(past not in pasts or present not in presents
               or past[len(PAST_PREFIX):] != present[len(PRESENT_PREFIX):] for past, present in pairs):
            return False
        if pasts.intersection([*node.input[:3], *node.input[5:]]) \
                or presents.intersection([node.output[0], *node.output[3:]]):
            return False
        paired.update(past for past, _ in pairs)
    return bool(pasts) and paired == pasts and len(presents) == len(pasts)
