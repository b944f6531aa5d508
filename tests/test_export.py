"""The blocks trace into one graph for torch.compile, and the backbone exports to ONNX for inference."""
import numpy as np
import pytest
import torch

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
