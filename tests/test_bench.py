"""The benchmark suite: discovery, the RESULTS.md record, the runner end to end, and the real-size model builder."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

# benchmarks/ ships with the repository, not the package: import it from the checkout under test.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import benchmarks  # noqa: E402
from benchmarks import __main__ as suite  # noqa: E402
from benchmarks import gpu_realsize  # noqa: E402


def test_timed_figures():
    calls = []
    stats = benchmarks.timed(lambda: calls.append(1), repeats=5, warmup=2)
    assert len(calls) == 7 and stats["repeats"] == 5
    assert 0 <= stats["min_ms"] <= stats["p50_ms"] <= stats["p95_ms"] <= stats["max_ms"]
    with pytest.raises(ValueError):
        benchmarks.timed(lambda: None, repeats=0)


def test_discovery_reads_files_without_importing_them():
    found = suite.discover()
    assert found["gpu_realsize"]["runnable"] and found["gpu_realsize"]["description"].startswith("Real-size")
    assert "__main__" not in found and "__init__" not in found
    assert all(isinstance(meta["runnable"], bool) for meta in found.values())


def test_record_appends_rows_per_section_and_keeps_other_text(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Notes by hand\n\nprose | with a bar\n")
    row = {"date": "2026-01-01", "machine": "cpu x2", "setup": "size mid", "versions": "torch 2", "command": "c",
           "figures": {"a_ms": 1.23456, "b_x": 2.0, "ok": True}}
    suite.record("cache", row, results)
    suite.record("sdk_overhead", {**row, "date": "2026-01-02"}, results)
    suite.record("cache", {**row, "date": "2026-01-03", "figures": {"a_ms": 9.0}}, results)
    text = results.read_text()
    assert text.startswith("# Benchmark results\n\n## Notes by hand\n\nprose | with a bar\n")
    cache = text.split("<!-- bench:cache -->")[1].split("## sdk_overhead")[0]
    rows = [line for line in cache.splitlines() if line.startswith("| 2026")]
    assert [r.split(" | ")[0] for r in rows] == ["| 2026-01-01", "| 2026-01-03"]  # in order, one table
    assert "a_ms=1.235; b_x=2; ok=True" in rows[0] and text.count("## cache") == 1


def test_runner_end_to_end_on_the_tiny_checkpoint(tmp_path, tiny_checkpoint):
    import shutil

    results, out = tmp_path / "RESULTS.md", tmp_path / "all.json"
    shutil.copytree(tiny_checkpoint, tmp_path / "work" / "tiny")  # a complete build is reused, not rebuilt
    code = suite.main(["gpu_realsize", "--size", "tiny", "--quick", "--warmup", "1", "--results", str(results),
                       "--json", str(out), "--workdir", str(tmp_path / "work"), "--record"])
    assert code == 0
    result = json.loads(out.read_text())["results"]["gpu_realsize"]
    figures = result["figures"]
    assert result["status"] == "ok" and figures["device"] == "cpu"
    assert figures["tiny.fp32.verify_p50_ms"] > 0 and figures["tiny.fp32.reason_100_tokens_s"] > 0
    assert figures["tiny.fp32.weights_mib"] > 0
    if "tiny.4bit.verify_p50_ms" in figures:  # bitsandbytes present: the ratio is measured in the same run
        assert figures["tiny.4bit_vs_fp32_verify_x"] == pytest.approx(
            figures["tiny.fp32.verify_p50_ms"] / figures["tiny.4bit.verify_p50_ms"])
    text = results.read_text()
    assert "<!-- bench:gpu_realsize -->" in text and "tiny.fp32.verify_p50_ms=" in text
    assert "python -m benchmarks gpu_realsize --size tiny" in text


def test_runner_rejects_unknown_names_and_lists(capsys):
    assert suite.main(["gpu_realsise"]) == 2
    assert "did you mean 'gpu_realsize'" in capsys.readouterr().err
    assert suite.main(["--list"]) == 0
    assert "gpu_realsize" in capsys.readouterr().out


def test_failures_and_skips_are_reported_not_raised(monkeypatch, tmp_path):
    import types

    broken = types.ModuleType("benchmarks.zz_broken")
    broken.run = lambda args: 1 / 0
    missing = types.ModuleType("benchmarks.zz_missing")

    def needs_extra(args):
        raise ImportError("no module named onnxruntime")

    missing.run = needs_extra
    monkeypatch.setitem(sys.modules, "benchmarks.zz_broken", broken)
    monkeypatch.setitem(sys.modules, "benchmarks.zz_missing", missing)
    args = suite.parser("x").parse_args([])
    assert suite.run_one("zz_broken", args)["status"] == "failed"
    skipped = suite.run_one("zz_missing", args)
    assert skipped["status"] == "skipped" and "onnxruntime" in skipped["error"]


def test_realsize_configs_have_the_release_parameter_counts():
    pytest.importorskip("transformers")
    assert gpu_realsize.count_parameters("3b") == 3_754_622_976  # Qwen2.5-VL-3B
    cfg = gpu_realsize.realsize_config("7b", {"text_config": {"bos_token_id": 5}, "vision_config": {}})
    assert cfg["text_config"]["bos_token_id"] == 5 and cfg["vision_config"]["out_hidden_size"] == 3584
    assert sum(cfg["text_config"]["rope_parameters"]["mrope_section"]) * 2 == 3584 // 28  # head_dim / 2


def test_realsize_builder_loads_through_the_sdk(monkeypatch, tmp_path):
    """The builder's code path, on a small stand-in shape so it runs on CPU in seconds."""
    pytest.importorskip("transformers")
    small = dict(text=dict(hidden_size=256, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=2048), out_hidden_size=256, tie_word_embeddings=True)
    monkeypatch.setitem(gpu_realsize.REAL_SHAPES, "3b", small)
    monkeypatch.setattr(gpu_realsize, "REAL_VISION", dict(gpu_realsize.REAL_VISION, depth=2, hidden_size=64,
                                                          intermediate_size=128, num_heads=2,
                                                          fullatt_block_indexes=[1]))
    folder = gpu_realsize.build_realsize_checkpoint(tmp_path / "3b-random", size="3b", device="cpu")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert gpu_realsize.build_realsize_checkpoint(folder, size="3b", device="cpu") == folder  # reused
    figures = gpu_realsize.measure(folder, device="cpu", quantization=None, repeats=1, warmup=0)
    assert figures["verify_p50_ms"] > 0 and figures["reason_100_tokens_s"] > 0


def test_tpru_bench_finds_the_suite(tmp_path, monkeypatch):
    from tpru_agent.cli.bench_cmd import find_suite
    from tpru_agent.cli.main import cli
    from tpru_agent.errors import ConfigError

    root = Path(benchmarks.__file__).resolve().parents[1]
    assert find_suite(root / "benchmarks") == root
    with pytest.raises(ConfigError, match="checkout"):
        find_suite(tmp_path)
    monkeypatch.chdir(root)
    result = CliRunner().invoke(cli, ["bench", "--list"])
    assert result.exit_code == 0 and "gpu_realsize" in result.output


def test_results_are_recorded_only_with_record(monkeypatch, tmp_path):
    """RESULTS.md is tracked: a plain run leaves it alone; --record (CLI and module) appends."""
    from tpru_agent.cli.main import cli

    results = tmp_path / "RESULTS.md"
    monkeypatch.setattr(suite, "run_one", lambda name, args: {"status": "ok", "figures": {"x_ms": 1.0},
                                                               "seconds": 0.0, "error": None})
    assert suite.main(["cache", "--results", str(results)]) == 0
    assert not results.exists()
    assert suite.main(["cache", "--results", str(results), "--record"]) == 0
    assert "x_ms=" in results.read_text()
    monkeypatch.chdir(Path(suite.__file__).parents[1])
    captured = []
    monkeypatch.setattr(suite, "main", lambda argv, prog=None: captured.append(argv) or 0)
    assert CliRunner().invoke(cli, ["bench", "cache"]).exit_code == 0
    assert CliRunner().invoke(cli, ["bench", "cache", "--record"]).exit_code == 0
    assert "--record" not in captured[0] and "--record" in captured[1]
