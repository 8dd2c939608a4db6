"""``compile_model``: regional (block-by-block) and whole-model ``torch.compile`` of this package's models."""

import pytest
import timm
import torch
import torch._dynamo.testing

import mirrorla  # noqa: F401  (registers the models)
from mirrorla.models.compile import compile_model, repeated_blocks


@pytest.mark.parametrize("name, count, block", [
    ("mirrorla_vit_nano_patch4", 6, "Block"),
    ("mirrorla_deit_tiny_patch16_224", 12, "Block"),
    ("mirrorla_pvt_tiny", 8, "GridBlock"),          # the blocks inside the stages, not the stages
    ("mirrorla_swin_tiny_patch4_window7_224", 12, None),  # linear stages and timm's window-attention stages
])
def test_repeated_blocks_are_the_innermost_attention_blocks(name, count, block):
    blocks = repeated_blocks(timm.create_model(name, attn="mirror"))
    assert len(blocks) == count
    if block:
        assert {type(b).__name__ for b in blocks} == {block}


def test_blocks_compile_once_and_match_eager():
    """Six blocks, one traced frame: the compiled code of the first block serves the others; values and
    gradients equal the eager model's."""
    torch.manual_seed(0)
    model = timm.create_model("mirrorla_vit_nano_patch4", attn="mirror", img_size=32, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    ref.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    assert compile_model(model, scope="blocks", backend=counter) is model
    out = model(x)
    out.square().sum().backward()
    assert counter.frame_count == 1
    torch.testing.assert_close(out, ref)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=n)


def test_whole_model_traces_as_one_graph_through_the_triton_op(monkeypatch):
    """A whole MirrorLA model, in training mode, on the Triton path (the custom op): one graph, no break."""
    monkeypatch.setenv("MIRRORLA_BACKEND", "triton")
    model = timm.create_model("mirrorla_vit_nano_patch4", attn="mirror", img_size=32, num_classes=10)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    names = {str(node.target) for g in explained.graphs for node in g.graph.nodes}
    assert any("mirror_linear_attention" in n for n in names)  # the fused op, not the torch reference
    torch._dynamo.reset()


@pytest.mark.parametrize("kwargs, needle", [
    ({"scope": "layers"}, "scope must be one of model, blocks"),
    ({"mode": "fast"}, "mode must be one of default"),
])
def test_compile_options_are_checked(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        compile_model(torch.nn.Linear(2, 2), **kwargs)
    with pytest.raises(ValueError, match="no repeated attention blocks"):
        compile_model(torch.nn.Linear(2, 2))


def test_first_compiled_call_in_a_fresh_process_traces_the_dispatch(tmp_path):
    """The backend dispatch runs inside compiled code. Nothing it calls may be a function dynamo refuses to trace: a
    new process, whose very first call is a compiled one, must trace the whole layer as one graph. (torch 2.11 on
    the H100 refused importlib's find_spec, which the dispatch called lazily; torch 2.14 here traces it, so that
    regression shows only there: the GPU run of benchmarks/run_gpu.sh compiles a model first thing.)"""
    import os
    import subprocess
    import sys

    script = (
        "import torch, mirrorla\n"
        "layer = mirrorla.LinearAttention(32, 2)\n"
        "f = torch.compile(layer, fullgraph=True, backend='eager')\n"
        "x = torch.randn(2, 17, 32)\n"
        "torch.testing.assert_close(f(x), layer(x))\n"
        "print('ok')\n"
    )
    env = {**os.environ, "MIRRORLA_BACKEND": "triton", "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
