"""The OpenVINO extension that runs the masked heads with the project's CPU kernel.

An ONNX export written with ``hmait.deploy.export_onnx(..., masked_heads='openvino')`` holds one node
``hmait.MaskedAttention`` per masked-head layer instead of the standard-operator 'halo' formulation.
OpenVINO runs those nodes once this extension is loaded into its ``Core``::

    import openvino as ov
    from hmait.ops import openvino_extension
    core = ov.Core()
    openvino_extension.load_into(core)        # builds the library on first use
    compiled = core.compile_model(core.read_model('model.onnx'), 'CPU')

The library is compiled from ``hmait/ops/csrc`` (the torch-free kernel sources that the torch op also
uses, and ``masked_attention_openvino.cpp``) against the headers and libraries of the installed
``openvino`` wheel, with the system's C++ compiler, into ``<extension dir>/openvino-<version>`` (see
:func:`hmait.ops.cpu_kernel.extension_dir`). It is tied to that OpenVINO version and to x86-64 Linux;
the kernel's instruction set (AVX-512, AVX2 or portable) is chosen at run time from the CPU. A file
of its own (:func:`library_path`) can be loaded by a C++ application with ``ov::Core::add_extension``.
Only the library needs openvino at run time, not torch.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .cpu_kernel import KERNEL_HEADERS, KERNEL_SOURCES, extension_dir

__all__ = ['build', 'library_path', 'load_into', 'status']

_CSRC = Path(__file__).resolve().parent / 'csrc'
_SOURCES = ('masked_attention_openvino.cpp', *KERNEL_SOURCES)
_LIBRARY = 'libhmait_openvino.so'
# The kernel's instruction sets are enabled per function in their own sources (see cpu_kernel), so no -march.
_CXXFLAGS = ('-O3', '-std=c++17', '-fPIC', '-ffp-contract=fast', '-fvisibility=hidden')

_lock = threading.Lock()
_status: tuple[bool, str] | None = None


def _openvino_dir() -> Path | None:
    """The installed openvino package's folder, found without importing it."""
    spec = importlib.util.find_spec('openvino')
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _openvino_version(package: Path) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version('openvino')
    except PackageNotFoundError:
        return package.name


def library_path() -> Path:
    """Where the built library is (or would be) for the installed openvino; never builds."""
    package = _openvino_dir()
    version = _openvino_version(package) if package is not None else 'missing'
    return extension_dir() / f'openvino-{version}' / _LIBRARY


def _fingerprint(package: Path, compiler: str) -> str:
    digest = hashlib.sha256()
    for name in (*_SOURCES, *KERNEL_HEADERS):
        digest.update((_CSRC / name).read_bytes())
    digest.update(' '.join((compiler, *_CXXFLAGS, _openvino_version(package), str(package))).encode())
    return digest.hexdigest()[:16]


def _missing_prerequisite(package: Path | None, compiler: str) -> str | None:
    if package is None:
        return "the openvino package is not installed (pip install openvino; 'make setup' installs the locked version)"
    if not sys.platform.startswith('linux'):
        return f'the OpenVINO extension is built on Linux only, not on {sys.platform}'
    if not (package / 'include' / 'openvino' / 'op' / 'op.hpp').is_file():
        return f'the openvino package at {package} has no C++ headers (include/openvino)'
    missing = [name for name in (*_SOURCES, *KERNEL_HEADERS) if not (_CSRC / name).is_file()]
    if missing:
        return f'the extension sources are not installed: {", ".join(missing)} missing from {_CSRC}'
    if shutil.which(compiler) is None:
        return f'no C++ compiler: {compiler!r} was not found (set CXX)'
    return None


def _shared_library(folder: Path, stem: str) -> Path | None:
    found = sorted(folder.glob(f'{stem}.so*'))
    return found[0] if found else None


def _compile(package: Path, compiler: str, out: Path, verbose: bool) -> None:
    libs = package / 'libs'
    link = []
    for stem in ('libopenvino', 'libtbb'):
        library = _shared_library(libs, stem)
        if library is None:
            raise RuntimeError(f'{stem}.so was not found in {libs}')
        link.append(f'-l:{library.name}')
    with tempfile.TemporaryDirectory(dir=out.parent, prefix='.build-') as tmp:
        def compile_one(name: str) -> Path:
            obj = Path(tmp) / (Path(name).stem + '.o')
            command = [compiler, *_CXXFLAGS, f'-I{_CSRC}', f'-I{package / "include"}', '-c', str(_CSRC / name),
                       '-o', str(obj)]
            _run(command, verbose)
            return obj

        workers = max(1, min(len(_SOURCES), int(os.environ.get('MAX_JOBS') or os.cpu_count() or 1)))
        with ThreadPoolExecutor(workers) as pool:
            objects = list(pool.map(compile_one, _SOURCES))
        staged = Path(tmp) / _LIBRARY
        _run([compiler, '-shared', '-o', str(staged), *map(str, objects), f'-L{libs}', *link,
              f'-Wl,-rpath,{libs}'], verbose)
        os.replace(staged, out)  # atomic: another process never loads a half-written library


def _run(command: list[str], verbose: bool) -> None:
    if verbose:
        print(' '.join(command), flush=True)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in (result.stderr or result.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if 'error' in line.lower()] or lines
        raise RuntimeError(f'{Path(command[0]).name} failed: {" | ".join(errors[-6:])[-1500:]}')


def _build(verbose: bool) -> tuple[bool, str]:
    package = _openvino_dir()
    compiler = os.environ.get('CXX', 'c++')
    reason = _missing_prerequisite(package, compiler)
    if reason is not None:
        return False, reason
    out = library_path()
    stamp = out.with_name(out.name + '.stamp')
    fingerprint = _fingerprint(package, compiler)
    if out.is_file() and stamp.is_file() and stamp.read_text() == fingerprint:
        return True, f'built in {out.parent}'
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _compile(package, compiler, out, verbose)
        stamp.write_text(fingerprint)
    except (OSError, RuntimeError) as err:
        return False, f'building the OpenVINO extension failed: {err}'
    return True, f'built in {out.parent}'


def build(verbose: bool = False) -> bool:
    """Build the library if it is missing or stale (safe from several threads); whether it is usable.

    The outcome is remembered for the process; :func:`status` says why it is not usable."""
    global _status
    if _status is None:
        with _lock:
            if _status is None:
                _status = _build(verbose)
    return _status[0]


def status() -> tuple[bool, str]:
    """``(available, reason)``, building on first call."""
    build()
    return _status


def load_into(core) -> Path:
    """Add the extension to an ``openvino.Core`` (building it first if needed); returns the library's path.

    Raises RuntimeError naming the reason when it cannot be built."""
    if not build():
        raise RuntimeError(f'the hmait OpenVINO extension is unavailable: {_status[1]}')
    path = library_path()
    core.add_extension(str(path))
    return path
