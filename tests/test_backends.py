"""hmait.ops.backends: which backend each attention call gets, why, and the settings that decide it."""
import logging

import pytest
import torch

from hmait.models.layers import MaskedMultiheadAttention
from hmait.ops import backends, global_attention, masked_attention
from hmait.ops.backends import choose_global, choose_masked, set_backend, use_backends

LOGGER = 'hmait.ops.backends'


@pytest.fixture(autouse=True)
def _clean_settings(monkeypatch):
    """Every test starts from 'auto' everywhere and leaves it so."""
    for variable in backends.ENVIRONMENT.values():
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(backends, '_settings', {'masked': None, 'global': None})
    monkeypatch.setattr(backends, '_last_choice', {})


def _q(n=9, d=4, dtype=torch.float32, **kwargs):
    return torch.randn(1, 2, n, d, dtype=dtype, **kwargs)


def test_auto_choices_come_with_their_reasons():
    q = _q()
    cpu = choose_masked(q, 4, 'hard')
    assert cpu.backend == 'cpu' and 'compiled C++ kernel' in cpu.reason and 'instruction set' in cpu.reason
    soft = choose_masked(q, 4, 'soft')
    assert soft == ('torch', 'mode soft keeps every logit: only the PyTorch path computes it')
    assert choose_masked(q.to(torch.int32), 4, 'hard') == ('torch', 'no compiled kernel takes torch.int32')
    assert choose_masked(_q(device='meta'), 4, 'hard') == ('torch', 'no compiled kernel for meta tensors')

    matmul = choose_global(q)
    assert matmul.backend == 'matmul'
    assert matmul.reason == 'float32 evaluation: 9 tokens (limit 100), 162 logits (limit 1048576)'
    with torch.enable_grad():
        train = choose_global(_q(requires_grad=True))
    assert train.reason.startswith('float32 training: 9 tokens (limit 144)')
    long = choose_global(_q(n=101))
    assert long.backend == 'sdpa' and long.reason.startswith('float32 evaluation: beyond the matmul limits, 101 tokens')
    assert choose_global(_q(dtype=torch.float16)) == ('sdpa', 'no matmul limits for torch.float16')
    assert choose_global(_q(dtype=torch.bfloat16)).backend == ('matmul' if backends._bf16_matmul_native() else 'sdpa')
    assert choose_global(_q(d=48)) == ('sdpa', 'head size 48 > 32')
    # At head sizes 32 and 64 the compiled kernel (tests/test_global_attention.py).
    assert choose_global(_q(d=64)) == ('cpu', 'on CPU: the compiled C++ kernel of the global heads')
    assert choose_global(_q(device='meta')) == ('sdpa', 'a meta tensor: the matmul limits are for CPUs')


def test_the_request_comes_from_the_call_then_python_then_the_environment(monkeypatch):
    q = _q()
    # The environment is read when a call is made, not when hmait was imported.
    monkeypatch.setenv('HMAIT_MASKED_ATTENTION_BACKEND', 'torch')
    monkeypatch.setenv('HMAIT_GLOBAL_ATTENTION_BACKEND', 'sdpa')
    assert choose_masked(q, 4, 'hard') == ('torch', 'set by the environment variable HMAIT_MASKED_ATTENTION_BACKEND')
    assert choose_global(q) == ('sdpa', 'set by the environment variable HMAIT_GLOBAL_ATTENTION_BACKEND')
    # Python's setting overrides the environment ...
    set_backend('masked', 'halo')
    assert choose_masked(q, 4, 'hard') == ('halo', "set with hmait.ops.backends.set_backend('masked', ...)")
    assert choose_global(q).backend == 'sdpa'  # the other kind keeps its own setting
    # ... and the call's argument (an attention module's setting) overrides both.
    assert choose_masked(q, 4, 'hard', 'torch') == ('torch', "the call's backend argument (or its module's)")
    set_backend('masked', 'auto')  # 'auto' from Python overrides the environment too
    assert choose_masked(q, 4, 'hard').backend == 'cpu'
    set_backend('masked', None)
    assert choose_masked(q, 4, 'hard').backend == 'torch'  # back to the environment
    monkeypatch.setenv('HMAIT_MASKED_ATTENTION_BACKEND', 'auto')
    assert choose_masked(q, 4, 'hard').backend == 'cpu'


def test_use_backends_restores_the_settings_even_on_errors():
    q = _q()
    with pytest.raises(KeyError):
        with use_backends(masked='torch', global_='sdpa'):
            assert choose_masked(q, 4, 'hard').backend == 'torch'
            assert choose_global(q).backend == 'sdpa'
            with use_backends(global_='matmul'):
                assert choose_global(_q(n=500)).backend == 'matmul'
                assert choose_masked(q, 4, 'hard').backend == 'torch'
            assert choose_global(_q(n=500)).backend == 'sdpa'
            raise KeyError('leave the block')
    assert choose_masked(q, 4, 'hard').backend == 'cpu'
    assert choose_global(q).backend == 'matmul'


def test_settings_refuse_unknown_backends(monkeypatch):
    with pytest.raises(ValueError, match=r"the masked heads' backend must be one of \('auto', 'torch'.*got 'cuda'"):
        set_backend('masked', 'cuda')
    with pytest.raises(ValueError, match="the global heads' backend must be one of .*got 'flash'"):
        with use_backends(global_='flash'):
            pass
    with pytest.raises(ValueError, match="kind must be one of .*got 'local'"):
        set_backend('local', 'torch')
    monkeypatch.setenv('HMAIT_GLOBAL_ATTENTION_BACKEND', 'flash')
    with pytest.raises(ValueError, match="HMAIT_GLOBAL_ATTENTION_BACKEND must be one of .*got 'flash'"):
        choose_global(_q())
    with pytest.raises(ValueError, match="masked_backend must be one of .*got 'cuda'"):
        MaskedMultiheadAttention(8, 2, 1, masked_backend='cuda')
    with pytest.raises(ValueError, match="global_backend must be one of .*got 'flash'"):
        MaskedMultiheadAttention(8, 2, 1, global_backend='flash')


def test_a_named_backend_that_cannot_run_says_why():
    q = _q()
    with pytest.raises(ValueError, match="backend='halo' .* cannot run this call: it implements modes 'hard' and "
                                         "'strict'; mode 'soft' runs on backend 'auto' or 'torch'"):
        choose_masked(q, 4, 'soft', 'halo')
    with pytest.raises(ValueError, match="backend='cpu' .* cannot run this call: the compiled CPU kernel takes CPU "
                                         "tensors, got a tensor on meta"):
        choose_masked(_q(device='meta'), 4, 'hard', 'cpu')
    with pytest.raises(ValueError, match="the compiled CPU kernel takes .*got torch.int32"):
        choose_masked(q.to(torch.int32), 4, 'hard', 'cpu')
    set_backend('masked', 'openvino')
    with pytest.raises(ValueError, match=r"backend='openvino' \(set with hmait.ops.backends.set_backend\('masked', "
                                         r"\.\.\.\)\) cannot run this call: it writes an OpenVINO node"):
        masked_attention(q, q, q, (3, 3))


def test_debug_log_names_each_call_site_once_per_choice(caplog):
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    q = _q()
    for _ in range(3):
        masked_attention(q, q, q, (3, 3))
        global_attention(q, q, q)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(lines) == 2, lines
    assert lines[0].startswith('masked heads, batch 1, 2 heads of 4, 9 tokens, float32 on cpu: cpu (a CPU tensor')
    assert lines[1] == ('global heads, batch 1, 2 heads of 4, 9 tokens, float32 on cpu: matmul '
                        '(float32 evaluation: 9 tokens (limit 100), 162 logits (limit 1048576))')
    # Another site (gradients, another length) and a changed choice get lines of their own.
    global_attention(_q(n=16, requires_grad=True), q, q)
    with use_backends(global_='sdpa'):
        global_attention(q, q, q)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER][2:]
    assert len(lines) == 2, lines
    assert 'batch 1, 2 heads of 4, 16 tokens, float32 on cpu, with gradients: matmul (float32 training' in lines[0]
    assert lines[1].endswith(": sdpa (set with hmait.ops.backends.set_backend('global', ...))")


def test_each_attention_module_can_ask_for_its_own_backends(caplog):
    torch.manual_seed(0)
    attn = MaskedMultiheadAttention(8, 2, num_masked_heads=1).double().eval()
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    auto = attn(x, (3, 4))
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    # float64 takes the C++ kernel and SDPA by default; this module asks for the PyTorch path and the matmuls,
    # which compute the same.
    attn.masked_backend, attn.global_backend = 'torch', 'matmul'
    torch.testing.assert_close(attn(x, (3, 4)), auto)
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert [line.rsplit(': ', 1)[-1] for line in lines] == ["torch (the call's backend argument (or its module's))",
                                                             "matmul (the call's backend argument (or its module's))"]
    # A process-wide setting does not override a module's own.
    with use_backends(masked='halo'):
        torch.testing.assert_close(attn(x, (3, 4)), auto)
    assert len([r for r in caplog.records if r.name == LOGGER]) == 2
    with pytest.raises(ValueError, match="backend='cpu' .* cannot run this call: it implements modes 'hard'"):
        MaskedMultiheadAttention(8, 2, 1, mode='soft', masked_backend='cpu')(x.float(), (3, 4))


def test_settings_hold_under_torch_compile():
    """The Python setting is read while tracing and guarded: a changed setting retraces."""
    from hmait.ops import cpu_kernel

    assert cpu_kernel.build()  # a kernel is used under torch.compile only if it was loaded before tracing
    torch.manual_seed(0)
    q = _q(n=12, dtype=torch.float64)
    calls = []

    def backend(gm, example_inputs):
        calls.append(gm)
        return gm.forward

    compiled = torch.compile(lambda q: masked_attention(q, q, q, (3, 4)), fullgraph=True, backend=backend)
    reference = masked_attention(q, q, q, (3, 4), backend='torch')
    torch.testing.assert_close(compiled(q), reference)
    with use_backends(masked='halo'):
        torch.testing.assert_close(compiled(q), reference)
    assert len(calls) == 2
    kernel, halo = ([str(node.target) for node in gm.graph.nodes] for gm in calls)
    assert any('hmait' in t for t in kernel)  # the kernel's op
    assert not any('hmait' in t for t in halo)  # the halo path's standard ops


def test_bfloat16_takes_sdpa_on_a_cpu_without_native_bfloat16_matmuls(monkeypatch):
    """On an AVX2 CPU torch's bfloat16 matmuls are slow, so the bf16 matmul limits do not apply there;
    float32 keeps its limits."""
    monkeypatch.setattr(backends, '_bf16_matmul_native', lambda: False)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            choice = choose_global(_q(dtype=torch.bfloat16, requires_grad=grad))
        assert choice == ('sdpa', "this CPU has no native bfloat16 matmuls (oneDNN's bf16 support: AVX-512 or AMX)")
    assert choose_global(_q()).backend == 'matmul'
    monkeypatch.setattr(backends, '_bf16_matmul_native', lambda: True)
    assert choose_global(_q(dtype=torch.bfloat16)).backend == 'matmul'
