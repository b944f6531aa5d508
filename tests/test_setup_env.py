"""tools/setup_env.sh fails fast, with what is missing and how to fix it, on an unfit machine.

Each case runs the script from a scratch copy of the repository (no .venv), so nothing here
touches the project's environment.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _scratch_repo(tmp_path: Path) -> Path:
    repo = tmp_path / 'repo'
    (repo / 'tools').mkdir(parents=True)
    shutil.copy(REPO / 'tools' / 'setup_env.sh', repo / 'tools' / 'setup_env.sh')
    shutil.copy(REPO / 'setup.cfg', repo / 'setup.cfg')
    return repo


def _run(repo: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(['bash', str(repo / 'tools' / 'setup_env.sh')], env=env, capture_output=True, text=True,
                          timeout=300)


def _fake_python(tmp_path: Path, version: str) -> Path:
    """An interpreter that reports ``version`` when asked (``-c``) and fails any script read from stdin."""
    fake = tmp_path / 'python-old'
    fake.write_text(f'#!/bin/sh\nif [ "$1" = "-c" ]; then echo {version}; exit 0; fi\nexit 1\n')
    fake.chmod(0o755)
    return fake


def test_too_old_python_is_refused(tmp_path):
    repo = _scratch_repo(tmp_path)
    result = _run(repo, {**os.environ, 'HMAIT_PYTHON': str(_fake_python(tmp_path, '3.8.10'))})
    assert result.returncode != 0
    assert 'Python 3.8.10 is not supported; need 3.10, 3.11 or 3.12' in result.stderr
    assert not (repo / '.venv').exists()


def test_missing_interpreter_is_named(tmp_path):
    repo = _scratch_repo(tmp_path)
    result = _run(repo, {**os.environ, 'HMAIT_PYTHON': 'python-that-does-not-exist'})
    assert result.returncode != 0
    assert "no Python interpreter 'python-that-does-not-exist' found" in result.stderr


def test_missing_compiler_is_reported(tmp_path):
    repo = _scratch_repo(tmp_path)
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for tool in ('bash', 'cat', 'sha256sum', 'cut', 'dirname', 'mktemp'):
        os.symlink(shutil.which(tool), bin_dir / tool)
    env = {**os.environ, 'PATH': str(bin_dir), 'HMAIT_PYTHON': sys.executable}
    env.pop('CXX', None)
    result = _run(repo, env)
    assert result.returncode != 0
    assert 'no C++ compiler found' in result.stderr and 'apt install g++' in result.stderr


def test_unreachable_registry_is_reported(tmp_path):
    repo = _scratch_repo(tmp_path)
    env = {**os.environ, 'HMAIT_PYTHON': sys.executable, 'PIP_CONFIG_FILE': os.devnull,
           'PIP_INDEX_URL': 'http://127.0.0.1:9/simple', 'PIP_EXTRA_INDEX_URL': '', 'PIP_FIND_LINKS': '',
           'PIP_NO_CACHE_DIR': '1'}
    result = _run(repo, env)
    assert result.returncode != 0
    assert 'cannot reach the Python package registry' in result.stderr
