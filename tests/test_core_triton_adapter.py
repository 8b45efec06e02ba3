"""The optional Triton inference kernel (serial_lora_core/triton_adapter.py), checked on CPU.

The arithmetic runs through Triton's interpreter in a subprocess (tests/triton_interpret_checks.py);
the CUDA run of the same kernel, in bfloat16 too, is tests/test_gpu_triton_adapter.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from triton_interpret_checks import KERNEL_CASES, VARIANTS

TESTS = Path(__file__).parent


def subprocess_env(interpret: bool) -> dict[str, str]:
    """This environment with tests/ and the repository importable, Triton's interpreter on or off."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent)])
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


@pytest.fixture(scope="module")
def interpreted() -> dict:
    env = subprocess_env(interpret=True)
    result = subprocess.run([sys.executable, str(TESTS / "triton_interpret_checks.py")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("path", sorted(VARIANTS))
@pytest.mark.parametrize("case", sorted(KERNEL_CASES))
def test_kernel_matches_the_formula(interpreted, case, path):
    result = interpreted["kernel"][f"{case}-{path}"]
    assert result["dtype"] == "torch.float16" and result["shape_kept"]
    assert result["error"] < 2e-3


@pytest.mark.parametrize("host", ["fused", "split", "joint"])
def test_inference_through_the_kernel_matches_the_pytorch_path(interpreted, host):
    result = interpreted["models"][host]
    assert result["kernel_calls"] == result["expected_calls"] > 0  # once per stream, shared by q, k, v
    assert result["error"] < 6e-3
    assert result["calls_with_use_triton_off"] == 0
    assert result["calls_with_autograd"] == 0  # training keeps the autograd path


@pytest.mark.parametrize("case", ["dropout_in_training_mode", "float32_no_autocast", "below_min_elements"])
def test_kernel_is_not_used_where_it_does_not_apply(interpreted, case):
    assert interpreted["models"][case]["kernel_calls"] == 0


def test_cpu_inference_never_imports_triton():
    script = (
        "import sys, json, torch\n"
        "from core_models import HOSTS, randomize_adapters\n"
        "from serial_lora_core import SerialLoraConfig, inject_serial_lora\n"
        "model = HOSTS['fused'].model()\n"
        "inject_serial_lora(model, SerialLoraConfig(rank=4)); randomize_adapters(model)\n"
        "with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):\n"
        "    model(*HOSTS['fused'].inputs())\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'triton' or 'triton_adapter' in m)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=subprocess_env(interpret=False), capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == []


@pytest.mark.parametrize(
    ("x", "down", "up", "dtype", "error", "words"),
    [
        (torch.zeros(2, 8), torch.zeros(4, 8), torch.zeros(8, 4), torch.float32, TypeError, "float16 or bfloat16"),
        (torch.zeros(2, 8), torch.zeros(4, 6), torch.zeros(8, 4), torch.float16, ValueError, "(4, 6)"),
        (torch.zeros(2, 8), torch.zeros(4, 8), torch.zeros(8, 3), torch.float16, ValueError, "(8, 3)"),
        (torch.zeros(8, 2).t(), torch.zeros(4, 8), torch.zeros(8, 4), torch.float16, ValueError, "contiguous"),
    ],
    ids=["float32", "down_shape", "up_shape", "non_contiguous"],
)
def test_kernel_rejects_bad_arguments(x, down, up, dtype, error, words):
    from serial_lora_core import triton_adapter

    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        triton_adapter.adapted_input(x, down, up, 1.0, dtype)


# ------------------------------------------------------------------------------------- tuned launch table
BEST = {"block_m": 16, "block_d": 128, "num_warps": 8, "programs_per_sm": 0, "num_stages": 3, "stage_in_y": 1}


def test_launch_parameters_come_from_the_packaged_table():
    from serial_lora_core import triton_adapter

    table = Path(triton_adapter.__file__).with_name(triton_adapter.TUNED_FILE)
    assert triton_adapter.LAUNCH == json.loads(table.read_text())


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ({k: v for k, v in BEST.items() if k != "num_warps"}, "exactly the keys"),
        ({**BEST, "extra": 1}, "exactly the keys"),
        ({**BEST, "block_m": 16.5}, "non-negative integers"),
        ({**BEST, "stage_in_y": True}, "non-negative integers"),
        ({**BEST, "num_stages": -1}, "non-negative integers"),
        ([1, 2], "JSON object"),
    ],
    ids=["missing_key", "extra_key", "float", "bool", "negative", "not_an_object"],
)
def test_a_bad_launch_table_is_refused(table, words):
    from serial_lora_core import triton_adapter

    with pytest.raises(ValueError, match=words) as error:
        triton_adapter.load_launch_parameters(json.dumps(table), "somewhere/triton_tuned.json")
    assert "somewhere/triton_tuned.json" in str(error.value) and "apply_tuned.py" in str(error.value)


@pytest.fixture
def apply_tuned(tmp_path, monkeypatch):
    """benchmarks/apply_tuned.py, writing its table into tmp_path instead of the package."""
    spec = importlib.util.spec_from_file_location("apply_tuned", TESTS.parent / "benchmarks" / "apply_tuned.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "TABLE", tmp_path / "triton_tuned.json")
    return module


@pytest.mark.parametrize("best", [BEST, {**BEST, "block_d": "256"}], ids=["valid", "string_value"])
def test_apply_tuned_writes_the_data_table_and_only_a_valid_one(apply_tuned, best, tmp_path, monkeypatch):
    from serial_lora_core import triton_adapter

    results = tmp_path / "triton_tune.json"
    results.write_text(json.dumps({"overall_best": best, "ranking": []}))
    monkeypatch.setattr(sys, "argv", ["apply_tuned.py", str(results)])
    if best is BEST:
        apply_tuned.main()
        assert triton_adapter.load_launch_parameters(apply_tuned.TABLE.read_text(), "written") == BEST
    else:
        with pytest.raises(SystemExit, match="non-negative integers"):
            apply_tuned.main()
        assert not apply_tuned.TABLE.exists()
