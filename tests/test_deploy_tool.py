"""tools/deploy/export_onnx.py: exports, checks against PyTorch in ONNX Runtime, and names what is wrong."""
import pytest
import torch
from helpers import REPO, python, run_tool, tool

DEMO_CONFIG = str(REPO / 'configs' / 'hmait_t_demo.py')


def test_export_tool_writes_a_dynamic_model_and_checks_it(tmp_path):
    pytest.importorskip('onnxscript')
    pytest.importorskip('onnxruntime')
    from hmait.builder import build_model
    torch.manual_seed(0)
    model = build_model(DEMO_CONFIG)
    checkpoint = tmp_path / 'demo.pth'
    torch.save(dict(state_dict={f'backbone.{k}': v for k, v in model.state_dict().items()}), checkpoint)
    out = tmp_path / 'deploy' / 'demo.onnx'
    proc = run_tool([python(), tool('deploy/export_onnx.py'), DEMO_CONFIG, str(checkpoint), '--out', str(out),
                     '--dynamic', '--shape', '64', '64', '--check-shapes', '96x128', '40x72', '--int8'], timeout=600)
    assert out.is_file()
    assert 'dynamic batch, height and width' in proc.stdout
    assert (tmp_path / 'deploy' / 'demo.int8.onnx').is_file()
    rows = [[cell.strip() for cell in line.split('|')[1:-1]] for line in proc.stdout.splitlines()
            if line.startswith(('| fp32 |', '| int8 |'))]
    sizes = ['1x3x64x64', '1x3x96x128', '1x3x40x72']
    assert [(row[0], row[1]) for row in rows] == [('fp32', s) for s in sizes] + [('int8', s) for s in sizes]
    for row in rows:
        diff = float(row[2])
        assert diff < 1e-3 if row[0] == 'fp32' else 0 < diff < 1.  # int8 is close but not exact

    # The exported file holds the checkpoint's weights: ONNX Runtime agrees with the loaded model.
    from hmait.deploy import onnxruntime_session
    image = torch.randn(2, 3, 80, 64)
    with torch.no_grad():
        expected = model.eval()(image)
    got = onnxruntime_session(str(out)).run(None, {'image': image.numpy()})[0]
    assert abs(torch.from_numpy(got) - expected).max() < 1e-3


@pytest.mark.parametrize('args,message', [
    (['no_such_model'], "'no_such_model' is neither a config file (.py) nor a timm model; H-MaiT and MaiT models:"),
    (['configs/missing.py'], "config file 'configs/missing.py' does not exist"),
    ([DEMO_CONFIG, 'missing.pth'], "checkpoint 'missing.pth' does not exist"),
    (['hmait_tiny', '--dynamic', '--check-shapes', '224'], "shape '224' must be HEIGHTxWIDTH"),
    (['hmait_tiny', '--features', '--data', 'data'], '--data measures top-1 accuracy and needs a classifier'),
])
def test_export_tool_names_bad_input(tmp_path, args, message):
    proc = run_tool([python(), tool('deploy/export_onnx.py'), *args, '--out', str(tmp_path / 'x.onnx')], check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / 'x.onnx').exists()


def test_export_tool_rejects_a_checkpoint_of_another_architecture(tmp_path):
    import timm

    import hmait  # noqa: F401
    checkpoint = tmp_path / 'other.pth'
    torch.save(timm.create_model('hmait_tiny', num_classes=3, depths=(1, 1, 1, 1)).state_dict(), checkpoint)
    proc = run_tool([python(), tool('deploy/export_onnx.py'), DEMO_CONFIG, str(checkpoint), '--out',
                     str(tmp_path / 'x.onnx')], check=False)
    assert proc.returncode == 2
    assert f'checkpoint {checkpoint} does not fit the model' in proc.stderr


def test_export_tool_reports_top1_on_an_imagenet_folder(tmp_path):
    """A static export fixed to batch 4 on 6 images: the last batch is padded and cut back, and the
    fp32 file predicts what PyTorch predicts."""
    pytest.importorskip('onnxscript')
    from hmait.data.imagenet_synthetic import generate_imagenet
    generate_imagenet(str(tmp_path / 'data'), num_classes=3, train_per_class=1, val_per_class=2, size=64)
    proc = run_tool([python(), tool('deploy/export_onnx.py'), DEMO_CONFIG, '--out', str(tmp_path / 'demo.onnx'),
                     '--shape', '64', '64', '--batch', '4', '--data', str(tmp_path / 'data')], timeout=600)
    line = next(line for line in proc.stdout.splitlines() if line.startswith('top-1 on 6 images'))
    accuracy = dict(part.rsplit(' ', 2)[:2] for part in line.split(': ', 1)[1].split(', '))
    assert set(accuracy) == {'PyTorch', 'ONNX Runtime fp32'}
    assert accuracy['PyTorch'] == accuracy['ONNX Runtime fp32']


def test_aoti_tool_compiles_a_dynamic_package_and_checks_it_at_each_size(tmp_path):
    out = tmp_path / 'demo.pt2'
    proc = run_tool([python(), tool('deploy/export_aoti.py'), DEMO_CONFIG, '--out', str(out), '--shape', '64', '64',
                     '--batch', '2', '--dynamic', '--check-shapes', '96x128'], timeout=600)
    assert out.is_file()
    assert 'dynamic batch, height and width' in proc.stdout
    rows = [[cell.strip() for cell in line.split('|')[1:-1]] for line in proc.stdout.splitlines()
            if line.startswith('| 2x3x')]
    assert [row[0] for row in rows] == ['2x3x64x64', '2x3x96x128']
    assert all(float(row[1]) < 1e-3 for row in rows)


@pytest.mark.parametrize('args,message', [
    (['hmait_tiny', '--out', 'x.onnx'], "--out must name a .pt2 file (an AOTInductor package), got 'x.onnx'"),
    (['no_such_model', '--out', 'x.pt2'], "'no_such_model' is neither a config file (.py) nor a timm model"),
    (['hmait_tiny', '--out', 'x.pt2', '--dynamic', '--check-shapes', '256x250'],
     'a --dynamic package takes heights and widths that are multiples of 32; --shape and --check-shapes hold 256x250'),
])
def test_aoti_tool_names_bad_input(tmp_path, args, message):
    proc = run_tool([python(), tool('deploy/export_aoti.py'), *args], cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not any(tmp_path.iterdir())
