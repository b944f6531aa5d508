#!/usr/bin/env python
"""Cross-layer attention similarity (MaiT paper appendix Eq. 4) of one head, as a heat map.

    python tools/analysis/layer_similarity.py CONFIG CHECKPOINT --data DIR [--head 0] [--out FILE.png]
                                              [--img-size N] [--num-images N] [--batch-size N]

Entry (i, j) is the cosine similarity between the head's attention rows in layers i and j,
averaged over tokens and images. For H-MaiT only blocks of the same stage (same token count) are
compared; other entries are blank. Writes the PNG and a JSON of the matrix next to it.
"""
import argparse
import json
import os.path as osp
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from hmait.analysis import layer_similarity  # noqa: E402
from hmait.analysis.tooling import prepare_or_refuse, save_heatmap, short_layer_names  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='classification training config (model = TimmImageClassifier)')
    parser.add_argument('checkpoint', help='checkpoint of that config')
    parser.add_argument('--data', required=True,
                        help='ImageNet-layout folder: <class>/<image> or val/<class>/<image>')
    parser.add_argument('--head', type=int, default=0, help='attention head index (default 0)')
    parser.add_argument('--out',
                        help='PNG path (default: analysis/similarity_head{H}.png next to the checkpoint)')
    parser.add_argument('--img-size', type=int,
                        help="input size (default: the config's test input size, else the size the model was "
                             'built for)')
    parser.add_argument('--num-images', type=int, default=16)
    parser.add_argument('--batch-size', type=int, default=4)
    parser.add_argument('--max-map-mb', type=int, default=256)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    model, loader, info = prepare_or_refuse('layer_similarity', args)
    result = layer_similarity(model, loader, head=args.head, max_map_bytes=args.max_map_mb << 20)
    out = args.out or osp.join(osp.dirname(osp.abspath(args.checkpoint)), 'analysis',
                               f'similarity_head{args.head}.png')
    names = short_layer_names(result.layers)
    save_heatmap(result.matrix, out, f'attention similarity of head {args.head}, {info["model_name"]} '
                 f'({result.num_images} images)', 'layer', 'layer', xticks=names, yticks=names)
    json_path = osp.splitext(out)[0] + '.json'
    with open(json_path, 'w') as f:
        json.dump(dict(config=args.config, checkpoint=args.checkpoint, **info,
                       similarity=result.to_dict()), f, indent=1)
    print(f'wrote {out} and {json_path}')


if __name__ == '__main__':
    main()
