"""Smoke tests of the benchmark generator and runners on tiny sizes (the benchmarks themselves are not CI).

The scripts run in this process (:func:`main`): what a runner times and measures as a whole process
is a process it starts itself (benchmarks/measure.py, or subprocess), and those stay processes; the
runner's own process is the place that starts them, and starting a fresh Python for it (torch,
transformers and PEFT imported again) would only add its start to each test.
"""

import hashlib
import json
import re
import runpy
import shutil
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def main(monkeypatch):
    """Runs a benchmark script as ``python SCRIPT ARGS...`` would, in this process; gives its exit status.

    The scripts put benchmarks/ first on sys.path, and some set torch's thread count: both are given back.
    """

    def run_main(script: Path, *args) -> int:
        monkeypatch.setattr(sys, "argv", [str(script), *map(str, args)])
        monkeypatch.setattr(sys, "path", list(sys.path))
        threads = torch.get_num_threads()
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as e:
            return 0 if e.code is None else e.code
        finally:
            torch.set_num_threads(threads)
        return 0

    return run_main


def test_generator_writes_peft_adapters_with_a_planted_subspace(tmp_path, main):
    sizes = ("--count", "3", "--layers", "1", "--hidden", "32", "--rank", "4", "--shared-rank", "4")
    assert main(BENCH / "generate.py", tmp_path / "a", *sizes) == 0
    folders = sorted((tmp_path / "a").iterdir())
    assert [f.name for f in folders] == ["task-000", "task-001", "task-002"]
    assert json.loads((folders[0] / "adapter_config.json").read_text())["r"] == 4


@pytest.mark.parametrize("fixed_k", [None, 3], ids=["exact", "k3"])
def test_the_floor_decomposes_every_module_side_once(tmp_path, main, capsys, fixed_k):
    sizes = ("--count", "3", "--layers", "1", "--hidden", "32", "--rank", "4", "--shared-rank", "4")
    assert main(BENCH / "generate.py", tmp_path / "a", *sizes) == 0
    capsys.readouterr()
    k = ("--k", fixed_k) if fixed_k else ()
    assert main(BENCH / "decomposition_floor.py", tmp_path / "a", *k) == 0
    floor = json.loads(capsys.readouterr().out)
    assert floor["modules"] == 2 and floor["checksum"] > 0  # q and v: each side's top σ², summed


def test_merge_runner_measures_both_tools_and_writes_its_results(tmp_path, main):
    out = tmp_path / "r.json"
    sizes = ("--counts", "2,3", "--layers", "1", "--hidden", "32", "--rank", "4", "--shared-rank", "4")
    where = ("--work", tmp_path / "w", "--reference-modules", "1", "--out", out, "--plot", tmp_path / "p.png")
    assert main(BENCH / "bench_merge.py", *sizes, *where) == 0
    result = json.loads(out.read_text())
    assert [r["adapters"] for r in result["rows"]] == [2, 3]
    for r in result["rows"]:
        sc = r["share_convert"]
        assert sc["wall_s"] > 0 and sc["peak_rss_mb"] > 0 and 0 <= sc["mean_error"] < 1
        assert set(sc["timings"]) == {"read", "canonicalize", "decompose", "encode", "write"}
    assert result["reference_decomposition"]["modules_timed"] == 1
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_add_runner_times_updates_of_growing_checkpoints(tmp_path, main):
    out = tmp_path / "a.json"
    sizes = ("--tasks", "2,4", "--layers", "1", "--hidden", "32", "--rank", "4", "--repeat", "1")
    assert main(BENCH / "bench_add.py", *sizes, "--work", tmp_path / "w", "--out", out) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["old_tasks"] for r in rows] == [2, 4] and all(r["wall_s_best"] > 0 for r in rows)
    assert result["startup_s"] > 0 and all(0 < r["library_add_s_best"] < r["wall_s_best"] for r in rows)


def test_serve_runner_compares_the_runtime_with_peft_and_writes_its_results(tmp_path, main):
    out = tmp_path / "serve.json"
    sizes = ("--layers", "2", "--hidden", "96", "--tasks", "4", "--serve", "3", "--rows", "6", "--seq", "4")
    rounds = ("--repeat", "1", "--layer-repeat", "1")
    assert main(BENCH / "bench_serve.py", *sizes, *rounds, "--work", tmp_path / "w", "--out", out) == 0
    results = json.loads(out.read_text())
    assert set(results["throughput"]["tokens_per_second"]) == {
        "base",
        "peft_mixed",
        "share_mixed",
        "share_one_task",
        "share_merged",
    }
    assert results["throughput"]["logits_relative_difference_share_vs_peft"] < 1e-5
    for level in ("whole_forward", "one_layer"):
        assert set(results["overhead"][level]) == {"cpu", "wall"}
        assert results["overhead"][level]["cpu"]["share_over_peft_median_of_rounds"] != 0
    memory = results["memory"]
    assert memory["share_adapter_bytes"] == memory["share_report"]["adapters"] > 0
    assert set(memory["whole_process_mb"]) == {"base", "peft", "share"}


def test_bounds_runner_compares_recorded_and_true_errors(tmp_path, main):
    out = tmp_path / "b.json"
    assert (
        main(BENCH / "bench_bounds.py", "--layers", "1", "--hidden", "64", "--work", tmp_path / "w", "--out", out) == 0
    )
    steps = json.loads(out.read_text())["steps"]
    assert list(steps) == ["merge 4", "add 3", "add 3 more", "merge 7 at once", "merge 10 at once"]
    for step in steps.values():
        assert all(row["shortfall"] <= 1e-5 for row in step["tasks"].values())  # every recorded error bounds the truth


def test_identity_check_records_every_output_and_compare_flags_a_changed_byte(tmp_path, main, capsys):
    v1, data = BENCH.parent / "tests" / "data" / "v1", tmp_path / "data" / "v1"
    data.mkdir(parents=True)
    shutil.copy(v1 / "plain.safetensors", data)  # one old checkpoint and one adapter: the legacy case, small
    shutil.copytree(v1 / "adapters" / "new-000", data / "adapters" / "new-000")
    out, work = tmp_path / "a.json", tmp_path / "w"
    # each command of a case still runs in its own process, started by the script
    assert (
        main(BENCH / "identity.py", "run", "--only", "legacy", "--data", data.parent, "--work", work, "--out", out) == 0
    )
    result = json.loads(out.read_text())
    steps = result["cases"]["legacy"]["steps"]
    assert [s.rsplit("/", 1)[-1] for s in steps] == ["info", "verify", "tasks", "extract-all", "add"]
    assert all(s["rc"] == 0 for s in steps.values())
    written = steps["v1/add"]["files"]
    assert written == {
        "v1/add/s.safetensors": hashlib.sha256((work / "legacy/v1/add/s.safetensors").read_bytes()).hexdigest()
    }
    assert len(steps["v1/plain.safetensors/extract-all"]["files"]) == 2 * 3  # config and weights of each task
    capsys.readouterr()
    assert main(BENCH / "identity.py", "compare", out, out) == 0
    assert capsys.readouterr().out.rstrip().endswith("0 DIFFERENT")
    written["v1/add/s.safetensors"] = "0" * 64
    (tmp_path / "b.json").write_text(json.dumps(result))
    assert main(BENCH / "identity.py", "compare", out, tmp_path / "b.json") == 1
    stdout = capsys.readouterr().out
    assert re.search(r"v1/add +DIFFERENT +files v1/add/s.safetensors", stdout), stdout
