#!/usr/bin/env python
"""Print the most probable classes of images under an H-MaiT or MaiT classifier.

    python tools/predict.py CONFIG_OR_MODEL [CHECKPOINT] IMAGE_OR_DIR... [--topk 5] [--json]
                            [--class-names FILE] [--device cpu] [--batch-size 16]

CONFIG_OR_MODEL is a classification config (configs/hmait_t_demo.py) or a timm model name
(hmait_tiny). CHECKPOINT is read as such when it has a checkpoint suffix (.pth, .pt, .ckpt, ...) or
when it is neither a folder nor named like an image; it must fit the model exactly. A folder
stands for every image file under it, sorted. Images are preprocessed as the model is evaluated:
the config's test transform, or the timm model's pretrained_cfg. Class names come from
--class-names (one per line), else from the config's data set folders (data_root/train/<class>)
when they exist, else they are the class indices. --json prints a JSON list, one object per image:
{"path", "predictions": [{"class_index", "class_name", "probability"}]}. Bad input exits with 2.
"""
import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage='%(prog)s CONFIG_OR_MODEL [CHECKPOINT] IMAGE_OR_DIR [IMAGE_OR_DIR ...] [options]')
    parser.add_argument('source', metavar='CONFIG_OR_MODEL', help='classification config (.py) or timm model name')
    # One list: argparse cannot tell an optional CHECKPOINT from the first image; split_checkpoint can.
    parser.add_argument('paths', nargs='+', metavar='PATH', help='[CHECKPOINT] IMAGE_OR_DIR...: an optional '
                        'checkpoint, then image files and folders')
    parser.add_argument('--topk', type=int, default=5, help='classes shown per image (default 5; at most all)')
    parser.add_argument('--json', action='store_true', help='print a JSON list instead of text')
    parser.add_argument('--class-names', metavar='FILE', help='class names, one per line, in class-index order')
    parser.add_argument('--device', default='cpu', help='torch device (default cpu)')
    parser.add_argument('--batch-size', type=int, default=16, help='images per forward pass (default 16)')
    args = parser.parse_args(argv)
    for name in ('topk', 'batch_size'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be a positive integer, got {getattr(args, name)}')
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # The package warns (e.g. class folders that do not match the model); one line each, without source.
    warnings.formatwarning = lambda message, *_, **__: f'predict: warning: {message}\n'
    from hmait.predict import (
        expand_image_paths,
        format_predictions,
        load_predictor,
        predictions_json,
        split_checkpoint,
    )

    try:
        checkpoint, inputs = split_checkpoint(args.paths)
        images = expand_image_paths(inputs)  # before the model: a wrong path should fail fast
        predictor = load_predictor(args.source, checkpoint, args.class_names, args.device)
    except (ValueError, FileNotFoundError, RuntimeError) as err:  # RuntimeError: not a plain weights file
        print(f'predict: error: {err}', file=sys.stderr)
        return 2
    predictions = predictor.predict(images, args.topk, args.batch_size)
    try:
        if args.json:
            # Collected first, so an unreadable image leaves no half-written list on stdout.
            print(predictions_json(list(predictions)))
        else:
            for line in format_predictions(predictions):
                print(line, flush=True)
    except ValueError as err:  # an image PIL cannot decode
        print(f'predict: error: {err}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
