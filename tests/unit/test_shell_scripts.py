"""The repo's shell scripts parse.

CI runs `.ci/run` on a clean clone; a syntax error there fails the whole submission before a
single test runs (it happened once: an edit pasted a block into a comment's backticks). `bash -n`
parses without executing, so this costs milliseconds.
"""
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = [ROOT / ".ci" / "run", ROOT / "tests" / "gpu" / "run_on_gpu.sh"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_parses(script):
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash on this machine to parse the script with")
    result = subprocess.run([bash, "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, f"{script} does not parse:\n{result.stderr}"


def test_ci_entry_point_runs_the_readme_test_command():
    text = (ROOT / ".ci" / "run").read_text()
    last = [line for line in text.splitlines() if line.strip() and not line.startswith("#")][-1]
    assert last.strip() == "make test", f"the last command of .ci/run is {last!r}, not `make test`"
    assert "make test" in (ROOT / "README.md").read_text()
