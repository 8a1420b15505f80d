"""exporters.cache_in_place: which decoder graphs can keep their KV cache in one buffer, and how a session is
told (our metadata, or another tool's genai_config.json)."""
import json

from onnx import TensorProto, helper

from compressor.kv_cache import keeps_cache_in_place
from exporters.cache_in_place import writes_cache_in_place


def _cache_graph(attention: str = "GroupQueryAttention", layers: int = 2, swap: bool = False):
    """input_ids -> per layer one attention node over past_key_values.N.key / .value -> present.N.*."""
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, None)  # noqa: E731
    inputs, outputs, nodes = [value("x")], [value("logits")], []
    hidden = "x"
    for layer in range(layers):
        past = [f"past_key_values.{layer}.key", f"past_key_values.{layer}.value"]
        present = [f"present.{layer}.key", f"present.{layer}.value"]
        if swap:
            present = present[::-1]
        inputs += [value(name) for name in past]
        outputs += [value(name) for name in sorted(present)]
        if attention == "GroupQueryAttention":
            nodes.append(helper.make_node("GroupQueryAttention", [hidden, "", "", *past, "seqlens", "total"],
                                          [f"h{layer}", *present], domain="com.microsoft", num_heads=2,
                                          kv_num_heads=1))
        else:  # the copying kind: present = Concat(past, new)
            nodes += [helper.make_node("Concat", [past[0], hidden], [present[0]], axis=2),
                      helper.make_node("Concat", [past[1], hidden], [present[1]], axis=2),
                      helper.make_node("Identity", [hidden], [f"h{layer}"])]
        hidden = f"h{layer}"
    nodes.append(helper.make_node("Identity", [hidden], ["logits"]))
    return helper.make_graph(nodes, "g", inputs, outputs)


def test_group_query_attention_graphs_keep_their_cache_in_place():
    assert writes_cache_in_place(_cache_graph())


def test_graphs_that_copy_or_mix_up_their_cache_do_not():
    assert not writes_cache_in_place(_cache_graph("Concat"))  # a Concat grows the past: it needs the copy
    assert not writes_cache_in_place(_cache_graph(swap=True))  # key written where the value is read
    graph = _cache_graph()
    graph.node.append(helper.make_node("Identity", ["past_key_values.0.key"], ["peek"]))  # a second reader
    assert not writes_cache_in_place(graph)
    no_cache = helper.make_graph([helper.make_node("Identity", ["x"], ["logits"])], "g",
                                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                                 [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)])
    assert not writes_cache_in_place(no_cache)


class _Session:  # what keeps_cache_in_place reads of an onnxruntime.InferenceSession
    def __init__(self, metadata: dict):
        self.metadata = metadata

    def get_modelmeta(self):
        return type("Meta", (), {"custom_metadata_map": self.metadata})()


def test_a_session_is_told_by_our_metadata_or_a_genai_config(tmp_path):
    assert keeps_cache_in_place(_Session({"compressor.kv_cache": "in_place"}))
    assert not keeps_cache_in_place(_Session({}), tmp_path)  # neither: copy the cache
    config = {"model": {}, "search": {"past_present_share_buffer": True}}  # Model Builder's folders
    (tmp_path / "genai_config.json").write_text(json.dumps(config))
    assert keeps_cache_in_place(_Session({}), tmp_path)
    config["search"]["past_present_share_buffer"] = False
    (tmp_path / "genai_config.json").write_text(json.dumps(config))
    assert not keeps_cache_in_place(_Session({}), tmp_path)
    (tmp_path / "genai_config.json").write_text("{not json")
    assert not keeps_cache_in_place(_Session({}), tmp_path)
