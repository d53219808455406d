"""``bash benchmarks/gpu_check.sh OUT.json`` on a machine without CUDA: the GPU benchmark's code paths stay alive.

The script runs every case (fp32, bf16, channels_last_3d inputs, engine.compile with the eager backend, ZeRO 2, the
DataLoader path) at a tiny size and says in ``skipped`` what only a GPU can measure.
"""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs the full-grid benchmark (minutes)")
def test_gpu_check_cpu_mode(tmp_path: Path, stage_env: dict[str, str]) -> None:
    out = tmp_path / "gpu_check.json"
    stage_env["GPU_CHECK_TIMEOUT_S"] = "170"
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--work", str(tmp_path)],
                         cwd=ROOT, env=stage_env, capture_output=True, text=True, timeout=200)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["device"] == "cpu"
    assert r["torch"] and r["deepspeed"] and r["device_name"]
    assert r["failed"] == []
    assert set(r["cases"]) == {"fp32", "bf16", "bf16_channels_last", "bf16_compile", "bf16_zero2", "bf16_loader"}
    for name, case in r["cases"].items():
        for key in ("step_s", "step_s_min", "volumes_per_s"):
            assert math.isfinite(case[key]) and case[key] > 0, (name, key, case[key])
        assert case["timed_steps"] >= 2 and case["warmup_steps"] >= 1
        assert math.isfinite(case["loss_last"])
        assert "gpu_peak_mb" not in case
    assert r["cases"]["bf16_zero2"]["zero_stage"] == 2 and r["cases"]["fp32"]["precision"] == "fp32"
    assert r["cases"]["bf16_compile"]["compile"] == "eager"
    assert 0 <= r["cases"]["bf16_loader"]["gpu_idle_fraction"] < 1
    assert math.isfinite(r["ratios"]["bf16_over_fp32_speedup"]) and r["ratios"]["bf16_over_fp32_speedup"] > 0
    assert r["skipped"], "the CPU mode must say what it did not measure"
    for item in r["skipped"]:
        assert item["what"] and len(item["why"]) > 10, item
    text = json.dumps(r["skipped"])
    assert "113x137x113" in text and "GPU memory" in text and "inductor" in text
