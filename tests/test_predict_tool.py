"""tools/predict.py: top-k classes of image files, in agreement with the model run in this process."""
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from helpers import REPO, python, run_tool, save_classification_checkpoint, tool
from PIL import Image

DEMO_CONFIG = str(REPO / 'configs' / 'hmait_t_demo.py')
NUM_CLASSES = 10  # the demo config's


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    """A working directory holding the demo config's data set (data/demo_imagenet, one image per class
    and split), a checkpoint of the demo model, and a folder of odd-sized images with a non-image file."""
    from hmait.builder import build_model
    from hmait.data.imagenet_synthetic import generate_imagenet

    root = tmp_path_factory.mktemp('predict')
    generate_imagenet(str(root / 'data' / 'demo_imagenet'), num_classes=NUM_CLASSES, train_per_class=1,
                      val_per_class=1, size=64)
    torch.manual_seed(0)
    model = build_model(DEMO_CONFIG)
    # timm initialises the head with std 0.02, which leaves every class near 1/10 whatever the image;
    # a wider head makes the probabilities depend on the pixels, so wrong preprocessing shows.
    torch.nn.init.normal_(model.get_classifier().weight, std=0.3)
    checkpoint = root / 'demo.pth'
    torch.save(dict(state_dict={f'backbone.{k}': v for k, v in model.state_dict().items()}), checkpoint)
    images = root / 'images'
    (images / 'sub').mkdir(parents=True)
    rng = np.random.default_rng(0)
    # Not 64 px and not square: resize and centre crop both change what the model sees.
    for name, (h, w) in (('b.png', (72, 96)), ('sub/a.jpg', (120, 80))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / name)
    (images / 'notes.txt').write_text('not an image; a folder scan skips it\n')
    val_image = next((root / 'data' / 'demo_imagenet' / 'val').glob('*/*.JPEG'))
    return dict(root=root, model=model.eval(), checkpoint=checkpoint, images=images, val_image=val_image)


def expected_probabilities(model, path) -> torch.Tensor:
    """The softmax of ``model`` on ``path`` preprocessed as the demo config evaluates: 64 px, crop_pct 1.0."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
    transform = create_transform(input_size=64, crop_pct=1.0, interpolation='bicubic', mean=IMAGENET_DEFAULT_MEAN,
                                 std=IMAGENET_DEFAULT_STD, is_training=False)
    with torch.no_grad():
        return model(transform(Image.open(path).convert('RGB'))[None]).softmax(-1)[0]


def parse_text(stdout: str) -> dict[str, list[tuple[float, int, str]]]:
    """``{path: [(probability, class index, class name), ...]}`` from the text output."""
    result: dict[str, list] = {}
    rows: list = []
    for line in stdout.splitlines():
        if line.startswith('  '):
            probability, index, name = line.split(None, 2)
            rows.append((float(probability), int(index), name))
        else:  # a path opens the next image's rows
            rows = result[line] = []
    return result


def check_probabilities(probabilities: list[float], full: bool) -> None:
    assert all(0. <= p <= 1. for p in probabilities)
    assert probabilities == sorted(probabilities, reverse=True)
    if full:  # every class listed: the whole softmax
        assert abs(sum(probabilities) - 1.) < 1e-5
    else:
        assert sum(probabilities) <= 1. + 1e-4  # printed to 4 decimals


def test_json_output_matches_the_model_in_process(demo):
    """A folder (recursively, skipping the non-image file) and a file; all 10 classes, named by the
    config's data set folders because the working directory holds data/demo_imagenet."""
    from hmait.data.imagenet_synthetic import class_names
    proc = run_tool([python(), tool('predict.py'), DEMO_CONFIG, str(demo['checkpoint']), str(demo['images']),
                     str(demo['val_image']), '--json', '--topk', '10'], cwd=demo['root'])
    results = json.loads(proc.stdout)
    expected_paths = [str(demo['images'] / 'b.png'), str(demo['images'] / 'sub' / 'a.jpg'), str(demo['val_image'])]
    assert [r['path'] for r in results] == expected_paths
    names = class_names(NUM_CLASSES)
    for result in results:
        rows = result['predictions']
        assert sorted(r['class_index'] for r in rows) == list(range(NUM_CLASSES))
        assert all(r['class_name'] == names[r['class_index']] for r in rows)
        check_probabilities([r['probability'] for r in rows], full=True)
        expected = expected_probabilities(demo['model'], result['path'])
        for row in rows:
            assert abs(row['probability'] - float(expected[row['class_index']])) < 1e-5
    # The comparison above can tell preprocessings apart: timm's default 224 px view of the same
    # image gives other probabilities.
    from timm.data import create_transform, resolve_model_data_config
    default = create_transform(**resolve_model_data_config(demo['model']), is_training=False)
    with torch.no_grad():
        other = demo['model'](default(Image.open(expected_paths[0]).convert('RGB'))[None]).softmax(-1)[0]
    assert (other - expected_probabilities(demo['model'], expected_paths[0])).abs().max() > 1e-3


def test_text_output_with_a_class_names_file(demo, tmp_path):
    names = [f'name {i}' for i in range(NUM_CLASSES)]  # spaces inside a name survive
    names_file = tmp_path / 'names.txt'
    names_file.write_text('\n'.join(names) + '\n\n')
    proc = run_tool([python(), tool('predict.py'), DEMO_CONFIG, str(demo['checkpoint']), str(demo['val_image']),
                     '--topk', '3', '--class-names', str(names_file)], cwd=demo['root'])
    results = parse_text(proc.stdout)
    assert list(results) == [str(demo['val_image'])]
    rows = results[str(demo['val_image'])]
    assert len(rows) == 3
    assert all(name == names[index] for _, index, name in rows)
    check_probabilities([p for p, _, _ in rows], full=False)
    expected = expected_probabilities(demo['model'], demo['val_image'])
    assert [index for _, index, _ in rows] == expected.topk(3).indices.tolist()
    assert all(abs(p - float(expected[index])) < 1e-4 for p, index, _ in rows)


def test_timm_model_name_without_checkpoint(demo, tmp_path):
    """hmait_tiny at its own 224 px preprocessing; no config, so the classes are named by index."""
    proc = run_tool([python(), tool('predict.py'), 'hmait_tiny', str(demo['images'] / 'b.png')], cwd=tmp_path)
    rows = parse_text(proc.stdout)[str(demo['images'] / 'b.png')]
    assert len(rows) == 5
    assert all(name == str(index) and 0 <= index < 1000 for _, index, name in rows)
    assert len({index for _, index, _ in rows}) == 5
    check_probabilities([p for p, _, _ in rows], full=False)


def _not_an_image(demo, tmp_path):
    broken = tmp_path / 'broken.jpg'
    broken.write_bytes(b'this is text, not a JPEG')
    return [str(broken)], f'cannot read image {str(broken)!r}'


def _empty_folder(demo, tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    (empty / 'notes.txt').write_text('no images here')
    return [str(empty)], f'IMAGE_OR_DIR {str(empty)!r} is a folder without image files'


def _other_architecture(demo, tmp_path):
    other = save_classification_checkpoint(tmp_path / 'other.pth')  # hmait_tiny with 10 classes, not the demo
    return [str(other), str(demo['val_image'])], f'checkpoint {other} does not fit the model'


def _class_names_count(demo, tmp_path):
    names = tmp_path / 'names.txt'
    names.write_text('a\nb\nc\n')
    return [str(demo['val_image']), '--class-names', str(names)], f'--class-names {str(names)!r} holds 3 names'


# Each bad input: its arguments after the config, and the message that must name it.
BAD_INPUTS = {
    'missing image': lambda demo, tmp_path: ([str(demo['checkpoint']), 'missing.jpg'],
                                             "IMAGE_OR_DIR 'missing.jpg' does not exist"),
    'not an image': _not_an_image,
    'empty folder': _empty_folder,
    'other architecture': _other_architecture,
    'missing checkpoint': lambda demo, tmp_path: (['missing.pth', str(demo['val_image'])],
                                                  "checkpoint 'missing.pth' does not exist"),
    'class names count': _class_names_count,
}


@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_bad_input_exits_2_naming_it(demo, tmp_path, case):
    args, message = BAD_INPUTS[case](demo, tmp_path)
    proc = run_tool([python(), tool('predict.py'), DEMO_CONFIG, *args, '--json'], cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr
    assert proc.stdout == ''  # no partial JSON list


def test_split_checkpoint_reads_the_first_path_by_its_name(tmp_path):
    from hmait.predict import split_checkpoint
    assert split_checkpoint(['a.jpg', 'b.png']) == (None, ['a.jpg', 'b.png'])
    assert split_checkpoint(['epoch_60.pth', 'a.jpg']) == ('epoch_60.pth', ['a.jpg'])
    assert split_checkpoint(['weights', 'a.jpg']) == ('weights', ['a.jpg'])  # no image suffix, more follow
    assert split_checkpoint([str(tmp_path), 'a.jpg']) == (None, [str(tmp_path), 'a.jpg'])  # a folder of images
    assert split_checkpoint(['notes.txt']) == (None, ['notes.txt'])  # alone: an image, for PIL to judge
    with pytest.raises(ValueError, match='no IMAGE_OR_DIR follows'):
        split_checkpoint(['epoch_60.pth'])


def test_config_preprocessing_is_the_config_test_transform():
    from mmengine.config import Config

    from hmait.builder import build_model
    from hmait.predict import preprocessing_config
    model = build_model(DEMO_CONFIG)
    config = preprocessing_config(model, Config.fromfile(DEMO_CONFIG))
    assert config['input_size'] == (3, 64, 64)  # the demo's img_size, not hmait_tiny's 224
    assert config['crop_pct'] == 1.0 and config['interpolation'] == 'bicubic'
    assert tuple(config['mean']) == (0.485, 0.456, 0.406) and tuple(config['std']) == (0.229, 0.224, 0.225)


def test_predict_module_imports_no_training_or_opencv():
    script = ('import sys, hmait.predict; print(",".join(m for m in ("hmait.engine", "mmengine.runner", "cv2", '
              '"mmcv", "mmdet", "mmseg") if m in sys.modules))')
    proc = subprocess.run([python(), '-c', script], cwd=REPO, capture_output=True, text=True, timeout=180,
                          env={**os.environ, 'PYTHONPATH': str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == ''

