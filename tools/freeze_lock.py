"""Write requirements/lock.txt from the environment this interpreter runs in.

Every installed distribution except the project itself is pinned exactly, so that
tools/setup_env.sh reproduces this environment on any machine. Run it only after a deliberate
refresh (requirements/README.md); tests/test_environment_lock.py fails when an environment
drifts from the lock.

    .venv/bin/python tools/freeze_lock.py [--out requirements/lock.txt]
"""
from __future__ import annotations

import argparse
import platform
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name

PROJECT = 'hmait'
HEADER = """\
# The exact environment tools/setup_env.sh builds: every package, transitive ones included.
# Resolved on CPython {python} ({machine}) within requirements/bounds.txt; written by
# tools/freeze_lock.py. Refresh it only on purpose, as requirements/README.md describes.
"""


def installed_pins() -> dict[str, str]:
    """Canonical name -> version of every distribution in this environment's site-packages, except
    the project (not everything on sys.path: setuptools adds its vendored packages there)."""
    pins = {}
    site_packages = sorted({sysconfig.get_paths()['purelib'], sysconfig.get_paths()['platlib']})
    for dist in metadata.distributions(path=site_packages):
        name = dist.metadata['Name']
        if name is None:  # a broken leftover directory in site-packages
            continue
        name = canonicalize_name(name)
        if name != PROJECT:
            pins[name] = dist.version
    return pins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, default=Path(__file__).resolve().parents[1] / 'requirements' / 'lock.txt',
                        help='where to write the lock (default: requirements/lock.txt)')
    args = parser.parse_args()
    pins = installed_pins()
    lines = [HEADER.format(python=platform.python_version(), machine=f'{sys.platform} {platform.machine()}')]
    lines += [f'{name}=={pins[name]}\n' for name in sorted(pins)]
    args.out.write_text(''.join(lines))
    print(f'wrote {len(pins)} pins to {args.out}')


if __name__ == '__main__':
    main()
