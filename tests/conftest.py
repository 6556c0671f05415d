import pytest

from zeromega.integrations.megatron import data


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> str:
    """A 300 KB slice of the project's corpus, built once per test session."""
    return str(data.build_corpus(tmp_path_factory.mktemp("corpus") / "stdlib", max_bytes=300_000))
