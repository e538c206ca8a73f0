"""`Tokenizer`: a ``tokenizer.json`` run by the `tokenizers` library, with its special tokens and chat template,
and the subset of transformers' tokenizer API that sinkstream and its users call. Loading one takes about
0.1 s; importing transformers alone takes about 1 s here, which every model load used to pay.

A folder holds one when it has ``sinkstream_tokenizer.json`` (written by `save_pretrained`, beside the
``tokenizer.json``, ``tokenizer_config.json`` and ``chat_template.jinja`` transformers reads too). Folders are
written from a transformers tokenizer by `from_transformers`, which keeps the backend pipeline transformers
set up (post-processor, added special tokens), so both encode and decode alike (tests/test_tokenizer_json.py).
"""
from __future__ import annotations

import json
from pathlib import Path

META = "sinkstream_tokenizer.json"
FORMAT = 1
SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token")


def clean_up_spaces(text: str) -> str:
    """transformers' ``clean_up_tokenization``: no space before punctuation and English contractions."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class Tokenizer:
    """Encode, decode and render chats. `backend` is a ``tokenizers.Tokenizer``; `special` maps
    bos_token/eos_token/unk_token/pad_token to their text (or None); decoding applies transformers'
    space clean-up when `clean_up_tokenization_spaces`."""

    def __init__(self, backend, *, special: dict, chat_template: str | None = None,
                 clean_up_tokenization_spaces: bool = False):
        self.backend = backend
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self.special_tokens_map = {k: special[k] for k in SPECIALS if special.get(k) is not None}
        for k in SPECIALS:
            setattr(self, k, self.special_tokens_map.get(k))
            setattr(self, f"{k}_id", None if self.special_tokens_map.get(k) is None
                    else backend.token_to_id(self.special_tokens_map[k]))

    def __repr__(self) -> str:
        return f"Tokenizer({len(self)} tokens, {self.special_tokens_map})"

    @classmethod
    def from_folder(cls, folder: str | Path) -> "Tokenizer":
        from tokenizers import Tokenizer as Backend
        folder = Path(folder)
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{folder / META}: format {meta.get('format')!r}, expected {FORMAT}")
        template = folder / "chat_template.jinja"
        return cls(Backend.from_file(str(folder / "tokenizer.json")), special=meta["special"],
                   chat_template=template.read_text(encoding="utf-8") if template.exists() else None,
                   clean_up_tokenization_spaces=meta["clean_up_tokenization_spaces"])

    @classmethod
    def from_transformers(cls, hf) -> "Tokenizer":
        """The same tokenizer as transformers tokenizer `hf` (a fast one): its backend as set up, its special
        tokens, its chat template, and whether its `decode` really cleans up spaces (transformers skips that
        for BPE models whatever the flag says)."""
        from tokenizers import Tokenizer as Backend
        backend = hf.backend_tokenizer
        template = hf.chat_template
        if isinstance(template, dict):
            template = template.get("default")
        clean = bool(hf.clean_up_tokenization_spaces) and not (
            type(backend.model).__name__ == "BPE"
            and not getattr(hf, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False))
        special = {k: None if getattr(hf, k, None) is None else str(getattr(hf, k)) for k in SPECIALS}
        return cls(Backend.from_str(backend.to_str()), special=special, chat_template=template,
                   clean_up_tokenization_spaces=clean)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write the folder `from_folder` reads, which transformers' AutoTokenizer reads too."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(folder / "tokenizer.json"))
        config = {"tokenizer_class": "TokenizersBackend", "backend": "tokenizers", **self.special_tokens_map,
                  "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces}
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False),
                                                      encoding="utf-8")
        if self.chat_template:
            (folder / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
        meta = {"format": FORMAT, "special": self.special_tokens_map,
                "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces}
        (folder / META).write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """The base vocabulary, without added tokens (transformers' meaning)."""
        return self.backend.get_vocab_size(with_added_tokens=False)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.backend.token_to_id(tokens)
        return [self.backend.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self.backend.id_to_token(ids)
        return [self.backend.id_to_token(int(i)) for i in ids]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str | list[str], add_special_tokens: bool = True) -> dict:
        """{"input_ids", "attention_mask"} of a text (lists of ids) or of a list of texts (lists of lists)."""
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens)
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        ids = [e.ids for e in self.backend.encode_batch(list(text), add_special_tokens=add_special_tokens)]
        return {"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids]}

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        ids = [ids] if isinstance(ids, int) else [int(i) for i in ids]
        text = self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return clean_up_spaces(text) if self.clean_up_tokenization_spaces else text

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def apply_chat_template(self, conversation: list[dict], *, chat_template: str | None = None,
                            add_generation_prompt: bool = False, tokenize: bool = True, return_dict: bool = True,
                            tools=None, documents=None, **kwargs):
        """The chat rendered with `chat_template` (default: the tokenizer's), the special tokens and `kwargs`
        visible to it by name; ``tokenize=False``: the text; else its ids (no special tokens added), as
        ``{"input_ids", "attention_mask"}`` when `return_dict`, as in transformers 5."""
        from .chat_template import render
        template = chat_template or self.chat_template
        if not template:
            raise ValueError("this tokenizer has no chat template; pass chat_template=")
        text = render(template, conversation, add_generation_prompt=add_generation_prompt, tools=tools,
                      documents=documents, **{**self.special_tokens_map, **kwargs})
        if not tokenize:
            return text
        return self(text, add_special_tokens=False) if return_dict else self.encode(text, add_special_tokens=False)
