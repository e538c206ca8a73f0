"""eval chat: degenerate-reply detection, one endless session per cache, dense overflow, CLI JSON."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _eval_tiny import tiny_folder  # noqa: E402

from sinkstream.cli import main  # noqa: E402
from sinkstream.eval import chat  # noqa: E402


def test_judge():
    assert chat.judge("Sure.") == (True, False)
    assert chat.judge("The sky is blue because air scatters blue light more than red light.") == (False, False)
    loop = "I like it. " + "the cat sat on the mat " * 4
    assert chat.judge(loop) == (False, True)
    assert chat.judge("no no no no no no no no no no no no no") == (False, True)
    assert chat.has_loop("a b c a b c d".split()) is False


def test_read_questions(tmp_path):
    qs = chat.read_questions(None)
    assert len(qs) >= 8 and all(len(q) == 2 for q in qs)
    f = tmp_path / "q.jsonl"
    f.write_text('{"turns": ["hi", "again"]}\n\n{"turns": ["x"]}\n')
    assert chat.read_questions(f) == [["hi", "again"], ["x"]]
    assert chat.read_questions(f, limit=1) == [["hi", "again"]]


def test_cli_sessions_dense_overflows_sink_does_not(tmp_path, capsys):
    folder = tiny_folder(tmp_path / "tiny", max_position_embeddings=256)
    rc = main(["eval", "chat", "--model", str(folder), "--compare", "dense,sink:4+60,window:64", "--limit", "4",
               "--max-tokens", "24", "--json", "--json-turns", "-q", "--out", str(tmp_path / "out")])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert res["turns"] == 8
    by = {r["label"]: r for r in res["results"]}
    assert by["dense"]["overflow_at"] is not None and by["dense"]["turns_done"] < 8
    for label in ("sink(4,60)", "window(64)"):
        assert by[label]["overflow_at"] is None and by[label]["turns_done"] == 8
        assert by[label]["final_cached"] <= 64 and by[label]["tokens_seen"] > 256
        assert 0 <= by[label]["degenerate"] <= 8
    turns = [t for t in res["per_turn"] if t["label"] == "sink(4,60)"]
    assert [t["turn"] for t in turns] == list(range(1, 9))
    assert all(t["reply_tokens"] <= 24 for t in turns)
    assert sorted(t["tokens_seen"] for t in turns) == [t["tokens_seen"] for t in turns]
    assert (tmp_path / "out" / "chat_turns.csv").exists()
