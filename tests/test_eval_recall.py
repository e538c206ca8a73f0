"""eval recall: pass key on the real model (inside the window vs evicted), StreamEval bookkeeping, CLI JSON."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _eval_tiny import tiny_folder, tiny_model  # noqa: E402

from sinkstream.cache import CacheConfig  # noqa: E402
from sinkstream.cli import main  # noqa: E402
from sinkstream.eval import recall  # noqa: E402


@pytest.fixture(scope="module")
def real():
    import sinkstream
    return sinkstream.load(quiet=True)


def test_passkey_inside_window_recalled_and_evicted_one_forgotten(real):
    model, tok = real
    rows = recall.passkey(model, tok, [CacheConfig("dense"), CacheConfig("sink", sinks=4, window=60)],
                          lengths=[320], depths=[0.2, 0.95], trials=1, seed=3)
    acc = {(r["label"], r["depth"]): r["accuracy"] for r in rows}
    dist = {(r["label"], r["depth"]): r["distance"] for r in rows}
    assert dist[("dense", 0.2)] > 200 and dist[("dense", 0.95)] < 60
    assert acc[("dense", 0.2)] == 1.0 and acc[("dense", 0.95)] == 1.0      # dense sees everything
    assert acc[("sink(4,60)", 0.95)] == 1.0                                 # key inside the window
    assert acc[("sink(4,60)", 0.2)] == 0.0                                  # key evicted long ago


def test_passkey_prompt_shape(real):
    _, tok = real
    ids, distance = recall.passkey_prompt(tok, 500, 0.5, 12345)
    assert 440 <= len(ids) <= 520 and 180 < distance < 320
    assert "The pass key is 12345" in tok.decode(ids)
    assert recall.first_number(" 12345. Remember") == 12345 and recall.first_number("none") is None


def test_lines(tmp_path):
    a, b = recall.generated_lines(5, seed=1), recall.generated_lines(5, seed=1)
    assert a == b and [x[0] for x in a] == ["1", "2", "3", "4", "5"]
    f = tmp_path / "l.jsonl"
    f.write_text(json.dumps({"prompt": "x\nline cold-tea: REGISTER_CONTENT is <42>\nline a-b: REGISTER_CONTENT is "
                                       "<7>\n"}) + "\n" + json.dumps({"prompt": "line cold-tea: REGISTER_CONTENT is <42>"}))
    assert recall.lines_from_file(f) == [("cold-tea", 42), ("a-b", 7)]


def test_streameval_asks_the_right_lines():
    from sinkstream.loading import tokenizer_for
    model = tiny_model()
    tok = tokenizer_for(None)
    pool = recall.generated_lines(40, seed=0)
    rows, queries = recall.streameval(model, tok, [CacheConfig("sink", sinks=4, window=200)], pool,
                                      distances=[5, 25], n_lines=40, query_every=10, max_tokens=2)
    assert [r["queries"] for r in rows] == [4, 2]  # L=25 can only be asked after 30 and 40 lines
    asked = [(q["distance_lines"], q["line"], q["expected"]) for q in queries]
    assert asked[:4] == [(5, str(i), pool[i - 1][1]) for i in (6, 16, 26, 36)]
    assert asked[4:] == [(25, "6", pool[5][1]), (25, "16", pool[15][1])]
    near, far = rows[0]["distance_tokens"], rows[1]["distance_tokens"]
    assert 0 < near < far


def test_cli_json(tmp_path, capsys):
    folder = tiny_folder(tmp_path / "tiny")
    rc = main(["eval", "recall", "--model", str(folder), "--compare", "sink:2+62,dense,memory:2+62", "--lengths", "120",
               "--depths", "0.5", "--trials", "1", "--distances", "10", "--lines", "20", "--max-tokens", "2",
               "--json", "-q", "--out", str(tmp_path / "out")])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert {r["label"] for r in res["passkey"]} == {"sink(2,62)", "dense", "memory(2,62,4x64)"}
    for r in res["passkey"] + res["streameval"]:  # the rows' fields agree with their labels
        assert (r["sinks"], r["window"]) == {"sink": (2, 62), "memory": (2, 62), "dense": (0, None)}[r["cache"]]
    for r in res["passkey"] + res["streameval"]:
        assert 0.0 <= r["accuracy"] <= 1.0
    assert {"length", "depth", "distance"} <= set(res["passkey"][0])
    assert {"distance_lines", "distance_tokens", "queries"} <= set(res["streameval"][0])
    assert (tmp_path / "out" / "passkey.png").exists() and (tmp_path / "out" / "streameval.csv").exists()
