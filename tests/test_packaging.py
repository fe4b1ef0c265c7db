"""Installation facts a CPU-only user relies on."""
import pytest
import torch

from flashserve.server.backends import create_backend, flash_available


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only install")
def test_extension_import_fails_clearly_without_cuda():
    with pytest.raises(ImportError, match="flashserve._C .* is not built"):
        import flashserve._C  # noqa: F401
    ok, why = flash_available()
    assert not ok and why
    assert create_backend("auto").name == "torch"
    with pytest.raises(RuntimeError, match="flash backend is not available"):
        create_backend("flash")
