"""The root package's public names all resolve, and unknown ones fail like a module's do."""

import pytest

import zeromega


@pytest.mark.parametrize("name", zeromega.__all__)
def test_public_name_resolves(name):
    assert getattr(zeromega, name) is not None


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        zeromega.nope  # noqa: B018


def test_setup_cfg_lists_every_package_folder():
    """An editable install finds any subfolder, a wheel only the packages setup.cfg lists: a folder left
    out (zeromega/checkpoint was) works in development and is missing for every user who pip-installs."""
    import configparser
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cfg = configparser.ConfigParser()
    cfg.read(root / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    mapping = dict(line.split("=") for line in cfg["options"]["package_dir"].split("\n") if line.strip())
    found = set()
    for package, folder in ((k.strip(), v.strip()) for k, v in mapping.items()):
        for init in (root / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(root / folder).parts
            found.add(".".join((package, *relative)))
    assert found - listed == set(), f"package folders missing from setup.cfg [options] packages: {found - listed}"
    assert listed - found == set(), f"setup.cfg lists packages with no folder: {listed - found}"
