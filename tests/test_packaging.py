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


def test_generated_wgmma_header_matches_its_generator():
    # csrc/common/hopper/wgmma_ops.cuh is generated (and committed): a hand edit or a stale header shows here.
    import importlib.util
    from pathlib import Path

    hopper = Path(__file__).resolve().parents[1] / "csrc" / "common" / "hopper"
    spec = importlib.util.spec_from_file_location("fs_gen_wgmma", hopper / "gen_wgmma.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (hopper / "wgmma_ops.cuh").read_text() == gen.render()
