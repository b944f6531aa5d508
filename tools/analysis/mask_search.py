#!/usr/bin/env python
"""One step of the quick empirical mask search (MaiT paper section 4.3) from a trained checkpoint.

    python tools/analysis/mask_search.py CONFIG CHECKPOINT --data DIR [--upper 0.65] [--lower 0.35]
                                         [--stage {auto,assign,calibrate}] [--img-size N] [--num-images N]

The checkpoint is a model trained with the current masking (first: one masked head per layer).
'assign' sets each layer from head 0's ALS (> upper: all heads, [lower, upper]: one, < lower: none);
'calibrate' keeps, in fully masked layers, the heads whose ALS >= lower. 'auto' assigns when every
layer has at most one masked head and calibrates otherwise. Prints the new masked-heads-per-layer
list as a config snippet; train that config, then run the next step.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from hmait.analysis import LOWER, STAGES, UPPER, compute_als, search_step  # noqa: E402
from hmait.analysis.tooling import masking_snippet, prepare_or_refuse, short_layer_names  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='classification training config (model = TimmImageClassifier)')
    parser.add_argument('checkpoint', help='checkpoint of that config')
    parser.add_argument('--data', required=True,
                        help='ImageNet-layout folder: <class>/<image> or val/<class>/<image>')
    parser.add_argument('--upper', type=float, default=UPPER, help=f'upper ALS threshold (default {UPPER})')
    parser.add_argument('--lower', type=float, default=LOWER, help=f'lower ALS threshold (default {LOWER})')
    parser.add_argument('--stage', choices=STAGES, default='auto')
    parser.add_argument('--img-size', type=int,
                        help="input size (default: the config's test input size, else the size the model was "
                             'built for)')
    parser.add_argument('--num-images', type=int, default=32)
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--max-map-mb', type=int, default=256)
    parser.add_argument('--json', help='also write the decision (per layer, with reasons) to this JSON file')
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    model, loader, info = prepare_or_refuse('mask_search', args)
    als = compute_als(model, loader, max_map_bytes=args.max_map_mb << 20)
    step = search_step(als, upper=args.upper, lower=args.lower, stage=args.stage)
    for name, before, after, reason in zip(short_layer_names(step.layers), step.before, step.masked_heads,
                                           step.reasons):
        print(f'# layer {name:>6}: {before} -> {after}  ({reason})')
    print(masking_snippet(step, als.mask_modes), end='')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(dict(config=args.config, checkpoint=args.checkpoint, **info, step=step.__dict__,
                           als=als.to_dict()), f, indent=1)


if __name__ == '__main__':
    main()
