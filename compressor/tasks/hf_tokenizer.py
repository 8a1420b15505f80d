"""The tokenizer a Hugging Face checkpoint ships with, loaded offline from the folder its config names."""
from functools import lru_cache


@lru_cache(maxsize=4)
def load_tokenizer(folder: str):
    from compressor.hf_offline import offline_transformers

    return offline_transformers().AutoTokenizer.from_pretrained(folder)
