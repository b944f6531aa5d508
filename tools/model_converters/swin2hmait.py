"""Convert a Swin checkpoint (Microsoft, mmdet or timm layout) into an H-MaiT checkpoint.

    python tools/model_converters/swin2hmait.py SRC DST [--arch tiny]

Prints the keys that matched an H-MaiT parameter, the window-attention keys that were dropped,
and the H-MaiT parameters the file does not provide.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from hmait.models import HMaiTClassifier, convert_swin_state_dict
from hmait.models.checkpoint import extract_state_dict, safe_load, swin_layout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='Swin checkpoint (.pth)')
    parser.add_argument('dst', help='where to write the H-MaiT checkpoint')
    parser.add_argument('--arch', default='tiny', choices=['tiny', 'small', 'base'],
                        help='H-MaiT preset to check the keys against (default: tiny)')
    args = parser.parse_args(argv)

    state_dict = extract_state_dict(safe_load(args.src))
    layout = swin_layout(state_dict)
    if layout is None:
        parser.error(f'{args.src} is not a Swin checkpoint (no relative_position_bias_table keys)')
    converted, dropped = convert_swin_state_dict(state_dict)
    reference = HMaiTClassifier(arch=args.arch, num_classes=converted['head.fc.weight'].shape[0]
                                if 'head.fc.weight' in converted else 0).state_dict()
    matched = [k for k, v in converted.items() if k in reference and reference[k].shape == v.shape]
    unmatched = [k for k in converted if k not in matched]
    missing = [k for k in reference if k not in converted]

    print(f'{args.src}: Swin checkpoint in {layout} layout, {len(state_dict)} tensors')
    print(f'matched ({len(matched)}): every H-MaiT-{args.arch} parameter that the file provides')
    print(f'dropped ({len(dropped)}): window-attention tensors with no H-MaiT counterpart')
    for key in dropped:
        print(f'  {key}')
    print(f'unmatched ({len(unmatched)}): converted keys with no H-MaiT-{args.arch} parameter of that shape')
    for key in unmatched:
        print(f'  {key}')
    print(f'missing ({len(missing)}): H-MaiT parameters left at their initialisation')
    for key in missing:
        print(f'  {key}')
    os.makedirs(os.path.dirname(os.path.abspath(args.dst)), exist_ok=True)
    torch.save({'state_dict': converted, 'meta': {'converted_from': os.path.basename(args.src),
                                                  'swin_layout': layout}}, args.dst)
    print(f'wrote {args.dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
