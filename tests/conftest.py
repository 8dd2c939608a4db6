import os

# Triton kernels run in Triton's interpreter on CPU tensors; the variable is read when the kernels are defined, so
# it is set before anything imports them. It changes nothing else: the backend picks Triton on CPU tensors only
# when MIRRORLA_BACKEND=triton asks for it.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fit_batch():
    """``fit(model, x, y, steps=15, lr=1e-3)``: AdamW steps on one fixed batch; returns the losses (a model that
    can learn drives them down)."""

    def fit(model, x, y, steps: int = 15, lr: float = 1e-3) -> list[float]:
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        losses = []
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    return fit


@pytest.fixture
def benchmark_script():
    """``load(name)``: the script ``benchmarks/<name>.py`` as a module (the scripts are not part of the package)."""
    import importlib.util
    import sys
    from pathlib import Path

    loaded = []

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        key = f"_benchmark_{name}"
        spec = importlib.util.spec_from_file_location(key, path)
        module = importlib.util.module_from_spec(spec)
        # registered while it runs, as an imported module is: dataclasses look their module up by name
        sys.modules[key] = module
        loaded.append(key)
        spec.loader.exec_module(module)
        return module

    yield load
    for key in loaded:
        sys.modules.pop(key, None)


@pytest.fixture
def cast_shapes():
    """A dispatch mode recording the input shape of every dtype cast (``aten._to_copy``) run inside it:
    ``with cast_shapes() as casts: ...``, then ``casts.shapes``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CastShapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten._to_copy:
                self.shapes.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    return CastShapes


class _LargestFp32:
    """Records ``largest``, the element count of the largest fp32 tensor any operator makes inside the block."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        record = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                        record.largest = max(record.largest, t.numel())
                return out

        self.largest, self.mode = 0, Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


@pytest.fixture
def largest_fp32():
    """``with largest_fp32() as record: ...``, then ``record.largest``: how large the largest fp32 tensor made in
    the block was (what the half-precision paths must keep to a chunk of tokens)."""
    return _LargestFp32
