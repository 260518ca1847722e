"""The benchmark modules run (tiny shapes): `kdkernels bench` pools its rounds per configuration;
every implementation the fused-linear benchmark times yields a time and a peak, and the table
compares each with its unfused path; the vocab-parallel benchmark script runs its 2 processes end
to end."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from kdkernels import benchmark, benchmark_fused_linear


@pytest.fixture(autouse=True)
def one_warmup_step(monkeypatch):
    """In-process measurements warm up with one step rather than seconds of them (tiny shapes)."""
    monkeypatch.setattr(benchmark, "WARMUP_SECONDS", 0.0)


def test_bench_pools_the_rounds_of_each_configuration(tmp_path):
    out = tmp_path / "bench.json"
    benchmark.run(8, [300], ["float32"], "cpu", 2, ("kdkernels",), str(out), ("forward_kl", "ab"), rounds=2)
    results = json.loads(out.read_text())["results"]
    assert [r["divergence"] for r in results] == ["forward_kl", "ab"]
    for r in results:
        assert r["rounds"] == 2 and len(r["times_ms"]) == 4 and r["median_ms"] > 0
        assert r["gbps"] == pytest.approx(r["minimal_bytes"] / r["median_ms"] / 1e6)


def test_fused_linear_benchmark_measures_every_implementation():
    results = [benchmark_fused_linear.measure(impl, 70, 8, 300, "float32", "cpu", 1)
               for impl in benchmark_fused_linear.IMPLEMENTATIONS]
    assert all(r["median_ms"] > 0 for r in results)
    table = benchmark_fused_linear.format_table(results)
    assert table.count("\n") == len(results) + 1 and "fused_topk" in table


def test_fused_linear_benchmark_rejects_an_unknown_implementation():
    with pytest.raises(ValueError, match="implementation must be one of"):
        benchmark_fused_linear.measure("fastest", 8, 8, 100, "float32", "cpu", 1)


def test_vocab_parallel_benchmark_runs(tmp_path):
    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "vocab_parallel.py"
    out = tmp_path / "vp.json"
    subprocess.run([sys.executable, str(script), "--rows", "8", "--vocab", "64", "--repeats", "1", "--json", str(out)],
                   check=True, capture_output=True, timeout=300)
    results = json.loads(out.read_text())["results"]
    assert results["kdkernels"]["collectives"] == 2 and all(row["median_ms"] > 0 for row in results.values())


def test_fused_linear_benchmark_measures_the_chosen_implementations_and_their_baselines(tmp_path):
    out = tmp_path / "fused.json"
    assert benchmark_fused_linear.main(["--rows", "8", "--hidden", "8", "--vocab", "100", "--dtype", "float32",
                                        "--repeats", "1", "--implementations", "fused", "--json", str(out)]) == 0
    assert [r["impl"] for r in json.loads(out.read_text())["results"]] == ["unfused", "fused"]
