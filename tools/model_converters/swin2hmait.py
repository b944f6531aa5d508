"""Convert a Swin checkpoint (Microsoft, mmdet or timm layout) into an H-MaiT checkpoint.

    python tools/model_converters/swin2hmait.py SRC DST [--arch tiny]
    python tools/model_converters/swin2hmait.py SRC --out DST.safetensors

SRC may be a .pth or a .safetensors file. A DST ending in .safetensors is written in that format
(tensors only, no pickled code: the safe format to share); any other name gets mmengine's
``{'state_dict', 'meta'}`` layout through ``torch.save``.

Prints the keys that matched an H-MaiT parameter, the window-attention keys that were dropped,
and the H-MaiT parameters the file does not provide.
"""
from __future__ import annotations

import argparse
import os
import sys

from hmait.models import HMaiTClassifier, convert_swin_state_dict
from hmait.models.checkpoint import extract_state_dict, safe_load, save_weights, swin_layout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='Swin checkpoint (.pth or .safetensors)')
    parser.add_argument('dst', nargs='?', help='where to write the H-MaiT checkpoint (.pth or .safetensors)')
    parser.add_argument('--out', help='the same as DST')
    parser.add_argument('--arch', default='tiny', choices=['tiny', 'small', 'base'],
                        help='H-MaiT preset to check the keys against (default: tiny)')
    args = parser.parse_args(argv)
    if (args.dst is None) == (args.out is None):
        parser.error('give the output file once, as DST or as --out')
    dst = args.dst or args.out

    try:
        state_dict = extract_state_dict(safe_load(args.src))
    except (OSError, RuntimeError, ValueError) as err:
        parser.error(str(err))
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
    save_weights(converted, dst, metadata={'converted_from': os.path.basename(args.src), 'swin_layout': layout})
    print(f'wrote {dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
