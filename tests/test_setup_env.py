"""tools/setup_env.sh fails fast, with what is missing and how to fix it, on an unfit machine.

Each case runs the script from a scratch copy of the repository (no .venv), so nothing here
touches the project's environment. The README's shell tools find the project's environment
without an activated venv.
"""
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _scratch_repo(tmp_path: Path) -> Path:
    repo = tmp_path / 'repo'
    for name in ('tools/setup_env.sh', 'setup.cfg', 'requirements/lock.txt'):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, repo / name)
    return repo


def _run(repo: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(['bash', str(repo / 'tools' / 'setup_env.sh'), *args], env=env, capture_output=True,
                          text=True, timeout=300)


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
    for tool in ('bash', 'cat', 'sha256sum', 'cut', 'dirname', 'mktemp', 'sed', 'head'):
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


def test_failed_install_step_names_step_and_package(tmp_path):
    repo = _scratch_repo(tmp_path)
    lock = repo / 'requirements' / 'lock.txt'
    # A build-tool version that does not exist: the first install step must fail, and say so.
    lock.write_text(re.sub(r'(?m)^wheel==.*$', 'wheel==0.0.0.999', lock.read_text()))
    result = _run(repo, {**os.environ, 'HMAIT_PYTHON': sys.executable,
                         'HMAIT_WHEEL_CACHE': str(tmp_path / 'wheels')})
    assert result.returncode != 0
    assert "step '[1/7] installing the build tools" in result.stderr
    assert 'failed while installing pip/setuptools/wheel/ninja' in result.stderr
    assert 'wheel==0.0.0.999' in result.stderr  # pip's own reason, from the end of its output
    assert 'the lock and setup.cfg disagree, or a pin does not exist' in result.stderr  # what to try
    assert 'Traceback' not in result.stdout


def test_core_mode_fails_at_the_same_step_with_its_own_count(tmp_path):
    repo = _scratch_repo(tmp_path)
    lock = repo / 'requirements' / 'lock.txt'
    lock.write_text(re.sub(r'(?m)^wheel==.*$', 'wheel==0.0.0.999', lock.read_text()))
    result = _run(repo, {**os.environ, 'HMAIT_PYTHON': sys.executable}, 'core')
    assert result.returncode != 0
    assert "step '[1/4] installing the build tools" in result.stderr  # the core has 4 steps, the full set-up 7
    assert not (repo / '.venv' / '.hmait-setup-core-stamp').exists()


@pytest.mark.parametrize('args', [('cpu',), ('core', 'full')])
def test_unknown_mode_is_refused_before_anything_is_built(tmp_path, args):
    repo = _scratch_repo(tmp_path)
    result = _run(repo, {**os.environ, 'HMAIT_PYTHON': sys.executable}, *args)
    assert result.returncode != 0
    expected = f"unknown mode '{args[0]}'" if len(args) == 1 else 'too many arguments (core full)'
    assert expected in result.stderr and "'core'" in result.stderr and "'full'" in result.stderr
    assert not (repo / '.venv').exists()


def test_missing_lock_is_reported(tmp_path):
    repo = _scratch_repo(tmp_path)
    (repo / 'requirements' / 'lock.txt').unlink()
    result = _run(repo, {**os.environ, 'HMAIT_PYTHON': sys.executable})
    assert result.returncode != 0
    assert 'lock file' in result.stderr and 'requirements/lock.txt' in result.stderr


def test_dist_train_uses_the_project_environment_without_activation(tmp_path):
    """`bash tools/dist_train.sh ...` from a new shell runs in .venv, not in whatever `python` is on PATH."""
    venv_python = REPO / '.venv' / 'bin' / 'python'
    assert venv_python.exists(), 'run `make setup` first: the README commands assume .venv'
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    # A `python`/`python3` on PATH that cannot run anything, as on a machine where .venv is not activated.
    for name in ('python', 'python3'):
        (bin_dir / name).write_text('#!/bin/sh\necho "not the project environment" >&2\nexit 3\n')
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHON', 'VIRTUAL_ENV', 'PYTHONPATH')}
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    env.update(PATH=f'{bin_dir}:/usr/bin:/bin', PORT=str(port), OMP_NUM_THREADS='1')
    result = subprocess.run(['bash', str(REPO / 'tools' / 'dist_train.sh'), 'configs/hmait_t_demo.py', '1', '--help'],
                            env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'not the project environment' not in result.stderr
    assert '--resume' in result.stdout  # tools/train.py's own help, printed by the rank
