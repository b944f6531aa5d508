#!/usr/bin/env python
"""Generate small deterministic synthetic data sets in real formats.

    python tools/generate_demo_data.py imagenet OUT_DIR [--classes 10 --train-per-class 100
                                                         --val-per-class 20 --size 64 --seed 0]
    python tools/generate_demo_data.py coco OUT_DIR [--classes 3 --train 4 --val 2 --height 96 --width 128]
    python tools/generate_demo_data.py ade20k OUT_DIR [--classes 4 --train 4 --val 2 --height 96 --width 128]

Each records its arguments in OUT_DIR: the same arguments leave the folder as it is, others replace
what the generator wrote, and a non-empty folder that it did not write is refused (exit status 2).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def _imagenet(args: argparse.Namespace) -> dict:
    from hmait.data import generate_imagenet
    return generate_imagenet(args.out_dir, num_classes=args.classes, train_per_class=args.train_per_class,
                             val_per_class=args.val_per_class, size=args.size, seed=args.seed)


def add_imagenet_parser(subparsers) -> None:
    p = subparsers.add_parser('imagenet', help='classification: OUT_DIR/{train,val}/<class>/*.JPEG')
    p.add_argument('out_dir', help='output folder (data_root of the config)')
    p.add_argument('--classes', type=int, default=10, help='number of classes (default 10, at most 24)')
    p.add_argument('--train-per-class', type=int, default=100, help='training images per class (default 100)')
    p.add_argument('--val-per-class', type=int, default=20, help='validation images per class (default 20)')
    p.add_argument('--size', type=int, default=64, help='image side in pixels (default 64)')
    p.add_argument('--seed', type=int, default=0, help='random seed (default 0)')
    p.set_defaults(func=_imagenet)


def _dense(args: argparse.Namespace) -> dict:
    from hmait.data.dense_synthetic import make_ade20k, make_coco
    make = make_coco if args.format == 'coco' else make_ade20k
    paths = make(args.out_dir, num_train=args.train, num_val=args.val, image_size=(args.height, args.width),
                 num_classes=args.classes, seed=args.seed)
    return dict(out_dir=paths.pop('root'), **paths)


def add_dense_parsers(subparsers) -> None:
    """``coco`` and ``ade20k``: detection and segmentation data in mmdet's / mmseg's default layouts."""
    for name, classes, layout in (
            ('coco', 3, 'detection: OUT_DIR/{train2017,val2017}/*.jpg, OUT_DIR/annotations/instances_*.json'),
            ('ade20k', 4, 'segmentation: OUT_DIR/images/{training,validation}/*.jpg, '
                          'OUT_DIR/annotations/{training,validation}/*.png')):
        p = subparsers.add_parser(name, help=layout)
        p.add_argument('out_dir', help='output folder (data_root of the config)')
        p.add_argument('--classes', type=int, default=classes, help=f'number of classes (default {classes})')
        p.add_argument('--train', type=int, default=4, help='training images (default 4)')
        p.add_argument('--val', type=int, default=2, help='validation images (default 2)')
        p.add_argument('--height', type=int, default=96, help='image height in pixels (default 96)')
        p.add_argument('--width', type=int, default=128, help='image width in pixels (default 128)')
        p.add_argument('--seed', type=int, default=0, help='random seed (default 0)')
        p.set_defaults(func=_dense)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest='format', required=True, metavar='FORMAT')
    add_imagenet_parser(subparsers)
    add_dense_parsers(subparsers)
    args = parser.parse_args(argv)
    try:
        summary = args.func(args)
    except (ValueError, FileExistsError) as err:
        parser.exit(2, f'error: {err}\n')
    state = 'generated' if summary.pop('generated') else 'already present, unchanged'
    print(f'{args.format} data set {state} in {summary.pop("out_dir")}: {summary}')


if __name__ == '__main__':
    main()
