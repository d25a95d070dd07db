"""benchmarks/gpu_check.sh as it will run on the air-gapped GPU machine, rehearsed on the CPU: every step runs and is
listed in summary.json whatever the others did, limits and the budget hold, PYTHON falls back to python3; and
benchmarks/wheel_deps.py, which keeps torch out of the wheelhouse and checks the wheels' requirements.

The step commands are replaced by a stand-in interpreter (a bash script in front of the real one) where a test needs
a step to fail, hang or print figures: what is tested is the script's bookkeeping, not the benchmarks.
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
SPEC = importlib.util.spec_from_file_location("wheel_deps", ROOT / "benchmarks" / "wheel_deps.py")
wheel_deps = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(wheel_deps)

STEPS = ["install", "env", "compat", "tests", "ragged", "kernels", "3b"]
# a stand-in interpreter: pytest passes with a skip, ragged_check fails, bench_kernels hangs and warns, bench_3b
# prints a figure row; anything else (the env and compat steps) goes to the real Python
FAKE_PYTHON = f"""#!/usr/bin/env bash
case "$*" in
  *"-m pytest"*) echo "SKIPPED [1] tests/test_kernels.py:9: needs two GPUs"; echo "3 passed, 1 skipped in 0.1s" ;;
  *ragged_check.py*) echo "| forward | 1e-1 | 0.02 | FAIL | 0.1 | |"; echo "ragged check: FAIL (forward)"; exit 3 ;;
  *bench_kernels.py*) echo "UserWarning: zipr1_kernels: the Triton prefill kernel failed (OutOfResources: shared memory)"
                      sleep 60 ;;
  *bench_3b.py*) echo "| 32768 | 0.91 (bisection to τ≈0.25) | 0.249 | 1.0 | 9.0 | 9.0x |" ;;
  *) exec {sys.executable} "$@" ;;
esac
"""


def run_check(tmp_path, *args, python=None, env=None, **kw):
    env = {**os.environ, **(env or {}), "PYTHON": str(python or sys.executable)}
    env.pop("GPU_CHECK_LIMITS", None)
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", "--log-dir", str(tmp_path / "logs"), *args], env=env,
                          capture_output=True, text=True, timeout=240, **kw)


def summary(tmp_path) -> dict:
    data = json.loads((tmp_path / "logs" / "summary.json").read_text())
    assert [s["name"] for s in data["steps"]] == STEPS
    return {s["name"]: s for s in data["steps"]} | {"_": data}


def fake_python(tmp_path) -> Path:
    path = tmp_path / "fakepython"
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    return path


def test_every_step_runs_after_a_failure_and_a_timeout_and_summary_json_lists_them(tmp_path):
    done = run_check(tmp_path, "--limit", "kernels=3", python=fake_python(tmp_path))
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    steps = summary(tmp_path)
    assert steps["_"]["done"] is True
    assert steps["install"]["result"] == "SKIPPED (no --install-from)"
    assert steps["env"]["result"] == "PASS" and steps["compat"]["result"] == "PASS"
    assert any("checkpointing via" in line for line in steps["compat"]["figures"])
    assert steps["tests"]["result"] == "PASS" and steps["tests"]["figures"] == ["3 passed, 1 skipped in 0.1s"]
    assert steps["tests"]["skipped_tests"] == ["SKIPPED [1] tests/test_kernels.py:9: needs two GPUs"]
    assert steps["ragged"]["result"] == "FAIL (rc 3)" and steps["ragged"]["rc"] == 3
    assert "ragged check: FAIL (forward)" in steps["ragged"]["figures"]
    assert steps["kernels"]["result"] == "TIMEOUT after 3 s" and steps["kernels"]["limit_s"] == 3
    assert 3 <= steps["kernels"]["seconds"] <= 10
    assert steps["kernels"]["fallback_warnings"] == [
        "zipr1_kernels: the Triton prefill kernel failed (OutOfResources: shared memory"]
    assert steps["3b"]["result"] == "PASS" and steps["3b"]["figures"][0].startswith("| 32768 | 0.91")
    for name in STEPS[1:]:
        assert (tmp_path / "logs" / f"{name}.log").is_file()
    table = done.stdout[done.stdout.index("==== gpu_check summary"):]
    assert "| kernels | TIMEOUT after 3 s | " in table and "| ragged | FAIL (rc 3) | " in table
    assert "kernels: FALLBACK: zipr1_kernels: the Triton prefill kernel failed" in table
    assert "tests: SKIPPED [1] tests/test_kernels.py:9: needs two GPUs" in table
    assert "NOT all steps passed" in table


def test_summary_json_holds_the_finished_steps_when_the_run_is_cut_off(tmp_path):
    """Killed mid-step (the device's 10-minute limit): what ran before is already on disk."""
    env = {**os.environ, "PYTHON": str(fake_python(tmp_path))}
    proc = subprocess.Popen(["bash", str(SCRIPT), "--dry-run", "--log-dir", str(tmp_path / "logs"), "--steps",
                             "tests,ragged,kernels,3b"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            path = tmp_path / "logs" / "summary.json"
            if path.exists() and '"RUNNING"' in path.read_text() and "kernels" in path.read_text():
                if summary(tmp_path)["kernels"]["result"] == "RUNNING":
                    break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    steps = summary(tmp_path)
    assert steps["_"]["done"] is False
    assert steps["tests"]["result"] == "PASS" and steps["ragged"]["result"] == "FAIL (rc 3)"
    assert steps["kernels"]["result"] == "RUNNING" and steps["3b"]["result"] == "PENDING"
    assert steps["env"]["result"] == "SKIPPED (not asked for)"


def test_python_defaults_to_python3_when_python_is_missing(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(os.path.realpath(sys.executable))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "GPU_CHECK_LIMITS")}
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"
    assert subprocess.run(["bash", "-c", "command -v python"], env=env, capture_output=True).returncode == 1
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--log-dir", str(tmp_path / "logs"), "--steps", "env"],
                          env=env, capture_output=True, text=True, timeout=120)
    steps = summary(tmp_path)
    assert steps["_"]["python"] == str(bin_dir / "python3")
    assert steps["env"]["result"] == "PASS", done.stdout[-2000:]
    assert done.returncode == 0  # only the steps asked for count


def test_a_spent_budget_skips_the_remaining_steps_and_fails(tmp_path):
    done = run_check(tmp_path, "--budget", "5")
    steps = summary(tmp_path)
    assert done.returncode == 1
    assert all(steps[s]["result"] == "SKIPPED (budget of 5 s spent)" for s in STEPS[1:])


@pytest.mark.parametrize("args, words", [
    (["--limit", "kernel=5"], "bad limit 'kernel=5'"),
    (["--limit", "kernels=0"], "bad limit 'kernels=0'"),
    (["--budget", "9m"], "bad --budget '9m'"),
    (["--install-from", "EMPTY"], "no .whl files there"),
    (["--frobnicate"], "usage: bash benchmarks/gpu_check.sh"),
    (["--log-dir"], "usage: bash benchmarks/gpu_check.sh"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, args, words):
    (tmp_path / "empty").mkdir()
    args = [str(tmp_path / "empty") if a == "EMPTY" else a for a in args]
    done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 2 and words in done.stderr and len(done.stderr.strip().splitlines()) == 1


def make_wheel(folder: Path, name: str, version: str, requires=(), tag="py3-none-any") -> Path:
    path = folder / f"{name}-{version}-{tag}.whl"
    meta = "Metadata-Version: 2.1\nName: {}\nVersion: {}\n".format(name, version)
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return path


def test_the_wheelhouse_check_refuses_torch_and_unmet_requirements(tmp_path):
    make_wheel(tmp_path, "datasets", "5.2.0", ["dill<0.4.2,>=0.3.0", "multiprocess<0.70.20", "pyarrow>=24",
                                               "fsspec[http]<=2026.9.0", "pytest; extra == 'tests'",
                                               "tomli; python_version < '3.11'"])
    make_wheel(tmp_path, "dill", "0.4.1")
    make_wheel(tmp_path, "multiprocess", "0.70.19", ["dill>=0.4.1"], tag="py312-none-any")
    assert wheel_deps.closure(tmp_path, "3.12") == []  # pyarrow, fsspec: preinstalled; extras/markers skipped
    assert wheel_deps.closure(tmp_path, "3.10") == ["datasets needs tomli; python_version < \"3.11\": "
                                                    "neither a wheel here nor preinstalled"]
    make_wheel(tmp_path, "torch", "2.13.0", ["nvidia-cublas"], tag="cp312-cp312-manylinux_2_28_x86_64")
    make_wheel(tmp_path, "transformers", "5.23.0", ["tokenizers<0.24.0,>=0.23.1", "huggingface-hub>=3"])
    assert wheel_deps.closure(tmp_path, "3.12") == [
        "torch-2.13.0-cp312-cp312-manylinux_2_28_x86_64.whl: the GPU machine's own torch must not be replaced",
        "transformers needs huggingface-hub>=3: preinstalled 1.33.0"]
    make_wheel(tmp_path, "dill", "0.3.9")
    with pytest.raises(SystemExit, match="two wheels of dill"):
        wheel_deps.closure(tmp_path, "3.12")


def test_installed_checks_the_running_interpreters_versions(tmp_path):
    import numpy
    make_wheel(tmp_path, "a", "1", [f"numpy=={numpy.__version__}", "pytest"])
    assert wheel_deps.installed(tmp_path) == []
    make_wheel(tmp_path, "b", "1", ["numpy<1", "no-such-package-zipr1"])
    assert wheel_deps.installed(tmp_path) == [f"b needs numpy<1: found {numpy.__version__}",
                                              "b needs no-such-package-zipr1: not installed"]
