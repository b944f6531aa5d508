"""OpenVINO: the project's extension (the masked heads as an OpenVINO operation running the CPU kernel)
against the dense reference of Eq. 2, models exported with it against eager PyTorch, and the standard
export in OpenVINO. The extension is built from the installed openvino wheel on first use."""
import importlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import REPO, python, run_tool, tool

from hmait.models import HMaiT
from hmait.ops import dense_masked_attention

ov = pytest.importorskip('openvino')
onnx = pytest.importorskip('onnx')
pytest.importorskip('onnxscript')

# Small backbone: masked heads beside global ones in stages 1-3, none in stage 4 (as in the paper).
SMALL = dict(embed_dims=16, depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 4), masked_heads=(1, 2, 2, 0),
             drop_path_rate=0.)


@pytest.fixture(scope='module')
def core():
    from hmait.ops import openvino_extension
    available, reason = openvino_extension.status()
    assert available, reason  # make setup builds it; a failure here is a real defect
    core = ov.Core()
    openvino_extension.load_into(core)
    return core


def _node_model(path, mask_size: int, mode: str, num_prefix: int, scale: float, dtype) -> str:
    """An ONNX file holding one hmait.MaskedAttention node on a dynamic (B, N, 3, heads, d) float32 input,
    cast to ``dtype`` (a numpy-side ONNX type) around the node."""
    from onnx import TensorProto, helper
    qkv = helper.make_tensor_value_info('qkv', TensorProto.FLOAT, ['B', 'N', 3, 'heads', 'd'])
    grid = helper.make_tensor_value_info('grid', TensorProto.INT64, [2])
    out = helper.make_tensor_value_info('out', TensorProto.FLOAT, ['B', 'N', 'heads', 'd'])
    nodes = [helper.make_node('Cast', ['qkv'], ['qkv_cast'], to=dtype),
             helper.make_node('MaskedAttention', ['qkv_cast', 'grid'], ['attn'], domain='hmait', mask_size=mask_size,
                              mode=mode, num_prefix_tokens=num_prefix, scale=scale),
             helper.make_node('Cast', ['attn'], ['out'], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, 'masked_attention', [qkv, grid], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 18), helper.make_opsetid('hmait', 1)])
    onnx.save(model, str(path))
    return str(path)


# Grids with and without prefix tokens, odd and non-square, smaller than the mask, a single token.
GRIDS = [(5, 7, 0), (4, 4, 1), (3, 9, 2), (2, 2, 0), (1, 1, 1), (6, 5, 0)]


@pytest.mark.parametrize('mode', ['hard', 'strict'])
@pytest.mark.parametrize('mask_size', [3, 5])
def test_openvino_node_matches_the_dense_reference(tmp_path, core, mode, mask_size):
    """One compiled model with dynamic shapes per prefix count runs every grid, in float32, bfloat16
    and float16 (the node's input cast in the graph; the reference gets the same rounded values)."""
    from onnx import TensorProto
    gen = torch.Generator().manual_seed(0)
    for dtype, torch_dtype, tol in ((TensorProto.FLOAT, torch.float32, 1e-5),
                                    (TensorProto.BFLOAT16, torch.bfloat16, 2e-2),
                                    (TensorProto.FLOAT16, torch.float16, 2e-3)):
        for p in sorted({p for _, _, p in GRIDS}):
            path = _node_model(tmp_path / f'node_{dtype}_{p}.onnx', mask_size, mode, p, 0.3, dtype)
            compiled = core.compile_model(core.read_model(path), 'CPU', {'INFERENCE_PRECISION_HINT': 'f32'})
            for h, w, _ in (grid for grid in GRIDS if grid[2] == p):
                qkv = torch.randn(2, p + h * w, 3, 3, 8, generator=gen) * 2
                got = compiled([qkv.numpy(), np.array([h, w], dtype=np.int64)])[0]
                q, k, v = (t.transpose(1, 2) for t in qkv.to(torch_dtype).double().unbind(2))
                ref = dense_masked_attention(q, k, v, (h, w), mask_size, mode, None, p, scale=0.3).transpose(1, 2)
                assert got.shape == tuple(ref.shape)
                assert np.isfinite(got).all()
                assert np.abs(got - ref.numpy()).max() < tol * max(1., float(ref.abs().max())), (dtype, h, w, p)


def test_openvino_node_names_a_grid_that_does_not_fit(tmp_path, core):
    from onnx import TensorProto
    path = _node_model(tmp_path / 'node.onnx', 3, 'hard', 0, 0.3, TensorProto.FLOAT)
    compiled = core.compile_model(core.read_model(path), 'CPU', {'INFERENCE_PRECISION_HINT': 'f32'})
    with pytest.raises(RuntimeError, match=r'the token count N=12 must equal num_prefix_tokens \+ h\*w = 0 \+ 3\*5'):
        compiled([np.zeros((1, 12, 3, 2, 4), np.float32), np.array([3, 5], dtype=np.int64)])


def test_openvino_node_rejects_a_bad_attribute(tmp_path, core):
    from onnx import TensorProto
    path = _node_model(tmp_path / 'node.onnx', 4, 'hard', 0, 0.3, TensorProto.FLOAT)
    with pytest.raises(Exception, match='mask_size must be a positive odd integer, got 4'):
        core.compile_model(core.read_model(path), 'CPU')


def _hmait_nodes(path) -> int:
    return sum(node.domain == 'hmait' for node in onnx.load(str(path), load_external_data=False).graph.node)


@pytest.mark.parametrize('mode', ['hard', 'strict'])
def test_backbone_exported_with_openvino_nodes_matches_pytorch(tmp_path, core, mode):
    """A dynamic export whose masked heads are the project's nodes, one per layer with masked heads,
    runs in OpenVINO at odd and non-square sizes as eager PyTorch does; ONNX Runtime cannot read it."""
    from hmait.deploy import OpenVINOSession, export_onnx, uses_openvino_extension
    torch.manual_seed(0)
    model = HMaiT(mask_mode=mode, **SMALL).eval()
    path = tmp_path / 'backbone.onnx'
    export_onnx(model, str(path), torch.randn(1, 3, 64, 64), dynamic=True, masked_heads='openvino')
    assert _hmait_nodes(path) == 3 and uses_openvino_extension(str(path))
    session = OpenVINOSession(str(path), 'f32')
    for shape in [(1, 3, 64, 96), (2, 3, 100, 72), (1, 3, 33, 47)]:
        image = torch.randn(*shape)
        with torch.no_grad():
            expected = model(image)
        got = session.run(None, {'image': image.numpy()})
        assert len(got) == 4
        for g, e in zip(got, expected):
            assert g.shape == tuple(e.shape)
            assert np.abs(g - e.numpy()).max() < 1e-4, shape
    ort = pytest.importorskip('onnxruntime')
    with pytest.raises(Exception, match='MaskedAttention'):
        ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])


def test_bf16_nodes_in_openvino_bf16_are_finite_and_close(tmp_path, core):
    """'openvino-bf16' casts the nodes to bfloat16; in OpenVINO's bf16 precision the whole backbone
    stays close to eager float32 PyTorch, and the default export holds no project node."""
    from hmait.deploy import OpenVINOSession, export_onnx, uses_openvino_extension
    torch.manual_seed(0)
    model = HMaiT(**SMALL).eval()
    path = tmp_path / 'backbone_bf16.onnx'
    image = torch.randn(2, 3, 64, 96)
    export_onnx(model, str(path), image, masked_heads='openvino-bf16')
    assert _hmait_nodes(path) == 3
    got = OpenVINOSession(str(path), 'bf16').run(None, {'image': image.numpy()})
    with torch.no_grad():
        expected = model(image)
    for g, e in zip(got, expected):
        assert np.isfinite(g).all()
        assert np.abs(g - e.numpy()).max() < 5e-2 * max(1., float(e.abs().max()))
    standard = tmp_path / 'standard.onnx'
    export_onnx(model, str(standard), image)
    assert not uses_openvino_extension(str(standard))
    got = OpenVINOSession(str(standard), 'f32').run(None, {'image': image.numpy()})
    assert max(np.abs(g - e.numpy()).max() for g, e in zip(got, expected)) < 1e-4


def test_openvino_backend_runs_only_while_exporting():
    ops = importlib.import_module('hmait.ops.masked_attention')
    q = torch.randn(1, 2, 9, 4)
    with pytest.raises(ValueError, match="backend='openvino' .* cannot run this call: it writes an OpenVINO node"):
        ops.masked_attention(q, q, q, (3, 3), backend='openvino')
    with pytest.raises(ValueError, match="the export form of the masked heads must be one of"):
        with ops.export_masked_heads('tensorrt'):
            pass


def test_extension_build_names_a_missing_compiler(tmp_path):
    code = ('from hmait.ops import openvino_extension as e\n'
            'import openvino as ov\n'
            'try:\n'
            '    e.load_into(ov.Core())\n'
            'except RuntimeError as err:\n'
            '    print(err)\n')
    proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={'PATH': '/usr/bin:/bin', 'CXX': 'no-such-compiler', 'PYTHONPATH': str(REPO),
                               'HMAIT_EXTENSION_DIR': str(tmp_path)})
    expected = "the hmait OpenVINO extension is unavailable: no C++ compiler: 'no-such-compiler'"
    assert expected in proc.stdout, proc.stderr


def test_export_tool_writes_openvino_nodes_and_checks_them_in_openvino(tmp_path, core):
    config = str(REPO / 'configs' / 'hmait_t_demo.py')
    out = tmp_path / 'demo.onnx'
    proc = run_tool([python(), tool('deploy/export_onnx.py'), config, '--out', str(out), '--dynamic',
                     '--shape', '64', '64', '--check-shapes', '96x128', '--masked-heads', 'openvino'], timeout=600)
    assert _hmait_nodes(out) > 0
    assert 'OpenVINO f32 img/s' in proc.stdout
    rows = [[cell.strip() for cell in line.split('|')[1:-1]] for line in proc.stdout.splitlines()
            if line.startswith('| fp32 |')]
    assert [row[1] for row in rows] == ['1x3x64x64', '1x3x96x128']
    assert all(float(row[2]) < 1e-3 for row in rows)


@pytest.mark.parametrize('args,message', [
    (['--masked-heads', 'openvino', '--runtime', 'onnxruntime'], 'writes nodes only OpenVINO runs'),
    (['--precision', 'bf16'], "--precision is OpenVINO's inference precision; it needs --runtime openvino"),
    (['--masked-heads', 'openvino', '--int8'], "--int8 is ONNX Runtime's dynamic quantization"),
])
def test_export_tool_refuses_runtime_options_that_do_not_fit(tmp_path, args, message):
    proc = run_tool([python(), tool('deploy/export_onnx.py'), 'hmait_tiny', '--out', str(tmp_path / 'x.onnx'),
                     *args], check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not (tmp_path / 'x.onnx').exists()


@pytest.mark.parametrize('runtime,precision', [('openvino', 'fp32'), ('openvino-kernel', 'bf16')])
def test_benchmark_times_openvino_runtimes(core, runtime, precision):
    from hmait.benchmark.models import Setting, measure_setting
    torch.manual_seed(0)
    setting = Setting('inference', precision, runtime, resolution=64, batch=1)
    (hmait,) = measure_setting(['hmait_tiny'], setting, torch.device('cpu'), warmup=0, iters=1, reps=2)
    assert hmait.error is None, hmait.error
    assert len(hmait.repetitions_images_per_s) == 2 and hmait.images_per_s > 0
    assert hmait.peak_memory_mib is None  # OpenVINO's allocations are not torch's
