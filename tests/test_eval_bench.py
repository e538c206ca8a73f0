"""bench: positions, rows per policy, flat cache memory for sink, dense stops at its context, CLI JSON."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _eval_tiny import tiny_folder  # noqa: E402

from sinkstream.cli import main  # noqa: E402
from sinkstream.eval.bench import default_points  # noqa: E402


def test_default_points():
    assert default_points(1_000_000) == [1000, 3000, 10000, 30000, 100000, 300000, 1000000]
    assert default_points(100_000) == [1000, 3000, 10000, 30000, 100000]
    assert default_points(500) == [500]


def test_cli_json(tmp_path, capsys):
    folder = tiny_folder(tmp_path / "tiny", max_position_embeddings=512)
    rc = main(["bench", "--model", str(folder), "--compare", "sink:2+30,dense,recompute:32", "--tokens", "1200",
               "--points", "100,400,1200", "--decode-steps", "3", "--prefill-chunk", "128", "--json", "-q",
               "--out", str(tmp_path / "out")])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    sink = [r for r in res["rows"] if r["label"] == "sink(2,30)"]
    assert [r["position"] for r in sink] == [100, 400, 1200]
    assert all(r["ms_per_token"] > 0 and r["rss_mib"] > 0 for r in sink)
    assert len({r["cache_mib"] for r in sink}) == 1  # preallocated: the same bytes at every position
    dense = [r for r in res["rows"] if r["label"] == "dense"]
    assert dense[-1]["position"] == 1200 and dense[-1]["ms_per_token"] is None and "context" in dense[-1]["note"]
    assert dense[1]["cache_mib"] > dense[0]["cache_mib"]
    rec = [r for r in res["rows"] if r["cache"] == "recompute"]
    assert len(rec) == 1 and rec[0]["position"] == 32
    assert "recompute(32) / sink(2,30) ms per token" in res["summary"]
    assert (tmp_path / "out" / "bench.png").exists()
