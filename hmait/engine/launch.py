"""What ``tools/train.py`` and ``tools/test.py`` do: argument parsing, config preparation, Runner.

One entry point serves classification, detection and segmentation configs: the config's
``default_scope`` picks the registries, and detection/segmentation configs pull in mmdet/mmseg
through ``custom_imports``, so nothing here imports them. Both entry points switch mmengine's
local checkpoint loading to weights-only (:func:`install_weights_only_loading`) before the config
is read, so resuming, ``load_from`` and ``init_cfg`` weights can never run pickled code.
"""
from __future__ import annotations

import argparse
import datetime
import logging
import os
import os.path as osp
import subprocess
import sys
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from mmengine.config import Config, ConfigDict, DictAction
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from ..builder import read_config, refuse_misfit, weights_fit
from .checkpoint import ATOMIC_BACKEND, find_resume_checkpoint, install_weights_only_loading

LAUNCHERS = ('none', 'pytorch', 'slurm')


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--work-dir', help='folder for logs and checkpoints (default: ./work_dirs/<config name>)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                        help='override config entries, e.g. train_cfg.max_epochs=2 model.num_classes=10')
    parser.add_argument('--launcher', choices=LAUNCHERS, default='none',
                        help="'pytorch' under torchrun (tools/dist_train.sh), 'slurm' under srun")
    # torch.distributed.launch passes --local-rank; torchrun sets LOCAL_RANK instead.
    parser.add_argument('--local-rank', '--local_rank', type=int, default=0, help=argparse.SUPPRESS)


def parse_train_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Train a model with an mmengine config (classification, '
                                                 'detection or segmentation).')
    parser.add_argument('config', help='config file')
    parser.add_argument('--resume', nargs='?', const='auto', metavar='CHECKPOINT',
                        help='resume training: from CHECKPOINT, or without a value from the latest checkpoint '
                             'in the work dir')
    parser.add_argument('--amp', action='store_true', help='automatic mixed precision (needs a GPU)')
    parser.add_argument('--auto-scale-lr', action='store_true',
                        help='scale the learning rate linearly with the total batch size (auto_scale_lr)')
    parser.add_argument('--tensorboard', action='store_true',
                        help="also log scalars for TensorBoard (mmengine's TensorboardVisBackend) under "
                             '<work dir>/<timestamp>/vis_data')
    _add_common(parser)
    return parser.parse_args(argv)


def parse_test_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description='Evaluate a checkpoint with an mmengine config.')
    parser.add_argument('config', help='config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--partial-load', action='store_true',
                        help='evaluate even when only part of the checkpoint fits the model (the rest keeps its '
                             'initialisation); without it, a checkpoint that does not fit exactly is refused')
    _add_common(parser)
    return parser.parse_args(argv)


def _slurm_env() -> None:
    """RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from srun's variables."""
    missing = [v for v in ('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_LOCALID', 'SLURM_NODELIST') if v not in os.environ]
    if missing:
        raise RuntimeError(f'--launcher slurm needs to run under srun; missing environment variables: {missing}')
    os.environ.setdefault('RANK', os.environ['SLURM_PROCID'])
    os.environ.setdefault('WORLD_SIZE', os.environ['SLURM_NTASKS'])
    os.environ.setdefault('LOCAL_RANK', os.environ['SLURM_LOCALID'])
    os.environ.setdefault('MASTER_PORT', '29500')
    if 'MASTER_ADDR' not in os.environ:
        hosts = subprocess.run(['scontrol', 'show', 'hostnames', os.environ['SLURM_NODELIST']], check=True,
                               capture_output=True, text=True).stdout.split()
        os.environ['MASTER_ADDR'] = hosts[0]


def _replace_sync_bn(node) -> int:
    """Replace ``type='SyncBN'`` norm configs by ``'BN'`` in place; returns how many were replaced."""
    count = 0
    if isinstance(node, dict):
        if node.get('type') in ('SyncBN', 'MMSyncBN'):
            node['type'] = 'BN'
            count += 1
        for value in node.values():
            count += _replace_sync_bn(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            count += _replace_sync_bn(value)
    return count


def _dist_timeout(dist_cfg: dict) -> datetime.timedelta | None:
    """``env_cfg.dist_cfg.timeout`` in seconds, read as mmengine's ``init_dist`` reads it (None: torch's default).

    A collective that waits longer than this for another process (one that died, or hangs) raises
    in every process still waiting, so a broken run stops instead of hanging.
    """
    timeout = dist_cfg.get('timeout')
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < float('inf'):
        raise ValueError(f'env_cfg.dist_cfg.timeout must be a positive number of seconds, got {timeout!r}')
    return datetime.timedelta(seconds=timeout)


def prepare_cpu(cfg: Config, launcher: str) -> None:
    """Adapt a config to a machine without CUDA: BN for SyncBN; gloo and CPU DDP when distributed.

    mmengine's distributed set-up assumes CUDA (it calls ``torch.cuda.set_device``). Creating the
    gloo process group first makes the Runner skip it; DDP needs ``device_ids=None`` for CPU modules.
    """
    if torch.cuda.is_available():
        return
    if 'model' in cfg and _replace_sync_bn(cfg.model):
        print_log('no CUDA device: SyncBN layers in the model config replaced by BN', logger='current')
    if launcher == 'none':
        return
    if launcher == 'slurm':
        _slurm_env()
    missing = [v for v in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT') if v not in os.environ]
    if missing:
        raise RuntimeError(f'--launcher {launcher} needs the torch.distributed environment variables {missing}; '
                           'start with torchrun (tools/dist_train.sh) or srun (tools/slurm_train.sh)')
    cfg.setdefault('env_cfg', ConfigDict())
    cfg.env_cfg.setdefault('dist_cfg', ConfigDict())
    if not dist.is_initialized():
        dist.init_process_group('gloo', timeout=_dist_timeout(cfg.env_cfg.dist_cfg))
    cfg.env_cfg.dist_cfg.backend = 'gloo'
    wrapper = cfg.get('model_wrapper_cfg') or ConfigDict(type='MMDistributedDataParallel')
    wrapper.device_ids = None
    cfg.model_wrapper_cfg = wrapper


def prepare_config(config: str, cfg_options: dict | None, work_dir: str | None, launcher: str) -> Config:
    """The config of a run: read (:func:`hmait.builder.read_config`), options merged, work dir, launcher,
    crash-safe checkpoint writes and CPU threads set."""
    cfg = read_config(config, cfg_options)
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('./work_dirs', osp.splitext(osp.basename(config))[0])
    # Crash-safe checkpoint writes unless the config chose a storage backend itself.
    checkpoint_hook = cfg.get('default_hooks', {}).get('checkpoint')
    if checkpoint_hook is not None and not checkpoint_hook.get('backend_args'):
        checkpoint_hook.backend_args = dict(backend=ATOMIC_BACKEND)
    prepare_cpu(cfg, launcher)
    threads = cfg.get('cpu_threads')
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f'cpu_threads must be a positive integer (torch intra-op threads), got {threads!r}')
        # On a few shared cores, OpenMP threads that wait for each other (and for the data workers)
        # cost far more CPU time than they save: the 2-core demo runs several times faster with 1.
        torch.set_num_threads(threads)
    return cfg


def enable_tensorboard(cfg: Config) -> None:
    """Add mmengine's ``TensorboardVisBackend`` to the config's visualizer (once), next to its other backends."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it; fail here, not mid-run)
    except ImportError:
        raise RuntimeError('--tensorboard needs the tensorboard package, which `make setup` installs '
                           '(requirements/lock.txt); this environment lacks it') from None
    visualizer = cfg.get('visualizer') or ConfigDict(type='Visualizer')
    backends = list(visualizer.get('vis_backends') or [ConfigDict(type='LocalVisBackend')])
    if not any(b.get('type') == 'TensorboardVisBackend' for b in backends):
        backends.append(ConfigDict(type='TensorboardVisBackend'))
    visualizer.vis_backends = backends
    cfg.visualizer = visualizer


def _build_runner(cfg: Config) -> Runner:
    return RUNNERS.build(cfg) if 'runner_type' in cfg else Runner.from_cfg(cfg)


def _run(cfg: Config, stage: str, before: Callable[[Runner], None] | None = None):
    """Build the Runner, call ``before(runner)``, run ``stage`` ('train' or 'test'), then tear down the
    process group.

    A process that exits with its process group alive can abort at interpreter shutdown
    (gloo's worker threads outlive Python: "terminate called without an active exception",
    SIGABRT), which turns a finished run into a failed one. So every rank waits for the others
    and destroys the group itself; after an error the group is destroyed without waiting, since
    the other ranks may never arrive.
    """
    finished = False
    try:
        runner = _build_runner(cfg)
        if before is not None:
            before(runner)
        result = getattr(runner, stage)()
        finished = True
        return result
    finally:
        if dist.is_available() and dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def _refuse(tool: str, err: Exception) -> SystemExit:
    """A user error: one line on stderr naming what was wrong, and exit status 2 (as argparse does)."""
    print(f'{tool}: error: {err}', file=sys.stderr)
    return SystemExit(2)


def train(argv: Sequence[str] | None = None) -> None:
    """``tools/train.py``: parse arguments, prepare the config, run ``Runner.train``."""
    args = parse_train_args(argv)
    install_weights_only_loading()
    try:
        cfg = prepare_config(args.config, args.cfg_options, args.work_dir, args.launcher)
        if args.amp:
            if not torch.cuda.is_available():
                raise RuntimeError('--amp needs a CUDA GPU: mmengine\'s AmpOptimWrapper does not run on CPU')
            if cfg.optim_wrapper.get('type', 'OptimWrapper') != 'AmpOptimWrapper':
                cfg.optim_wrapper.type = 'AmpOptimWrapper'
                cfg.optim_wrapper.setdefault('loss_scale', 'dynamic')
        if args.auto_scale_lr:
            if not cfg.get('auto_scale_lr') or 'base_batch_size' not in cfg.auto_scale_lr:
                raise ValueError('--auto-scale-lr needs auto_scale_lr=dict(base_batch_size=N) in the config')
            cfg.auto_scale_lr.enable = True
        if args.tensorboard:
            enable_tensorboard(cfg)
        if args.resume == 'auto':
            latest = find_resume_checkpoint(cfg.work_dir)
            cfg.resume = latest is not None
            cfg.load_from = latest
            if latest is None:
                print_log(f'--resume: no checkpoint in {cfg.work_dir}, starting from scratch', logger='current')
        elif args.resume is not None:
            if not osp.isfile(args.resume):
                raise FileNotFoundError(f'--resume checkpoint not found: {args.resume}')
            cfg.resume = True
            cfg.load_from = args.resume
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        raise _refuse('train', err) from None
    _run(cfg, 'train')


def test(argv: Sequence[str] | None = None) -> dict:
    """``tools/test.py``: evaluate CHECKPOINT on the config's test set; returns the metrics.

    The checkpoint must fit the model exactly (every tensor present, with its shape, and nothing
    else), or the run is refused before any evaluation, naming the first mismatches; a score for
    weights that did not load would be a silent wrong answer. ``--partial-load`` evaluates what fits.
    """
    args = parse_test_args(argv)
    install_weights_only_loading()
    try:
        if not osp.isfile(args.checkpoint):
            raise FileNotFoundError(f'checkpoint {args.checkpoint!r} does not exist')
        cfg = prepare_config(args.config, args.cfg_options, args.work_dir, args.launcher)
    except (ValueError, FileNotFoundError) as err:
        raise _refuse('test', err) from None
    cfg.load_from = args.checkpoint
    cfg.resume = False

    def check_fit(runner: Runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        try:
            _, fit = weights_fit(model, args.checkpoint)
            refuse_misfit(args.checkpoint, model, fit, strict=not args.partial_load,
                          partial_hint='; --partial-load evaluates with only the tensors that fit')
        except (ValueError, FileNotFoundError, RuntimeError) as err:  # RuntimeError: not a plain weights file
            raise _refuse('test', err) from None
        if not fit.exact:
            print_log(f'--partial-load: {len(fit.matched)} tensors of {args.checkpoint} fit the model; '
                      f'{fit.describe()}', logger='current', level=logging.WARNING)

    return _run(cfg, 'test', before=check_fit)
