"""The blocks trace into one graph for torch.compile, and the backbone exports to ONNX for inference:
few batched operators per masked head, and one file for every input size."""
import collections
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from helpers import REPO

from hmait.deploy import export_onnx, onnxruntime_session
from hmait.models import HMaiT, MaskedAttentionBlock

# A small backbone: every stage has masked heads next to global ones except the last (as in the paper).
SMALL = dict(embed_dims=16, depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 4), masked_heads=(1, 2, 2, 0),
             drop_path_rate=0.)


def _block(mode: str) -> MaskedAttentionBlock:
    torch.manual_seed(0)
    return MaskedAttentionBlock(32, num_heads=4, num_masked_heads=2, mask_size=3, mask_mode=mode,
                                num_prefix_tokens=1)


@pytest.mark.parametrize('mode', ['hard', 'strict', 'soft'])
def test_block_has_no_graph_breaks(mode):
    block = _block(mode)
    x = torch.randn(2, 1 + 5 * 6, 32)
    explanation = torch._dynamo.explain(block)(x, (5, 6))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize('mode', ['hard', 'strict'])
def test_block_compiles_fullgraph_forward_and_backward(mode):
    # aot_eager traces forward and backward through AOTAutograd, as inductor would, without a C++ build.
    torch._dynamo.reset()
    block = _block(mode)
    compiled = torch.compile(block, fullgraph=True, backend='aot_eager')
    x = torch.randn(2, 1 + 4 * 4, 32, requires_grad=True)
    out = compiled(x, (4, 4))
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    ref = block(x, (4, 4))
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, ref_grad)


class _HardAndStrict(torch.nn.Module):
    """Both exportable modes in one graph: the exporter's fixed cost is paid once."""

    def __init__(self):
        super().__init__()
        self.hard = HMaiT(mask_mode='hard', **SMALL)
        self.strict = HMaiT(mask_mode='strict', **SMALL)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.hard(image) + self.strict(image)


def test_backbone_exports_to_onnx_and_matches_onnxruntime(tmp_path):
    pytest.importorskip('onnxscript')
    ort = pytest.importorskip('onnxruntime')
    torch.manual_seed(0)
    model = _HardAndStrict().eval()
    image = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        expected = model(image)
    path = tmp_path / 'hmait.onnx'
    names = [f'{mode}_stage{i}' for mode in ('hard', 'strict') for i in range(4)]
    torch.onnx.export(model, (image,), str(path), input_names=['image'], output_names=names, dynamo=True)
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    outputs = session.run(None, {'image': image.numpy()})
    assert len(outputs) == len(expected) == 8
    for name, got, want in zip(names, outputs, expected):
        assert got.shape == tuple(want.shape), name
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4, err_msg=name)


def _op_counts(path) -> collections.Counter:
    onnx = pytest.importorskip('onnx')
    return collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize('mode', ['hard', 'strict'])
def test_exported_masked_heads_are_a_few_batched_operators(tmp_path, mode):
    """One softmax per head group, four gathers per masked head group and no slice per offset: the
    portable path's graph held nine shifted slices of k and v per masked block."""
    pytest.importorskip('onnxscript')
    torch.manual_seed(0)
    model = HMaiT(mask_mode=mode, **SMALL).eval()
    path = tmp_path / 'hmait.onnx'
    export_onnx(model, str(path), torch.randn(1, 3, 64, 96))
    ops = _op_counts(path)
    masked_blocks = sum(1 for m in SMALL['masked_heads'] if m)                         # stages 1-3
    global_blocks = sum(1 for m, h in zip(SMALL['masked_heads'], SMALL['num_heads']) if m < h)  # 1, 3, 4
    assert ops['Softmax'] == masked_blocks + global_blocks
    assert ops['Gather'] == 4 * masked_blocks          # queries, keys, values, and back to the grid
    # Hard mode reads its extra key's weight with one slice per masked block; strict mode has none.
    assert ops['Slice'] == (masked_blocks if mode == 'hard' else 0)
    assert ops['Where'] == 0                           # the mask is a product, not a select


def _max_diff(got, expected) -> float:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == tuple(e.shape)
    return max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected))


def test_dynamic_classifier_export_runs_at_every_size(tmp_path):
    """One export with symbolic batch, height and width, run at square, non-square and sizes that are
    not multiples of 32, against eager PyTorch."""
    pytest.importorskip('onnxscript')
    torch.manual_seed(0)
    model = timm.create_model('hmait_tiny', num_classes=10, embed_dims=16, depths=(1, 1, 1, 1),
                              num_heads=(2, 2, 4, 4), masked_heads=(1, 2, 2, 0), drop_path_rate=0.).eval()
    path = tmp_path / 'classifier.onnx'
    assert export_onnx(model, str(path), torch.randn(1, 3, 224, 224), dynamic=True) == ['logits']
    session = onnxruntime_session(str(path))
    for shape in [(1, 3, 224, 224), (2, 3, 256, 320), (1, 3, 384, 384), (3, 3, 100, 150), (1, 3, 33, 47)]:
        image = torch.randn(*shape)
        with torch.no_grad():
            expected = model(image)
        got = session.run(None, {'image': image.numpy()})
        assert got[0].shape == (shape[0], 10)
        assert _max_diff(got, [expected]) < 1e-4, shape


def test_dynamic_backbone_export_runs_at_detection_sizes(tmp_path):
    """The backbone's four maps from one dynamic export, at mmdet's and mmseg's input sizes and at the
    pre-training size, with the global heads' span of the shipped detection and segmentation configs."""
    pytest.importorskip('onnxscript')
    torch.manual_seed(0)
    # Stages 1-2 fully masked, as in the paper, so that 800x1344 stays cheap for eager PyTorch too.
    model = HMaiT(embed_dims=16, depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 4), masked_heads=(2, 2, 2, 0),
                  drop_path_rate=0., global_attn='pooled').eval()
    path = tmp_path / 'backbone.onnx'
    assert export_onnx(model, str(path), torch.randn(2, 3, 512, 512), dynamic=True) == [f'out{i}' for i in range(4)]
    session = onnxruntime_session(str(path))
    for shape in [(1, 3, 800, 1344), (1, 3, 640, 960), (2, 3, 512, 512), (1, 3, 224, 224)]:
        image = torch.randn(*shape)
        with torch.no_grad():
            expected = model(image)
        got = session.run(None, {'image': image.numpy()})
        assert got[0].shape == (shape[0], 16, -(-shape[2] // 4), -(-shape[3] // 4))
        assert _max_diff(got, expected) < 1e-3, shape


def test_aoti_package_keeps_the_kernel_and_matches_pytorch(tmp_path):
    """torch.export with the export form 'kernel' keeps one C++ kernel op per layer with masked heads, and
    the AOTInductor package compiled from it gives eager PyTorch's maps, loaded from Python and from the
    C++ runner (tools/deploy/aoti_runner, built here against the torch wheel); both refuse another shape."""
    from hmait.deploy import AOTISession, export_aoti
    from hmait.ops.masked_attention import export_masked_heads
    torch.manual_seed(0)
    model = HMaiT(**SMALL).eval()
    image = torch.randn(2, 3, 64, 96)
    with torch.no_grad(), export_masked_heads('kernel'):
        program = torch.export.export(model, (image,))
    kernel_ops = [n for n in program.graph.nodes if 'hmait.masked_attention_cpu_qkv_fwd' in str(n.target)]
    assert len(kernel_ops) == sum(1 for m in SMALL['masked_heads'] if m)
    path = export_aoti(model, str(tmp_path / 'backbone.pt2'), image)
    session = AOTISession(path)
    got = session.run(None, {'image': image.numpy()})
    with torch.no_grad():
        expected = model(image)
    assert _max_diff(got, expected) < 1e-4
    with pytest.raises(ValueError, match='the package takes input of shape 2x3x64x96; got 1x3x64x96'):
        session.run(None, {'image': image[:1].numpy()})

    from hmait.ops import cpu_kernel
    runner = tmp_path / 'aoti_runner'
    subprocess.run(['bash', str(REPO / 'tools' / 'deploy' / 'aoti_runner' / 'build.sh'), str(runner)], check=True,
                   capture_output=True, env={**os.environ, 'PYTHON': sys.executable}, timeout=600)

    def run_cpp(package, x):
        x.numpy().tofile(tmp_path / 'image.bin')
        command = [str(runner), str(cpu_kernel.library_path()), package, str(tmp_path / 'image.bin'),
                   str(tmp_path / 'out'), *map(str, x.shape)]
        return command, subprocess.run(command, capture_output=True, text=True, timeout=300)

    command, proc = run_cpp(path, image)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines() == [f'output {i} {list(e.shape)}' for i, e in enumerate(expected)]
    from_cpp = [np.fromfile(tmp_path / f'out{i}.bin', dtype=np.float32).reshape(e.shape)
                for i, e in enumerate(expected)]
    assert _max_diff(from_cpp, expected) < 1e-4
    # A wrong input size is named, not read past.
    bad = subprocess.run(command[:-1] + ['65'], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and 'must hold exactly 24960 float32 values' in bad.stderr
    # A shape the package was not compiled for is refused, not computed into garbage.
    _, other = run_cpp(path, torch.randn(2, 3, 64, 64))
    assert other.returncode == 2 and 'is not a shape the package takes: 2x3x64x96' in other.stderr

    # --dynamic: one package for every batch and every height and width that are multiples of 32,
    # the kernel op receiving the grid as symbolic sizes.
    dynamic = export_aoti(model, str(tmp_path / 'dynamic.pt2'), image, dynamic=True)
    session = AOTISession(dynamic)
    for shape in [(1, 3, 32, 64), (3, 3, 96, 160), (2, 3, 224, 224)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            expected = model(x)
        assert _max_diff(session.run(None, {'image': x.numpy()}), expected) < 1e-4, shape
    _, proc = run_cpp(dynamic, x)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _max_diff([np.fromfile(tmp_path / f'out{i}.bin', dtype=np.float32).reshape(e.shape)
                      for i, e in enumerate(expected)], expected) < 1e-4
    with pytest.raises(ValueError, match='the package takes input of shape Bx3xHxW, H and W multiples of 32; '
                                         'got 1x3x70x64'):
        session.run(None, {'image': np.zeros((1, 3, 70, 64), np.float32)})
    _, other = run_cpp(dynamic, torch.randn(1, 3, 64, 100))
    assert other.returncode == 2 and 'H and W multiples of 32' in other.stderr
    with pytest.raises(ValueError, match="masked_heads must be one of \\('halo', 'openvino', 'openvino-bf16'\\)"):
        export_onnx(model, str(tmp_path / 'x.onnx'), image, masked_heads='kernel')
