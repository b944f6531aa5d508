"""The installed environment is exactly requirements/lock.txt, and the lock respects its bounds.

A machine whose environment drifted from the lock (a manual pip install, an old .venv, a lock
changed without re-running the set-up) fails here on its next run, naming each package and
both versions, instead of surprising a new user with a different stack.
"""
from __future__ import annotations

import re
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / 'requirements' / 'lock.txt'
BOUNDS = REPO / 'requirements' / 'bounds.txt'
# What tools/setup_env.sh releases from the lock when torch is overridden (HMAIT_TORCH...).
TORCH_FAMILY = re.compile(r'^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)$')


def _requirement_lines(path: Path) -> list[str]:
    lines = (line.split('#', 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def _lock() -> dict[str, str]:
    pins = {}
    for line in _requirement_lines(LOCK):
        match = re.fullmatch(r'([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)', line)
        assert match, f'{LOCK.name}: {line!r} is not an exact pin "name==version"'
        name = canonicalize_name(match[1])
        assert name not in pins, f'{LOCK.name}: {name} is pinned twice'
        pins[name] = match[2]
    return pins


def _installed() -> dict[str, str]:
    """What the environment's site-packages holds. Not everything on sys.path: setuptools puts its
    own vendored copies (packaging, wheel, ...) on sys.path once something imports it."""
    found = {}
    site_packages = sorted({sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']})
    for dist in metadata.distributions(path=site_packages):
        if dist.metadata['Name'] is not None:
            found[canonicalize_name(dist.metadata['Name'])] = dist.version
    found.pop('hmait', None)
    return found


def _released() -> set[str]:
    """Packages the set-up of this environment took from a torch override instead of the lock."""
    path = Path(sys.prefix) / '.hmait-lock-released'
    return {line.strip() for line in path.read_text().splitlines() if line.strip()} if path.exists() else set()


def test_installed_environment_matches_the_lock():
    # Once imported (mmengine imports it), setuptools adds its vendored packages to sys.path;
    # they are not installed packages and must not count as drift.
    import setuptools  # noqa: F401
    lock, installed, released = _lock(), _installed(), _released()
    assert all(TORCH_FAMILY.match(name) for name in released), \
        f'only torch-family packages may be released from the lock, got {sorted(released)}'
    problems = []
    for name in sorted(set(lock) | set(installed)):
        if name in released:
            continue
        have, want = installed.get(name), lock.get(name)
        if have is None:
            problems.append(f'{name}: locked {want}, not installed')
        elif want is None:
            problems.append(f'{name}: installed {have}, not in requirements/lock.txt')
        elif have != want:
            problems.append(f'{name}: installed {have}, locked {want}')
    assert not problems, ('the environment differs from requirements/lock.txt (re-run `make setup`, or refresh the '
                          'lock as requirements/README.md says):\n  ' + '\n  '.join(problems))


def test_lock_satisfies_its_bounds_and_keeps_pkg_resources():
    lock = _lock()
    for line in _requirement_lines(BOUNDS):
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in lock, f'{BOUNDS.name} bounds {name}, which the lock does not pin'
        assert requirement.specifier.contains(lock[name], prereleases=True), \
            f'lock pins {name}=={lock[name]}, outside {BOUNDS.name}\'s {requirement.specifier}'
    # mmcv 2.1.0's setup.py and mmengine import pkg_resources, which setuptools 82 removed.
    assert int(lock['setuptools'].split('.')[0]) < 82
    for name in ('torch', 'torchvision', 'mmcv', 'mmengine', 'mmdet', 'mmsegmentation', 'timm', 'pip', 'wheel'):
        assert name in lock, f'the lock does not pin {name}'
