"""The CLI: real runs, and one-line errors with a non-zero exit for user mistakes (no tracebacks)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import hf_tiny, save_hf_folder


def run(*args, stdin=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "sinkstream", *args], input=stdin, capture_output=True,
                          text=True, env=env, timeout=300)


def assert_user_error(p, needle):
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.startswith("sinkstream: error")]
    assert len(lines) == 1 and needle in lines[0], p.stderr


def test_missing_model():
    assert_user_error(run("generate", "hi", "--model", "/no/such/model.gguf"), "not found")


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    assert_user_error(run("generate", "hi", "--model", str(bad)), "corrupt")
    notgguf = tmp_path / "x.gguf"
    notgguf.write_bytes(b"hello world")
    assert_user_error(run("generate", "hi", "--model", str(notgguf)), "not a GGUF")


def test_truncated_safetensors(tmp_path):
    folder = save_hf_folder(hf_tiny("llama"), tmp_path / "m")
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    assert_user_error(run("generate", "hi", "--model", str(folder)), "truncated or corrupt")


def test_unsupported_architecture(tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    p = run("generate", "hi", "--model", str(folder))
    assert_user_error(p, "unsupported architecture 'bert'")
    assert "llama" in p.stderr


def test_pickled_weights_refused(tmp_path):
    folder = tmp_path / "pkl"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04")
    assert_user_error(run("generate", "hi", "--model", str(folder)), "safetensors only")


@pytest.mark.parametrize("flags,needle", [(["--sinks", "-1"], "sinks"), (["--window", "0"], "window"),
                                          (["--top-p", "0"], "top_p"), (["--dtype", "int3"], "dtype")])
def test_bad_flags(flags, needle):
    assert_user_error(run("generate", "hi", *flags), needle)


def test_generate_and_models_real():
    p = run("generate", "The capital of France is", "--max-tokens", "6", "--window", "60", "-v")
    assert p.returncode == 0 and "Paris" in p.stdout, p.stderr
    assert "tok/s" in p.stderr
    p = run("generate", "The capital of France is", "--max-tokens", "6", "--window", "60", "--quant", "int4")
    assert p.returncode == 0 and "Paris" in p.stdout, p.stderr
    p = run("models")
    assert p.returncode == 0 and "llama" in p.stdout


def test_chat_repl_commands():
    p = run("chat", "--max-tokens", "8", "--window", "60",
            stdin="What is 2+2?\n/stats\n/reset\n/stats\n/nope\n/exit\n")
    assert p.returncode == 0, p.stderr
    assert "turns 1" in p.stderr and "turns 0" in p.stderr and "unknown command" in p.stderr
    assert "tok/s" in p.stderr


def test_chat_pins_its_system_prompt():
    p = run("chat", "--max-tokens", "8", "--window", "60", "--system", "You are terse.", "--pin-system",
            stdin="What is 2+2?\n/reset\nAnd 3+3?\n/exit\n")
    assert p.returncode == 0, p.stderr
    assert "system prompt pinned (" in p.stderr and "tok/s" in p.stderr
    p = run("chat", "--window", "60", "--system", "Remember all of this. " * 20, "--pin-system", stdin="/exit\n")
    assert_user_error(p, "more than this cache's limit of 32")


def test_core_imports_without_server_or_plot_packages():
    code = ("import sys, sinkstream, sinkstream.cli; sinkstream.cli.build_parser(); "
            "bad = [m for m in ('fastapi', 'uvicorn', 'matplotlib', 'starlette') if m in sys.modules]; "
            "assert not bad, bad")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
