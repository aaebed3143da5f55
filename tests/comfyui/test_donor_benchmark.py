"""benchmarks/donor_benchmark.py in its CPU smoke mode: core's Wan, every block swapped from
host memory, outputs equal to the unswapped model, the row fields the issue names. (The
donor GPU rows need two GPUs: the script refuses a GPU run without a second device.)"""

from smoke_runs import run_cpu_smoke


def test_cpu_smoke_run_writes_the_rows(tmp_path, comfy):
    _, results = run_cpu_smoke("donor_benchmark.py", tmp_path / "donor.json")
    assert results["mode"] == "cpu" and results["device"] == "cpu"
    assert results["h2d_gbps"] > 0 and results["p2p_gbps"] is None
    assert [r["source"] for r in results["rows"]] == ["cpu", "cpu"]
    for row in results["rows"]:
        assert {"source", "tokens", "ms", "floor_ms", "equal_output"} <= set(row)
        assert row["equal_output"] is True and row["stored_on"] == ["cpu"]
        assert row["allocation"] == "cpu,*"
    assert results["bars"]["judged"] is False and results["bars"]["all_equal_output"] is True
