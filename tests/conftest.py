import pytest

from zeromega.integrations.megatron import data


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> str:
    """A 300 KB slice of the project's corpus, built once per test session."""
    return str(data.build_corpus(tmp_path_factory.mktemp("corpus") / "stdlib", max_bytes=300_000))


@pytest.fixture(scope="module")
def cpu_adam():
    """DeepSpeed's CPU Adam built (or loaded from the cache) once, here, not by two forked ranks at once (a rank
    killed mid-build leaves a lock in ~/.cache/torch_extensions that later loads wait on)."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    CPUAdamBuilder().load(verbose=False)


@pytest.fixture(scope="module")
def async_io():
    """DeepSpeed's async I/O op (NVMe offload) built once; it needs libaio-dev."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible(False):
        pytest.fail("async_io cannot be built: apt-get install -y libaio-dev (make nvme-deps)")
    AsyncIOBuilder().load(verbose=False)
