"""The root package's public names all resolve, and unknown ones fail like a module's do."""

import pytest

import zeromega


@pytest.mark.parametrize("name", zeromega.__all__)
def test_public_name_resolves(name):
    assert getattr(zeromega, name) is not None


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        zeromega.nope  # noqa: B018
