"""GGUF files beyond their tensors: the tokenizer folder, damaged and unsupported files, the real models.

Files are written as tests/test_gguf_arch.py writes them (llama.cpp's layout)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from transformers import AutoConfig, AutoTokenizer  # noqa: E402

from sinkstream.errors import ModelLoadError  # noqa: E402
from sinkstream.gguf import open_gguf  # noqa: E402
from sinkstream.loading import build_model, resolve  # noqa: E402
from sinkstream.models import model_class  # noqa: E402
from sinkstream.tokenizer import load_tokenizer  # noqa: E402
from test_gguf_arch import (CASES, TEMPLATE, USER_CACHE, add_tokenizer, no_weights_outside,  # noqa: E402,F401
                            private_cache, write_gguf)


def test_tokenizer_folder(tmp_path, monkeypatch, request):
    """The folder holds the tokenizer transformers converts from the metadata (as it converts it: not
    re-derived from the architecture's tokenizer class) and the chat template; it is cached by file."""
    hf, arch, meta, tensors = CASES["qwen3"]()
    path = tmp_path / "t.gguf"
    write_gguf(path, arch, meta, tensors, template=TEMPLATE)
    reference = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    request.getfixturevalue("no_weights_outside")
    gm = open_gguf(path)
    folder = gm.tokenizer_folder()
    tok = load_tokenizer(folder)
    for text in ("abc def", "hello world zz", "<s>ab</s>"):
        assert tok.encode(text) == reference.encode(text) and len(tok.encode(text)) > 1
    assert tok.chat_template == TEMPLATE
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<user>hi"
    # cached: a second call builds nothing; a changed file gets a new folder
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: pytest.fail("rebuilt"))
    assert gm.tokenizer_folder() == folder
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(pytest.fail.Exception):
        gm.tokenizer_folder()


def one_line_error(path) -> str:
    with pytest.raises(ModelLoadError) as err:
        open_gguf(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)
    return str(err.value)


def test_damaged_and_unsupported_files(tmp_path):
    hf, arch, meta, tensors = CASES["qwen2-tied"]()
    good = tmp_path / "good.gguf"
    write_gguf(good, arch, meta, tensors)
    data = good.read_bytes()
    (tmp_path / "magic.gguf").write_bytes(b"GGUX" + data[4:])
    assert "bad magic" in one_line_error(tmp_path / "magic.gguf")
    (tmp_path / "cut.gguf").write_bytes(data[:-100])
    assert "truncated" in one_line_error(tmp_path / "cut.gguf")
    (tmp_path / "header.gguf").write_bytes(data[:300])
    assert "truncated or corrupt" in one_line_error(tmp_path / "header.gguf")
    write_gguf(tmp_path / "bert.gguf", "bert", meta, tensors)
    msg = one_line_error(tmp_path / "bert.gguf")
    assert "'bert'" in msg and "llama" in msg and "gemma3" in msg
    w = gguf.GGUFWriter(str(tmp_path / "q2k.gguf"), "qwen2")
    for key, value in meta.items():
        getattr(w, f"add_{key}")(value)
    add_tokenizer(w)
    for name, t in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(t.numpy()))
    w.add_tensor("blk.9.ffn_up.weight", np.zeros((4, 84), dtype=np.uint8), raw_dtype=Q.Q2_K)  # 4 rows of 256
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    msg = one_line_error(tmp_path / "q2k.gguf")
    assert "blk.9.ffn_up.weight" in msg and "Q2_K" in msg
    moe = {**tensors, "blk.0.ffn_gate_exps.weight": tensors["blk.0.ffn_up.weight"]}  # mixture of experts
    write_gguf(tmp_path / "moe.gguf", arch, meta, moe)
    assert "blk.0.ffn_gate_exps.weight" in one_line_error(tmp_path / "moe.gguf")
    qk_norm = {**tensors, "blk.0.attn_q_norm.weight": torch.ones(16)}  # a qwen2 file with Qwen3's q-norm
    write_gguf(tmp_path / "qknorm.gguf", arch, meta, qk_norm)
    assert "model.layers.0.self_attn.q_norm.weight have no place" in one_line_error(tmp_path / "qknorm.gguf")
    del tensors["blk.1.ffn_down.weight"]
    write_gguf(tmp_path / "missing.gguf", arch, meta, tensors)
    assert "model.layers.1.mlp.down_proj.weight" in one_line_error(tmp_path / "missing.gguf")


def test_metadata_arrays_read_as_gguf_reads_them(tmp_path):
    """Arrays are kept as one slice each (not one view per element): every field reads as gguf's reader gives it."""
    hf, arch, meta, tensors = CASES["qwen2-tied"]()
    w = gguf.GGUFWriter(str(tmp_path / "arrays.gguf"), arch)
    for key, value in meta.items():
        getattr(w, f"add_{key}")(value)
    add_tokenizer(w)
    w.add_array("test.strings", ["", "a", "é✓ 中文", "x" * 300])
    w.add_array("test.ints", [3, -1, 7])
    w.add_array("test.floats", [0.5, -2.25])
    w.add_array("test.empty", [])
    for name, t in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(t.numpy()))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours, ref = open_gguf(tmp_path / "arrays.gguf")._reader.fields, gguf.GGUFReader(str(tmp_path / "arrays.gguf")).fields
    assert list(ours) == list(ref)
    for key in ref:
        assert ours[key].contents() == ref[key].contents(), key
    assert ours["test.strings"].contents(2) == "é✓ 中文" and ours["test.ints"].contents(slice(1, None)) == [-1, 7]
    assert ours["tokenizer.ggml.tokens"].contents() == ref["tokenizer.ggml.tokens"].contents() != []


# --- the real model files ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real():
    """(path, GGUFModel) of an installed model file, opened once per module; skips when not installed."""
    opened = {}

    def get(name: str):
        if name not in opened:
            try:
                path = resolve(name)
            except ModelLoadError as e:
                pytest.skip(str(e))
            opened[name] = (path, open_gguf(path))
        return opened[name]
    return get


def user_cache(monkeypatch) -> None:
    """The user's cache for the real models' tokenizer folders: built once, not on every run."""
    if USER_CACHE:
        monkeypatch.setenv("SINKSTREAM_CACHE", USER_CACHE)
    else:
        monkeypatch.delenv("SINKSTREAM_CACHE")


# Gemma 3 270M (262K-token vocabulary) takes ~40 s here: `make test-all` runs it
@pytest.mark.parametrize("name", ["smollm2", pytest.param("gemma3-270m", marks=pytest.mark.slow)])
def test_real_file_matches_transformers_reading(name, real, monkeypatch):
    user_cache(monkeypatch)
    p, gm = real(name)
    theirs = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name).to_dict()
    family = model_class(gm.config["model_type"]).config_class
    assert family.from_dict(gm.config) == family.from_dict(theirs)
    tok = load_tokenizer(gm.tokenizer_folder())
    reference = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    text = "The capital of France is Paris. \u00dcn\u00efc\u00f6d\u00e9, emoji \U0001F600, code: f(x) = x**2\n"
    assert tok.encode(text) == reference.encode(text)
    assert tok.chat_template == reference.chat_template  # SmolLM2's; Gemma 3 270M's file has none
    chat = [{"role": "user", "content": "Hi there"}]
    if reference.chat_template:
        assert tok.apply_chat_template(chat, tokenize=False) == reference.apply_chat_template(chat, tokenize=False)


def test_real_smollm2_predicts_paris(real, monkeypatch):
    """Real Q4_1 weights through the q/k un-permutation: the model knows the answer."""
    user_cache(monkeypatch)
    _, gm = real("smollm2")
    model = build_model(gm.config, {n: gm.load(n, native=False) for n in gm.names()})
    tok = load_tokenizer(gm.tokenizer_folder())
    ids = torch.tensor([tok.encode("The capital of France is")])
    with torch.no_grad():
        assert tok.decode(int(model(ids)[0, -1].argmax())).strip() == "Paris"
