#!/usr/bin/env python
"""Parameters and FLOPs (multiply-accumulates, Swin's convention) of a config's model or a timm model.

    python tools/analysis/get_flops.py CONFIG [--shape H W] [--backbone-only] [--cfg-options K=V ...]
    python tools/analysis/get_flops.py --timm-model hmait_tiny [--shape 224 224]
                                       [--json OUT.json]

Without --shape the input is the config's own test size (the test transform's input_size, or the
test pipeline's Resize scale padded as the data preprocessor pads), or a timm model's default
input size.

Attention is counted analytically (MaiT paper, Table 1): 2 N^2 d per global head, 2 R^2 N d per
masked head; everything else by mmengine's FlopAnalyzer. See hmait/analysis/complexity.py.
"""
import argparse
import json
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from mmengine.config import DictAction  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config', nargs='?', help='mmengine config (mmdet / mmseg / classification)')
    parser.add_argument('--timm-model', help='count a timm model by name instead, e.g. hmait_tiny')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        help="input height and width (default: the config's test size, or the timm model's "
                             'default input size)')
    parser.add_argument('--backbone-only', action='store_true', help='count model.backbone only')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, metavar='KEY=VALUE',
                        help='override config entries')
    parser.add_argument('--json', help='also write the numbers to this JSON file')
    args = parser.parse_args(argv)
    if (args.config is None) == (args.timm_model is None):
        parser.error('give either CONFIG or --timm-model NAME')
    if args.shape and min(args.shape) < 1:
        parser.error(f'--shape must be two positive sizes, got {args.shape}')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from hmait.analysis.complexity import config_test_shape, count_complexity, count_config_complexity, format_count
    from hmait.builder import build_model, read_config

    rows = {}
    try:
        if args.timm_model:
            model = build_model(args.timm_model)
            shape = tuple(args.shape or model.pretrained_cfg['input_size'][-2:])
            rows[args.timm_model] = count_complexity(model, torch.zeros(1, 3, *shape))
            name = args.timm_model
        else:
            cfg = read_config(args.config, args.cfg_options)
            shape = tuple(args.shape or config_test_shape(cfg))
            model_report, backbone_report = count_config_complexity(cfg, shape, backbone_only=args.backbone_only)
            name = Path(args.config).stem
            rows['backbone' if args.backbone_only else 'model'] = model_report
            if backbone_report is not None:
                rows['backbone'] = backbone_report
    except (ValueError, FileNotFoundError) as err:
        print(f'get_flops: error: {err}', file=sys.stderr)
        return 2
    print(f'{name} at input {shape[0]}x{shape[1]} (FLOPs = multiply-accumulates; attention analytic)')
    header = ('part', 'params', 'FLOPs', 'traced', 'attn(traced)', 'attn(analytic)')
    print(f'{header[0]:<10}' + ''.join(f'{h:>15}' for h in header[1:]))
    for part, r in rows.items():
        values = (r.params, r.macs, r.traced_macs, r.attention_traced_macs, r.attention_analytic_macs)
        print(f'{part:<10}' + ''.join(f'{format_count(v):>15}' for v in values))
    if args.json:
        record = dict(name=name, shape=list(shape), command=' '.join(sys.argv), torch=torch.__version__,
                      machine=platform.machine(), processor=platform.processor() or platform.machine(),
                      **{part: r.as_dict() for part, r in rows.items()})
        Path(args.json).write_text(json.dumps(record, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
