"""Text <-> tokens for `compress generate`: the tokenizer files an artifact folder carries (Hugging Face models),
or bytes (the GPT samples read UTF-8 bytes as tokens 0..255)."""
import codecs
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from compressor.errors import UserError


@dataclass
class TextCodec:
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]  # all new tokens so far -> their text
    stop_ids: tuple[int, ...]


def _stop_ids(folder: Path) -> tuple[int, ...]:
    try:
        eos = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))["model"]["eos_token_id"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):  # RecursionError: nested too deep
        return ()
    return tuple(eos) if isinstance(eos, list) else (eos,)


def load_text_codec(folder: Path, family: str | None) -> TextCodec:
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UserError("reading tokenizer.json needs the `tokenizers` package: pip install "
                            "'compressor[hf]'") from None
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        return TextCodec(encode=lambda text: tokenizer.encode(text, add_special_tokens=False).ids,
                         decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
                         stop_ids=_stop_ids(folder))
    if family == "gpt":
        return TextCodec(encode=lambda text: list(text.encode("utf-8")),
                         decode=lambda ids: codecs.decode(bytes(ids), "utf-8", errors="ignore"), stop_ids=())
    raise UserError(f"{folder}: no tokenizer.json beside the artifact and not a byte-level GPT sample: cannot turn "
                    f"the prompt into tokens")
