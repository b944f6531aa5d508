"""Convert a Swin checkpoint (Microsoft, mmdet or timm layout) into an H-MaiT checkpoint.

    python tools/model_converters/swin2hmait.py SRC DST [--arch tiny] [--allow-partial]
    python tools/model_converters/swin2hmait.py SRC --out DST.safetensors

SRC may be a .pth or a .safetensors file. A DST ending in .safetensors is written in that format
(tensors only, no pickled code: the safe format to share); any other name gets mmengine's
``{'state_dict', 'meta'}`` layout through ``torch.save``.

The converted tensors must fit the H-MaiT preset ``--arch`` exactly; otherwise the tool names the
first mismatches (and the preset that fits, if one does) and exits with status 2, unless
``--allow-partial`` is given. Prints the keys that matched an H-MaiT parameter, the window-attention
keys that were dropped, and the H-MaiT parameters the file does not provide.
"""
from __future__ import annotations

import argparse
import os
import sys

from hmait.models import HMaiTClassifier, convert_swin_state_dict
from hmait.models.checkpoint import extract_state_dict, safe_load, save_weights, state_dict_fit, swin_layout
from hmait.models.hmait import ARCH_SETTINGS

ARCHS = tuple(ARCH_SETTINGS)


def _reference(arch: str, converted: dict) -> dict:
    """The state dict of an H-MaiT-``arch`` classifier with as many classes as the converted head."""
    num_classes = converted['head.fc.weight'].shape[0] if 'head.fc.weight' in converted else 0
    return HMaiTClassifier(arch=arch, num_classes=num_classes).state_dict()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('src', help='Swin checkpoint (.pth or .safetensors)')
    parser.add_argument('dst', nargs='?', help='where to write the H-MaiT checkpoint (.pth or .safetensors)')
    parser.add_argument('--out', help='the same as DST')
    parser.add_argument('--arch', default='tiny', choices=ARCHS,
                        help='H-MaiT preset the file must fit (default: tiny)')
    parser.add_argument('--allow-partial', action='store_true',
                        help='write the file even when it does not fit the preset exactly (the rest of the '
                             'model then keeps its initialisation)')
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
    fit = state_dict_fit(_reference(args.arch, converted), converted)
    if not fit.exact and not args.allow_partial:
        # The other presets are built only to name the one the file fits.
        exact = [arch for arch in ARCHS if arch != args.arch
                 and state_dict_fit(_reference(arch, converted), converted).exact]
        hint = f'; it is an H-MaiT-{exact[0]} (--arch {exact[0]})' if exact else ''
        parser.error(f'{args.src} does not convert into H-MaiT-{args.arch}{hint}: {fit.describe()}; '
                     '--allow-partial writes it anyway')
    unmatched = fit.unexpected + [k for k, _, _ in fit.mismatched]

    print(f'{args.src}: Swin checkpoint in {layout} layout, {len(state_dict)} tensors')
    print(f'matched ({len(fit.matched)}): every H-MaiT-{args.arch} parameter that the file provides')
    print(f'dropped ({len(dropped)}): window-attention tensors with no H-MaiT counterpart')
    for key in dropped:
        print(f'  {key}')
    print(f'unmatched ({len(unmatched)}): converted keys with no H-MaiT-{args.arch} parameter of that shape')
    for key in unmatched:
        print(f'  {key}')
    print(f'missing ({len(fit.missing)}): H-MaiT parameters left at their initialisation')
    for key in fit.missing:
        print(f'  {key}')
    save_weights(converted, dst, metadata={'converted_from': os.path.basename(args.src), 'swin_layout': layout})
    print(f'wrote {dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
