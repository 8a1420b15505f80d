"""The keys of the metadata_props an artifact carries: `compress run` writes them (exporters.onnx_export.finalize),
and `compress check`, `compress generate` / `bench`, an ONNX input and the KV-cache reader read them back.
Renaming one orphans every artifact already written."""
VERSION = "compressor.version"  # the tool's version that wrote the artifact
RECIPE = "compressor.recipe"  # the resolved recipe, JSON
SEED = "compressor.seed"  # the calibration sampling seed
FAMILY = "compressor.family"  # the model family, which names its task (compressor.tasks.TASKS)
MODEL_CONFIG = "compressor.model_config"  # the model config the task reads, JSON
TASK_STATE = "compressor.task_state"  # what the task learned from the input model (e.g. a probe), JSON
SOURCE = "compressor.source"  # the input model: its name, or an ONNX input's path
SOURCE_SHA256 = "compressor.source_sha256"  # the input's weights file, or ONNX file, sha256
KV_CACHE = "compressor.kv_cache"  # "in_place" where the graph keeps its KV cache in one buffer (cache_in_place)
