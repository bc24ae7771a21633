"""The GGUF conversion cache is keyed by the file's content, not by where it is installed."""

import os

from specmtp import gguf_convert


def test_conversion_cache_follows_content_not_path(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECMTP_CACHE", str(tmp_path / "cache"))
    converted = []

    def fake_convert(path, out, progress=True):
        converted.append(path)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(gguf_convert, "convert", fake_convert)
    body = os.urandom(3 << 20)  # past two key reads: head and tail both count
    a, b = tmp_path / "env1" / "m.gguf", tmp_path / "env2" / "m.gguf"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(body)
    os.utime(b, (1, 1))  # another install: another path, another mtime
    assert gguf_convert.converted_dir(a) == gguf_convert.converted_dir(b)
    assert converted == [a]
    changed = tmp_path / "env3" / "m.gguf"
    changed.parent.mkdir()
    changed.write_bytes(body[:-1] + bytes([body[-1] ^ 1]))  # other weights at the tail: another conversion
    assert gguf_convert.converted_dir(changed) != gguf_convert.converted_dir(a)
    assert converted == [a, changed]
