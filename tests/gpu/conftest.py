"""Shared setup of the GPU tests (run on a lent GPU machine: scripts/gpu_check.sh)."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    reason = None
    if not torch.cuda.is_available():
        reason = "no CUDA device"
    else:
        try:
            from flashserve import _C  # noqa: F401
        except ImportError as exc:
            reason = f"flashserve._C is not built ({exc})"
    if reason:
        for item in items:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def fs_C():
    from flashserve import _C

    return _C


@pytest.fixture(scope="session")
def compiled(fs_C):
    """{'head_dims': [...], 'dtypes': [torch dtypes]} of this build."""
    cfg = fs_C.compiled_configs()
    names = {"float16": torch.float16, "bfloat16": torch.bfloat16}
    return {"head_dims": list(cfg["head_dims"]), "dtypes": [names[d] for d in cfg["dtypes"]]}


@pytest.fixture(autouse=True)
def _poison(fs_C):
    """Every forward output is NaN-filled before the kernel runs; tests check nothing stays NaN."""
    fs_C.debug_poison_outputs(True)
    yield
    fs_C.debug_poison_outputs(False)
