"""The benchmark keeps working (tiny mode); its numbers live in BENCHMARKS.md, never in assertions on time."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_tiny_runs_and_reports_ratios(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_dynamic.py"), "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "vs fixed" in proc.stdout and "vs timm dyn" in proc.stdout and "loading" in proc.stdout
    data = json.loads(out.read_text())
    assert len(data["forward"]) == 3
    for row in data["forward"]:
        assert set(row["ratios"]) >= {"fixed", "timm_dynamic"} and all(v > 0 for v in row["ratios"].values())
    (load,) = data["load"]
    assert load["ours_s"] > 0 and load["timm_s"] > 0 and load["ours_peak_mb"] >= 0


def test_family_bench_tiny_runs_and_reports_ratios(tmp_path, monkeypatch):
    out = tmp_path / "families.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_families.py"), "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "vs fixed" in proc.stdout
    data = json.loads(out.read_text())
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    assert set(data) == {case[0] for case in importlib.import_module("family_bench").TINY_CASES}
    assert all(row["ratio"] > 0 and len(row["size"]) == 2 for rows in data.values() for row in rows)


def test_calibration_bench_tiny_runs_and_reports_ratios(tmp_path):
    out = tmp_path / "calibration.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_calibration.py"), "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "calib img/s" in proc.stdout
    (row,) = json.loads(out.read_text()).values()
    assert row["ratio"] > 0 and row["calibration_images_per_s"] > 0 and row["calibration_peak_mb"] >= 0


def test_train_sizes_bench_tiny_runs_and_reports_ratios(tmp_path):
    out = tmp_path / "train_sizes.json"
    script = str(ROOT / "benchmarks" / "bench_train_sizes.py")
    proc = subprocess.run(
        [sys.executable, script, "--tiny", "--out", str(out)], capture_output=True, text=True, check=True
    )
    assert "ratio" in proc.stdout and "tok/s" in proc.stdout
    data = json.loads(out.read_text())
    (fam,) = {row["family"] for row in data["scheduled"]}
    sizes = [row["size"] for row in data["scheduled"]]
    assert len(sizes) == 2 and sizes[1] == 2 * sizes[0]  # the family's tiny size and twice it
    assert all(row["ratio"] > 0 and row["saved_mib_ours"] > 0 for row in data["scheduled"])
    assert data["naflex"]["ratio"] > 0
    out_peak = tmp_path / "train_sizes_peak.json"
    subprocess.run(
        [sys.executable, script, "--tiny", "--peak", "--out", str(out_peak)], check=True, capture_output=True
    )
    peak = json.loads(out_peak.read_text())["peak"]
    assert [(row["family"], row["size"]) for row in peak] == [(fam, sizes[0])]  # tiny: the family's own size only
    assert all(row["peak_mib_ours"] >= 0 and row["peak_mib_fixed"] >= 0 for row in peak)
