"""Every ``python`` and ``sh`` example of the getting-started page and the user guide
runs, page by page, so an example cannot rot.

The convention (docs/contributing.md): a page's blocks run in order in one fresh
directory (a later block may use an earlier one's files), with this checkout's
Python, ``mpirun`` and ``mpitrain`` on PATH and ``$MPITRAIN_ROOT`` the checkout; a
``python`` block whose first line is ``# mpirun -n N python ...`` runs under
``mpiexec -n N``; a ``sh`` block under ``bash -euo pipefail``; a block whose first
line is ``# needs: slurm|ulfm|gpu|cluster (why)`` is left to where that exists.
Illustrations use other info strings (``text``, ``toml``, ``console``...).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, clean_env, limit, mpiexec

DOCS = ROOT / "docs"
PAGES = sorted([DOCS / "getting-started.md", *(DOCS / "guide").glob("*.md")])
FENCE = re.compile(r"^(```+)(python|sh)[ \t]*\n(.*?)^\1[ \t]*$", re.S | re.M)
LAUNCH = re.compile(r"#\s*(?:mpirun|mpiexec)\s+-n\s+(\d+)\s+python")
BLOCK_LIMIT = 150  # seconds for one block (conftest.limit scales it)


def blocks(page: Path):
    """(language, code, line number) of each block to run on ``page``."""
    text = page.read_text()
    for m in FENCE.finditer(text):
        code = m.group(3)
        first = code.lstrip().splitlines()[0] if code.strip() else ""
        if first.startswith("# needs:"):
            continue
        yield m.group(2), code, text[:m.start()].count("\n") + 1


def test_the_pages_have_examples_to_run():
    assert PAGES and all(p.exists() for p in PAGES)
    assert sum(len(list(blocks(p))) for p in PAGES) >= 20


def _command(language: str, code: str, script: Path):
    script.write_text(code)
    if language == "sh":
        return ["bash", "-euo", "pipefail", str(script)]
    launch = LAUNCH.match(code.lstrip().splitlines()[0]) if code.strip() else None
    if launch:
        return [mpiexec(), "-n", launch.group(1), sys.executable, str(script)]
    return [sys.executable, str(script)]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(DOCS)))
def test_every_example_of_the_page_runs(page, tmp_path):
    env = clean_env(MPITRAIN_ROOT=str(ROOT), MPITRAIN_CACHE=str(tmp_path / ".cache"))
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    work = tmp_path / "work"
    work.mkdir()
    for k, (language, code, line) in enumerate(blocks(page)):
        cmd = _command(language, code, tmp_path / f"block{k}.{'py' if language == 'python' else 'sh'}")
        bound = limit(BLOCK_LIMIT)
        try:
            done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True,
                                  timeout=bound)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"{page.name}:{line}: the {language} block did not finish in "
                        f"{bound:.0f} s\nstdout: {exc.stdout}\nstderr: {exc.stderr}")
        assert done.returncode == 0, (f"{page.name}:{line}: the {language} block exited "
                                      f"{done.returncode}\n{code}\nstdout: {done.stdout[-3000:]}"
                                      f"\nstderr: {done.stderr[-3000:]}")
