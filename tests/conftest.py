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
