"""The committed generated code is what proto/generate.py produces from the .proto sources."""

from __future__ import annotations

import importlib.util

from tests.conftest import REPO


def test_generated_code_is_fresh(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", REPO / "proto" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    fresh = generate.generate(tmp_path)
    assert fresh, "protoc produced nothing"
    for path in fresh:
        committed = REPO / "gptjt_proto" / path.name
        assert committed.is_file(), f"{committed} is missing: run python proto/generate.py"
        assert committed.read_text() == path.read_text(), \
            f"{committed.name} is stale: run python proto/generate.py and commit the result"


def test_every_status_enum_value_is_commented():
    for proto in (REPO / "proto" / "gptjt_proto").glob("*.proto"):
        lines = proto.read_text().splitlines()
        in_enum = False
        for line in lines:
            stripped = line.strip()
            if stripped.startswith("enum "):
                in_enum = True
            elif in_enum and stripped == "}":
                in_enum = False
            elif in_enum and "=" in stripped and not stripped.endswith("_UNSPECIFIED = 0;"):
                assert "//" in stripped, f"{proto.name}: enum value without a plain-words comment: {stripped}"


def test_codec_names_agree():
    from gptjt_core.compression import CODECS
    from gptjt_core.config import CODEC_NAMES

    assert set(CODECS) == set(CODEC_NAMES)
