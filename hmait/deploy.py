"""ONNX export of H-MaiT and MaiT models, checked against PyTorch in ONNX Runtime or OpenVINO.

By default the exported graph holds only standard ONNX operators: the masked heads take the 'halo'
path of :mod:`hmait.ops` (tiles with a gathered key halo, batched MatMuls), which every runtime
reads. ``masked_heads='openvino'`` (or ``'openvino-bf16'``) writes one ``hmait.MaskedAttention`` node
per masked-head layer instead, which OpenVINO runs with the project's CPU kernel
(:mod:`hmait.ops.openvino_extension`); no other runtime reads such a file.
With ``dynamic=True`` the batch, height and width stay symbolic, so one file runs at every input
size the PyTorch model accepts. ``tools/deploy/export_onnx.py`` is the command line around this.
onnx, onnxscript, onnxruntime and openvino are imported only here, when an export is asked for.
:func:`export_aoti` writes an AOTInductor package instead (``tools/deploy/export_aoti.py``), which
keeps the C++ kernel of the masked heads.
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from .benchmark.measure import time_alternating
from .builder import build_model, is_config
from .ops.masked_attention import EXPORT_FORMS, HALO_TILE, export_masked_heads

# torch.export fixes sizes of 0 and 1 to constants, so a dynamic export traces a batch of at least 2,
# and images of at least 448 px: then every stage of a stride-32 model has at least two halo tiles per
# side (at one tile, the tile count would be fixed to 1 and the file would fail at larger inputs).
_MIN_DYNAMIC_BATCH = 2
_MIN_DYNAMIC_SIDE = 2 * HALO_TILE * 32
_MAX_SIDE = 16384
# A dynamic AOTInductor package takes heights and widths that are multiples of this (as mmdet and
# mmseg pad their inputs to): the model's padding of other sizes leaves symbolic expressions so nested
# that AOTInductor's compile of even the demo-sized model had not finished after 25 minutes.
AOTI_SIDE_MULTIPLE = 32
# The forms of the masked heads an ONNX file can hold ('kernel' is torch.export's, for AOTInductor).
ONNX_FORMS = tuple(form for form in EXPORT_FORMS if form != 'kernel')


def add_export_arguments(parser, out_help: str, shape_help: str, batch_help: str, dynamic_help: str) -> None:
    """The arguments both export tools take: what to export and how to check it."""
    parser.add_argument('source', metavar='CONFIG_OR_MODEL', help='timm model name or config file')
    parser.add_argument('checkpoint', nargs='?', help='weights to load (default: the fresh initialisation)')
    parser.add_argument('--out', required=True, help=out_help)
    parser.add_argument('--shape', type=int, nargs=2, default=(224, 224), metavar=('H', 'W'), help=shape_help)
    parser.add_argument('--batch', type=int, default=1, help=batch_help)
    parser.add_argument('--features', action='store_true', help="a timm model's multi-scale maps (features_only)")
    parser.add_argument('--threads', type=int, help="threads for PyTorch and the runtime (default: torch's)")
    parser.add_argument('--dynamic', action='store_true', help=dynamic_help)
    parser.add_argument('--check-shapes', nargs='+', default=['256x320', '384x384'], metavar='HxW',
                        help='with --dynamic, more input sizes to check (default 256x320 384x384)')


def check_export_arguments(parser, args, positive: Sequence[str] = ('batch', 'threads')) -> None:
    """``parser.error`` (exit status 2, one line) for the arguments of :func:`add_export_arguments` that do not fit."""
    for name in positive:
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f'--{name.replace("_", "-")} must be a positive integer, got {value}')
    if min(args.shape) < 1:
        parser.error(f'--shape must be two positive sizes, got {args.shape}')
    if args.features and is_config(args.source):
        parser.error('--features applies to timm model names; a classification config exports its classifier, '
                     'and a detection or segmentation config its backbone')


def export_model(args) -> nn.Module:
    """The model the export tools' arguments name (:func:`hmait.builder.build_model`), in eval mode."""
    return build_model(args.source, args.checkpoint, **({'features_only': True} if args.features else {}))


def export_example(args, model: nn.Module) -> tuple[Path, torch.Generator, torch.Tensor]:
    """What both export tools do before exporting: set torch's threads (``--threads``), make the folder of
    ``--out``, and draw a seeded random example batch (``--batch``, the model's channels, ``--shape``).
    Returns ``(out, generator, image)``; the generator draws the check inputs after the example."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(args.batch, getattr(model, 'in_channels', 3), *args.shape, generator=gen)
    return out, gen, image


def error_summary(err: BaseException) -> str:
    """``Type: first line of the message``: what an export tool prints of an exporter's or compiler's error."""
    text = str(err).strip()
    return f'{type(err).__name__}: {text.splitlines()[0] if text else ""}'


def output_names(outputs) -> list[str]:
    """``logits`` for one tensor, ``out0``, ``out1``, ... for a tuple or list of maps."""
    return ['logits'] if isinstance(outputs, torch.Tensor) else [f'out{i}' for i in range(len(outputs))]


def export_onnx(model: nn.Module, path: str, image: torch.Tensor, dynamic: bool = False,
                opset: int | None = None, masked_heads: str = 'halo') -> list[str]:
    """Export ``model`` with ``torch.onnx.export(..., dynamo=True)``; returns the output names.

    image: an example ``(B, C, H, W)`` batch. ``dynamic`` makes batch, height and width symbolic
    (input name ``image``); the trace then runs on a random batch of at least 2 images of at least
    448 px, since torch.export would fix sizes of 1 (a batch, or a stage's count of halo tiles) to
    constants. ``opset``: the ONNX opset (default: the exporter's). ``masked_heads``: how the hard
    and strict masked heads are written, one of :data:`ONNX_FORMS`.
    """
    if masked_heads not in ONNX_FORMS:
        raise ValueError(f'masked_heads must be one of {ONNX_FORMS}, got {masked_heads!r}')
    if image.dim() != 4:
        raise ValueError(f'image must have shape (B, C, H, W), got {tuple(image.shape)}')
    if dynamic:
        image = _dynamic_example(image)
    with torch.no_grad():
        names = output_names(model(image))
    kwargs = {}
    if dynamic:
        kwargs['dynamic_shapes'] = _dynamic_shapes()
    if opset is not None:
        kwargs['opset_version'] = opset
    with torch.no_grad(), export_masked_heads(masked_heads):
        torch.onnx.export(model, (image,), path, input_names=['image'], output_names=names, dynamo=True,
                          **kwargs)
    return names


def _dynamic_example(image: torch.Tensor, side_multiple: int = 1) -> torch.Tensor:
    """A random stand-in for ``image`` that a dynamic export traces: only shapes are traced, and
    torch.export would fix sizes of 1 (a batch, or a stage's count of halo tiles) to constants."""
    b, c, h, w = image.shape

    def side(n: int) -> int:
        n = max(n, _MIN_DYNAMIC_SIDE)
        return -(-n // side_multiple) * side_multiple
    return torch.randn(max(b, _MIN_DYNAMIC_BATCH), c, side(h), side(w), dtype=image.dtype)


def _dynamic_shapes(side_multiple: int = 1) -> tuple[dict, ...]:
    """torch.export's symbolic batch, height and width of the one input; the sides are multiples of
    ``side_multiple``."""
    dim = torch.export.Dim
    sides = [dim(name, min=1, max=_MAX_SIDE // side_multiple) for name in ('height', 'width')]
    if side_multiple > 1:
        sides = [side_multiple * side for side in sides]
    return ({0: dim('batch', min=1, max=4096), 2: sides[0], 3: sides[1]},)


def export_aoti(model: nn.Module, path: str, image: torch.Tensor, dynamic: bool = False) -> str:
    """An AOTInductor package of ``model``, its masked heads as the C++ kernel's op.

    ``torch.export`` keeps ``hmait::masked_attention_cpu_qkv_fwd`` in the graph (export form
    'kernel'), and ``torch._inductor.aoti_compile_and_package`` compiles the rest into ``path``
    (``.pt2``); the package calls the op through torch's dispatcher, so the kernel's library must be
    loaded before the package runs (:class:`AOTISession` does). The package is tied to this torch
    version and CPU architecture, and to ``image``'s shape unless ``dynamic``: then the batch stays
    symbolic, and so do height and width, as multiples of :data:`AOTI_SIDE_MULTIPLE` (the op receives
    the grid as symbolic sizes); the trace runs on a stand-in, as :func:`export_onnx`'s does.
    """
    if image.dim() != 4:
        raise ValueError(f'image must have shape (B, C, H, W), got {tuple(image.shape)}')
    kwargs = {}
    accepted = {'hmait.input': 'x'.join(map(str, image.shape))}
    if dynamic:
        image = _dynamic_example(image, AOTI_SIDE_MULTIPLE)
        kwargs['dynamic_shapes'] = _dynamic_shapes(AOTI_SIDE_MULTIPLE)
        accepted = {'hmait.input': f'?x{image.shape[1]}x?x?', 'hmait.side_multiple': str(AOTI_SIDE_MULTIPLE)}
    with torch.no_grad(), export_masked_heads('kernel'):
        program = torch.export.export(model.eval(), (image,), **kwargs)
    # The package records the inputs it accepts, which the runners check: AOTInductor checks its
    # inputs only when AOTI_RUNTIME_CHECK_INPUTS is set, and computes garbage from others. Its own
    # check then also lets a batch of 1 through.
    configs = {'aot_inductor.metadata': accepted, 'aot_inductor.check_lowerbound': False}
    return torch._inductor.aoti_compile_and_package(program, package_path=path, inductor_configs=configs)


def check_aoti_input(metadata: dict, shape: Sequence[int]) -> None:
    """ValueError unless ``shape`` is an input the package with ``metadata`` accepts
    (:func:`export_aoti` records it; a package without the record is not checked)."""
    spec = metadata.get('hmait.input')
    if spec is None:
        return
    expected, multiple = spec.split('x'), int(metadata.get('hmait.side_multiple', 1))
    fits = len(shape) == len(expected) and all(e == '?' or int(e) == n for e, n in zip(expected, shape))
    if fits and all(n % multiple == 0 for n in tuple(shape)[2:]):
        return
    sides = f', H and W multiples of {multiple}' if multiple > 1 else ''
    raise ValueError(f'the package takes input of shape {spec.replace("?", "B", 1).replace("?x?", "HxW")}{sides}; '
                     f'got {"x".join(map(str, shape))}')


class AOTISession:
    """An AOTInductor package (:func:`export_aoti`) behind the two session calls this module makes.

    Loads the project's CPU kernel first (building it if needed), since the package calls its op."""

    def __init__(self, path: str):
        from .ops import cpu_kernel

        available, reason = cpu_kernel.cpu_kernel_status()
        if not available:
            raise RuntimeError(f'the package calls the hmait CPU kernel, which is unavailable: {reason}')
        self.runner = torch._inductor.aoti_load_package(path)
        self.metadata = self.runner.get_metadata()

    def get_inputs(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(name='image')]

    def run(self, output_names, feed: dict) -> list:
        """Every output (``output_names`` must be None, as this module passes it) for one input feed;
        ValueError for an input the package does not take."""
        for x in feed.values():
            check_aoti_input(self.metadata, x.shape)
        with torch.inference_mode():
            outputs = self.runner(*(torch.from_numpy(x) for x in feed.values()))
        outputs = [outputs] if isinstance(outputs, torch.Tensor) else outputs
        return [o.numpy() for o in outputs]


def quantize_int8(path: str, out: str) -> str:
    """ONNX Runtime's dynamic int8 quantization of ``path`` (int8 weights of MatMul/Gemm, activations
    quantized per call) into ``out``; returns ``out``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(path, out, weight_type=QuantType.QInt8)
    return out


def onnxruntime_session(path: str, threads: int | None = None):
    """A plain ONNX Runtime CPU session of ``path`` (``threads``: intra-op threads, default torch's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])


OPENVINO_PRECISIONS = ('f32', 'bf16')


def uses_openvino_extension(path: str) -> bool:
    """Whether the ONNX file holds ``hmait.MaskedAttention`` nodes (an export with ``masked_heads='openvino'``)."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph
    return any(node.domain == 'hmait' for node in graph.node)


class OpenVINOSession:
    """An ONNX file compiled by OpenVINO for the CPU, behind the two calls of an ONNX Runtime session
    that this module makes (``get_inputs()`` and ``run(None, feed)``).

    ``precision`` is OpenVINO's inference precision, set explicitly: its default on CPUs with AVX-512
    BF16 or AMX is bf16, which changes results. The project's extension is loaded when the file holds
    its nodes (building it on first use). ``threads``: inference threads (default torch's).
    """

    def __init__(self, path: str, precision: str = 'f32', threads: int | None = None):
        import openvino as ov

        if precision not in OPENVINO_PRECISIONS:
            raise ValueError(f'the OpenVINO precision must be one of {OPENVINO_PRECISIONS}, got {precision!r}')
        core = ov.Core()
        if uses_openvino_extension(path):
            from .ops import openvino_extension
            openvino_extension.load_into(core)
        config = {'INFERENCE_PRECISION_HINT': precision, 'INFERENCE_NUM_THREADS': threads or torch.get_num_threads(),
                  'PERFORMANCE_HINT': 'LATENCY'}
        self.compiled = core.compile_model(core.read_model(path), 'CPU', config)
        self.request = self.compiled.create_infer_request()

    def get_inputs(self) -> list[SimpleNamespace]:
        return [SimpleNamespace(name=port.any_name) for port in self.compiled.inputs]

    def run(self, output_names, feed: dict) -> list:
        """Every output (``output_names`` must be None, as this module passes it) for one input feed."""
        results = self.request.infer(list(feed.values()))
        return [results[output].copy() for output in self.compiled.outputs]


@dataclass
class Check:
    """A runtime (ONNX Runtime or OpenVINO) against PyTorch on one input."""
    shape: tuple[int, ...]
    max_abs_diff: float                # over every output
    torch_images_per_s: float
    runtime_images_per_s: float

    def cells(self) -> str:
        """The table cells the export tools print: difference, both throughputs and their ratio."""
        return (f'{self.max_abs_diff:.2e} | {self.torch_images_per_s:.2f} | {self.runtime_images_per_s:.2f} | '
                f'{self.runtime_images_per_s / self.torch_images_per_s:.2f}')


def check_against_torch(model: nn.Module, session, image: torch.Tensor, repeats: int = 3) -> Check:
    """Run ``image`` through PyTorch and ``session`` (ONNX Runtime's or an :class:`OpenVINOSession`),
    compare every output and time them alternately (median of repeats, with the benchmarks' timer)."""
    with torch.inference_mode():
        expected = model(image)
    expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
    feed = {session.get_inputs()[0].name: image.numpy()}
    got = session.run(None, feed)
    if len(got) != len(expected):
        raise RuntimeError(f'the runtime returned {len(got)} outputs, PyTorch {len(expected)}')
    diff = 0.
    for i, (g, e) in enumerate(zip(got, expected)):
        if tuple(g.shape) != tuple(e.shape):
            raise RuntimeError(f'output {i}: the runtime gave shape {tuple(g.shape)}, PyTorch {tuple(e.shape)}')
        diff = max(diff, float((torch.from_numpy(g) - e).abs().max()))
    def run_torch() -> None:
        with torch.inference_mode():
            model(image)

    # Both already ran once above, which is their warm-up.
    times, errors = time_alternating({'torch': run_torch, 'runtime': lambda: session.run(None, feed)},
                                     reps=repeats, warmup=0)
    if errors:
        raise RuntimeError(f'timing failed: {errors}')
    batch = image.shape[0]
    return Check(tuple(image.shape), diff, batch / statistics.median(times['torch']),
                 batch / statistics.median(times['runtime']))


def top1_accuracy(predict, loader) -> float:
    """Top-1 accuracy (%) of ``predict`` (an ``(B, C, H, W)`` float tensor -> logits array or tensor)
    over ``loader``'s ``(images, labels)`` batches."""
    correct = total = 0
    for images, labels in loader:
        logits = torch.as_tensor(predict(images))
        correct += int((logits.argmax(-1) == labels).sum())
        total += len(labels)
    return 100. * correct / max(total, 1)


def session_predictor(session, batch: int | None = None):
    """``images -> logits`` through ``session``; ``batch`` for a file fixed to one batch size, which
    a smaller last batch is padded to (repeating its last image) and cut back from."""
    name = session.get_inputs()[0].name

    def predict(images: torch.Tensor):
        count = len(images)
        if batch is not None and count < batch:
            images = torch.cat([images, images[-1:].expand(batch - count, -1, -1, -1)])
        return session.run(None, {name: images.numpy()})[0][:count]
    return predict


def parse_shapes(values: Sequence[str]) -> list[tuple[int, int]]:
    """``['224x224', '256x320']`` -> ``[(224, 224), (256, 320)]``, with an error naming a bad entry."""
    shapes = []
    for value in values:
        parts = value.lower().split('x')
        if len(parts) != 2 or not all(p.isdigit() and 0 < int(p) <= _MAX_SIDE for p in parts):
            raise ValueError(f'shape {value!r} must be HEIGHTxWIDTH with sides in [1, {_MAX_SIDE}], e.g. 224x224')
        shapes.append((int(parts[0]), int(parts[1])))
    return shapes
