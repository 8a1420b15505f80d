"""What every run writes beside its graph, whichever way the graph was made (compressor.pipeline, or
compressor.streaming for a decoder read one layer at a time): the artifact's metadata and side files, and the
refusal of a model whose outputs are not finite."""
import json
from pathlib import Path

import numpy as np
import onnx

from compressor.errors import UserError
from compressor.recipes import PRESETS, Recipe
from compressor.run_options import RunOptions
from compressor.version import __version__
from exporters import metadata_keys
from exporters.genai_config import TOKENIZER_FILES, generation_files, tokenizer_files, tokenizer_sha256


def side_files(config: dict, proto: onnx.ModelProto, artifact_name: str) -> dict[str, bytes]:
    """The tokenizer's files and ONNX Runtime GenAI's genai_config.json, which go beside a decoder's artifact."""
    if not config.get("tokenizer"):
        return {}
    context = config.get("max_positions", config.get("context"))
    tokenizer = Path(config["tokenizer"])
    return {**tokenizer_files(tokenizer), **generation_files(proto, artifact_name, context, tokenizer,
                                                             config.get("model_type", "llama"))}


def artifact_metadata(source_metadata: dict, recipe: Recipe, options: RunOptions, family: str, config: dict,
                      files: dict[str, bytes]) -> dict[str, str]:
    return {**source_metadata,
            metadata_keys.VERSION: __version__,
            metadata_keys.RECIPE: json.dumps({**recipe.to_dict(), "name": recipe_label(recipe, options)},
                                             sort_keys=True),
            metadata_keys.SEED: str(options.seed),
            metadata_keys.FAMILY: family,
            metadata_keys.MODEL_CONFIG: json.dumps(recorded_config(config, files), sort_keys=True)}


def recorded_config(config: dict, side_files: dict[str, bytes]) -> dict:
    """The model config as the artifact's metadata records it: the tokenizer by its folder's name and its files'
    sha256 (the files lie beside the artifact, where its readers look first), not by where the input folder lay,
    so that the same input gives the same artifact bytes wherever it is."""
    if not config.get("tokenizer"):
        return config
    files = {name: content for name, content in side_files.items() if name in TOKENIZER_FILES}
    return {**config, "tokenizer": Path(config["tokenizer"]).name, "tokenizer_sha256": tokenizer_sha256(files)}


def recipe_label(recipe: Recipe, options: RunOptions) -> str:
    """The recipe's name as the artifact records it: a recipe file by its file name, not the path it was read at."""
    given = options.recipe if isinstance(options.recipe, str) else None
    if given and recipe.name.startswith(given) and given not in PRESETS:
        return Path(given).name + recipe.name[len(given):]
    return recipe.name


def finite_outputs(logits_fn, message: str):
    """`logits_fn`, refusing (UserError `message`) outputs that hold NaN or Inf (finite weights can overflow in the
    forward pass): such a model has no metric to keep and no logits to hold the artifact to."""
    def checked(inputs):
        logits = logits_fn(inputs)
        if not np.isfinite(logits).all():
            raise UserError(message)
        return logits
    return checked
