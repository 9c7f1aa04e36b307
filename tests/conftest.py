import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


def pytest_report_header(config):
    import gradgeom

    cuda = f"cuda {torch.version.cuda}, GPU: {torch.cuda.get_device_name()}" if HAS_CUDA else "no GPU"
    return f"gradgeom {gradgeom.__version__} (CUDA kernels compiled: {gradgeom.compiled_with_cuda()}); torch {torch.__version__}; {cuda}"


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def at_thread_counts(fn, counts=(1, 3, 8)):
    """[fn() with torch.set_num_threads(c) for c in counts]; the thread count is restored."""
    before = torch.get_num_threads()
    try:
        out = []
        for c in counts:
            torch.set_num_threads(c)
            out.append(fn())
        return out
    finally:
        torch.set_num_threads(before)
