"""Every RunConfig field is applied by the run or refused: a new field cannot be silently dropped again."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from zeromega.config import ConfigError, RunConfig, validate
from zeromega.launch.partial import set_path
from zeromega.run.fields import APPLIED, REFUSED

ROOT = Path(__file__).resolve().parent.parent


def leaf_fields(model=RunConfig, prefix: str = "") -> list[str]:
    out = []
    for name, info in model.model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            out += leaf_fields(kind, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def test_every_field_is_applied_or_refused():
    fields = set(leaf_fields())
    unlisted = sorted(fields - set(APPLIED) - set(REFUSED))
    assert not unlisted, f"fields neither applied nor refused (add them to zeromega/run/fields.py): {unlisted}"
    stale = sorted((set(APPLIED) | set(REFUSED)) - fields)
    assert not stale, f"zeromega/run/fields.py lists fields the schema no longer has: {stale}"
    assert not set(APPLIED) & set(REFUSED)


@pytest.mark.parametrize("path", sorted(APPLIED))
def test_each_applied_field_is_read_where_the_table_says(path):
    section, _, leaf = path.rpartition(".")
    attribute = leaf or path
    # cfg.<section>.<leaf>, a section object's .<leaf>, or the path spelled out (tables, messages)
    # or a whole section written out at once (cfg.zero.aio.model_dump())
    whole = rf"\.{re.escape(section.rpartition('.')[2])}\.model_dump\(\)" if section else r"(?!x)x"
    pattern = re.compile(rf"\.{re.escape(attribute)}\b|[\"']{re.escape(path)}[\"']|{whole}")
    for source in APPLIED[path]:
        text = (ROOT / source).read_text()
        assert pattern.search(text), f"{source} does not read {path}"


@pytest.mark.parametrize("path", sorted(REFUSED))
def test_each_refused_field_is_refused_by_name(path):
    data: dict = {}
    set_path(data, path, REFUSED[path])
    with pytest.raises(ConfigError) as err:
        validate(data)
    assert err.value.field == path


def test_a_log_warmup_without_deepspeeds_class_is_refused():
    with pytest.raises(ConfigError, match="scheduler.warmup_style"):
        validate({"scheduler": {"warmup_style": "log"}})
    cfg = validate({"scheduler": {"warmup_style": "log", "deepspeed_type": "WarmupLR"}})
    assert cfg.scheduler.deepspeed_type == "WarmupLR"
