"""The suite's own rule (conftest.py): under CI=true a skip that is not a documented one fails."""
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_an_undocumented_skip_fails_under_ci(tmp_path):
    shutil.copy(os.path.join(HERE, "conftest.py"), tmp_path)
    (tmp_path / "test_x.py").write_text(
        "import pytest\n"
        "def test_cross_check():\n    pytest.importorskip('no_such_package_for_a_cross_check')\n"
        "def test_documented():\n    pytest.skip('needs libtpu')\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER")}

    def pytest_(ci):
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                              "-rs", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                             env=env | ({"CI": "true"} if ci else {}))
        return res.returncode, res.stdout.strip().splitlines()[-1]

    code, last = pytest_(ci=True)
    assert code == 1 and "1 failed" in last and "1 skipped" in last, last
    code, last = pytest_(ci=False)  # a developer's machine without the package: a visible skip
    assert code == 0 and "2 skipped" in last, last
