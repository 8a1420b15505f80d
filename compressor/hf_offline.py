"""transformers, imported offline: nothing is ever fetched from a hub at run time."""
import os

from compressor.errors import UserError


def offline_transformers():
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers
    except ImportError:
        raise UserError("Hugging Face checkpoints need transformers: pip install 'compressor[hf]'") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers
