"""sinkstream.tokenizer_json.Tokenizer against transformers' tokenizer of the same file: ids, text, special
tokens and rendered chats agree; loading a GGUF whose folder is built imports no transformers."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

transformers = pytest.importorskip("transformers")
from transformers import AutoTokenizer  # noqa: E402

from sinkstream.gguf import open_gguf  # noqa: E402
from sinkstream.loading import resolve  # noqa: E402
from sinkstream.tokenizer import eos_token_ids, load_tokenizer, render_chat  # noqa: E402
from sinkstream.tokenizer_json import META, SPECIALS, Tokenizer  # noqa: E402
from test_gguf_arch import CASES, private_cache, write_gguf  # noqa: E402,F401

TEXTS = ["The capital of France is Paris.", "  two leading spaces,\ttab and\nnewlines\n\n",
         "\u00dcn\u00efc\u00f6d\u00e9, emoji \U0001F600, CJK \u4e2d\u6587, code: f(x) = x**2",
         "<|im_start|>user\nhi<|im_end|> <s>ab</s> <unk>", "don't , isn't . ok ?", ""]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi \u00e9\U0001F600"},
        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Why?"}]
# features of real chat templates: tojson of non-ASCII text, namespaces, loop controls, generation blocks
TEMPLATE = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
            "{% set ns.n = ns.n + 1 %}{{ bos_token }}{{ m.role }}:{{ m.content | tojson }}"
            "{% if m.role == 'assistant' %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endif %}\n"
            "{% endfor %}{{ ns.n }}{% if add_generation_prompt %}assistant:{% endif %}")


def assert_same(tok, ref) -> None:
    for text in TEXTS:
        for add in (True, False):
            assert tok.encode(text, add_special_tokens=add) == ref.encode(text, add_special_tokens=add), text
        ids = ref.encode(text)
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
    assert len(tok) == len(ref) and tok.get_vocab() == ref.get_vocab()
    for name in SPECIALS:
        assert (getattr(tok, name), getattr(tok, f"{name}_id")) == (getattr(ref, name), getattr(ref, f"{name}_id"))
    assert eos_token_ids(tok) == eos_token_ids(ref)
    for gen in (True, False):
        assert render_chat(tok, CHAT, add_generation_prompt=gen) == render_chat(ref, CHAT, add_generation_prompt=gen)
        assert tok.apply_chat_template(CHAT, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=gen) \
            == ref.apply_chat_template(CHAT, chat_template=TEMPLATE, tokenize=False, add_generation_prompt=gen)
    assert tok.apply_chat_template(CHAT, chat_template=TEMPLATE, return_dict=False) \
        == ref.apply_chat_template(CHAT, chat_template=TEMPLATE, return_dict=False)


@pytest.fixture
def smollm2_folder():
    return open_gguf(resolve(None)).tokenizer_folder()  # the user's cache: built once for the suite


def test_smollm2_matches_transformers(smollm2_folder):
    tok = load_tokenizer(smollm2_folder)
    assert isinstance(tok, Tokenizer) and tok.chat_template
    assert_same(tok, AutoTokenizer.from_pretrained(str(smollm2_folder)))
    path = resolve(None)
    from_file = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TEXTS:
        assert tok.encode(text) == from_file.encode(text)


def test_sentencepiece_gguf_matches_transformers(tmp_path, private_cache):  # noqa: F811
    """A llama-style (sentencepiece) vocabulary, as the tiny GGUFs of every family carry."""
    hf, arch, meta, tensors = CASES["qwen3"]()
    path = tmp_path / "t.gguf"
    write_gguf(path, arch, meta, tensors, template=TEMPLATE)
    folder = open_gguf(path).tokenizer_folder()
    tok = load_tokenizer(folder)
    assert isinstance(tok, Tokenizer) and tok.chat_template == TEMPLATE
    assert_same(tok, AutoTokenizer.from_pretrained(str(folder)))
    # saved and read back, by us and by transformers
    tok.save_pretrained(tmp_path / "saved")
    assert_same(load_tokenizer(tmp_path / "saved"), AutoTokenizer.from_pretrained(str(tmp_path / "saved")))


def test_a_template_cannot_reach_python_internals(smollm2_folder):
    tok = load_tokenizer(smollm2_folder)
    import jinja2
    for bad in ("{{ messages.__class__.__mro__ }}", "{% set ns = namespace() %}{% set ns._x = 1 %}",
                "{{ raise_exception('no') }}"):
        with pytest.raises(jinja2.exceptions.TemplateError):
            tok.apply_chat_template(CHAT, chat_template=bad, tokenize=False)


def test_folder_without_meta_goes_to_transformers(smollm2_folder, tmp_path):
    plain = tmp_path / "plain"
    AutoTokenizer.from_pretrained(str(smollm2_folder)).save_pretrained(str(plain))
    assert not (plain / META).exists()
    assert not isinstance(load_tokenizer(plain), Tokenizer)


def test_loading_a_gguf_imports_no_transformers(smollm2_folder):
    code = ("import sys, json, sinkstream; m, tok = sinkstream.load(quiet=True); "
            "print(json.dumps([type(tok).__name__, 'transformers' in sys.modules, tok.encode('Hello there')]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    name, imported, ids = json.loads(out.stdout.strip().splitlines()[-1])
    assert (name, imported) == ("Tokenizer", False)
    assert ids == load_tokenizer(smollm2_folder).encode("Hello there")


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("case", ["smollm2", *sorted(CASES)])
def test_gguf_tokenizer_folder_is_what_autotokenizer_builds(case, tmp_path, monkeypatch):
    """The folder built with the class picked from our config's model type is byte for byte the folder built
    through AutoTokenizer (which reads the whole file for a config first), for every family's tiny GGUF;
    GPT-NeoX and MPT files, whose config AutoTokenizer cannot read, get a tokenizer this way only."""
    from sinkstream.gguf.tokenizer import tokenizer_folder
    if case == "smollm2":
        path = resolve(None)
    else:
        hf, arch, meta, tensors = CASES[case]()
        path = tmp_path / "t.gguf"
        write_gguf(path, arch, meta, tensors, template=TEMPLATE)
    gm = open_gguf(path)
    header = int(gm._reader.data_offset)
    monkeypatch.setenv("SINKSTREAM_CACHE", str(tmp_path / "fast"))
    fast = tokenizer_folder(path, header, gm.config["model_type"])
    monkeypatch.setenv("SINKSTREAM_CACHE", str(tmp_path / "auto"))
    if gm.architecture in ("gptneox", "mpt"):  # AutoTokenizer cannot read these files' config at all
        with pytest.raises(Exception, match="not supported"):
            tokenizer_folder(path, header, None)
        assert_same(load_tokenizer(fast), AutoTokenizer.from_pretrained(str(fast)))
        return
    auto = tokenizer_folder(path, header, None)
    assert fast != auto and _files(fast) == _files(auto)
