"""Tokenizer, chat template and a streaming detokenizer that never splits a UTF-8 character."""
from __future__ import annotations

import weakref
from pathlib import Path


def load_tokenizer(folder: str | Path):
    """The tokenizer of a model folder: a `sinkstream.tokenizer_json.Tokenizer` where the folder holds one
    (GGUF files' folders, saved tokenizers), else transformers' AutoTokenizer."""
    from .tokenizer_json import META, Tokenizer
    if (Path(folder) / META).exists():
        return Tokenizer.from_folder(folder)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    return AutoTokenizer.from_pretrained(str(folder))


_MARKS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "<eos>", "<start_of_turn>")
_marks_seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _marks(tokenizer) -> dict[str, int]:
    """The ids of the turn marks above that the vocabulary has. `get_vocab` builds a dict of the whole
    vocabulary (19 ms for SmolLM2's 49K tokens), so this is worked out once per tokenizer and vocabulary size."""
    size = len(tokenizer)
    hit = _marks_seen.get(tokenizer)
    if hit is None or hit[0] != size:
        vocab = tokenizer.get_vocab()
        hit = (size, {m: vocab[m] for m in _MARKS if m in vocab})
        _marks_seen[tokenizer] = hit
    return hit[1]


def eos_token_ids(tokenizer) -> set[int]:
    """Every id that ends a reply: the tokenizer's EOS and the end-of-turn marks of the families we run."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    ids.update(i for m, i in _marks(tokenizer).items() if m != "<start_of_turn>")
    return ids


# Gemma's turn format, for GGUF files that ship the tokens but not the template (gemma3-270m).
_GEMMA_TURNS = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
    "{% if m['role'] == 'system' %}{{ '<start_of_turn>user\n' + m['content'] + '\n\n' }}{% continue %}{% endif %}"
    "{% if loop.index0 > 0 and messages[loop.index0 - 1]['role'] == 'system' %}{{ m['content'] }}"
    "{% else %}{{ '<start_of_turn>' + role + '\n' + m['content'] }}{% endif %}{{ '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def encode(tokenizer, text: str, *, start_of_stream: bool) -> list[int]:
    """Token ids of `text`; the tokenizer's BOS (if it adds one) only at the very start of a stream."""
    bos = getattr(tokenizer, "bos_token", None)
    add = start_of_stream and not (bos and text.startswith(bos))
    return tokenizer.encode(text, add_special_tokens=add)


def render_chat(tokenizer, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
    """Render messages with the model's own chat template, in a Jinja sandbox (ours for a
    `tokenizer_json.Tokenizer`, transformers' for its own tokenizers)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template and "<start_of_turn>" in _marks(tokenizer):
        template = _GEMMA_TURNS
    if template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             chat_template=template)
    # No template: a plain transcript, so base models still work.
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
    return text + ("Assistant:" if add_generation_prompt else "")


class StreamingDetokenizer:
    """Feed token ids one at a time; `add` returns the new text that is safe to print.

    Decodes a short sliding span of tokens and emits only the part beyond what was already printed,
    holding text back while it ends in an incomplete UTF-8 sequence (U+FFFD). Cost per token is bounded.
    """

    def __init__(self, tokenizer, *, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.tokens: list[int] = []
        self.prefix = 0   # decoding starts here (context so spaces decode right)
        self.read = 0     # tokens up to here are printed

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def add(self, token: int) -> str:
        self.tokens.append(int(token))
        before = self._decode(self.tokens[self.prefix:self.read])
        after = self._decode(self.tokens[self.prefix:])
        if after.endswith("\ufffd") or len(after) <= len(before) and not after.startswith(before):
            return ""  # wait for the rest of the character
        piece = after[len(before):]
        self.prefix, self.read = self.read, len(self.tokens)
        if self.prefix > 64:  # keep the lists short on an endless stream
            self.tokens = self.tokens[self.prefix:]
            self.read -= self.prefix
            self.prefix = 0
        return piece

    def flush(self) -> str:
        """Whatever is still held back (e.g. a truncated character at the very end)."""
        rest = self._decode(self.tokens[self.prefix:])[len(self._decode(self.tokens[self.prefix:self.read])):]
        self.read = len(self.tokens)
        return rest
