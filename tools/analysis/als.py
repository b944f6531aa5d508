#!/usr/bin/env python
"""Attention Locality Score (MaiT paper Eq. 3) of every layer and head of a trained MaiT / H-MaiT.

    python tools/analysis/als.py CONFIG CHECKPOINT --data DIR [--out-dir DIR] [--img-size N]
                                 [--num-images N] [--batch-size N] [--max-map-mb MB]

Writes als.json (the table, the masking, the learned alpha of soft heads) and als.png (a layer x
head heat map, masked heads framed) to --out-dir, and prints the table.
"""
import argparse
import json
import os.path as osp
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from hmait.analysis import als_matrix, compute_als  # noqa: E402
from hmait.analysis.tooling import prepare_or_refuse, save_heatmap, short_layer_names  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='classification training config (model = TimmImageClassifier)')
    parser.add_argument('checkpoint', help='checkpoint of that config (mmengine .pth or a state dict)')
    parser.add_argument('--data', required=True,
                        help='ImageNet-layout folder: <class>/<image> or val/<class>/<image>')
    parser.add_argument('--out-dir', help='output folder (default: analysis/ next to the checkpoint)')
    parser.add_argument('--img-size', type=int,
                        help="input size (default: the config's test input size, else the size the model was "
                             'built for); smaller is cheaper')
    parser.add_argument('--num-images', type=int, default=32, help='images to average over (default 32)')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--max-map-mb', type=int, default=256,
                        help='memory bound of the dense attention maps computed at once (default 256)')
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    model, loader, info = prepare_or_refuse('als', args)
    result = compute_als(model, loader, max_map_bytes=args.max_map_mb << 20)
    out_dir = args.out_dir or osp.join(osp.dirname(osp.abspath(args.checkpoint)), 'analysis')
    names = short_layer_names(result.layers)
    report = dict(config=args.config, checkpoint=args.checkpoint, data=args.data, **info,
                  als=result.to_dict())
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    json_path, png_path = osp.join(out_dir, 'als.json'), osp.join(out_dir, 'als.png')
    with open(json_path, 'w') as f:
        json.dump(report, f, indent=1)
    width = max(result.num_heads)
    marked = [[h < m for h in range(width)] for m in result.masked_heads]
    save_heatmap(als_matrix(result), png_path, f'ALS of {info["model_name"]} ({result.num_images} images, '
                 f'masked heads framed)', 'head', 'layer', yticks=names, marked=marked)

    print(f'ALS over {result.num_images} images at {info["img_size"]} px (masked heads marked *)')
    for name, scores, masked, mode in zip(names, result.scores, result.masked_heads, result.mask_modes):
        cells = ' '.join(f'{s:.3f}{"*" if h < masked else " "}' for h, s in enumerate(scores))
        print(f'{name:>8} [{mode:>6}] {cells}')
    for name, alphas in result.alpha.items():
        print(f'soft alpha {name}: ' + ' '.join(f'{a:.3f}' for a in alphas))
    print(f'wrote {json_path} and {png_path}')


if __name__ == '__main__':
    main()
