"""``ramflow parse`` on stdin / ``--input``: bad bytes, failing readers, the closing log line.

Each CLI run is a subprocess with a timeout: a hang is a failure, not a stuck test run.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_engine.parse_cli import decode_line, serve_lines
from data_engine.parsing import ParseConfig

REPO = Path(__file__).resolve().parents[1]
# Line 2 holds a lone continuation byte and a truncated 3-byte sequence; line 4 is Latin-1.
BAD_LINES = [b"A dog on a beach", b"A cat \x80 on a sofa \xe2\x82", b"",
             b"A caf\xe9 with a red umbrella", b"Two horses in a field"]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> ParseConfig:
    return ParseConfig(nltk_data=tmp_path_factory.mktemp("nltk_data"))


def _env(cfg: ParseConfig) -> dict:
    # A UTF-8 locale makes Python's own stdin decoding strict: the case that used to hang.
    return {**os.environ, "RAMFLOW_NLTK_DATA": str(cfg.nltk_data), "LC_ALL": "C.UTF-8",
            "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8:strict"}


def _closing_log(stderr: str) -> dict:
    line = [x for x in stderr.splitlines() if "parse: {" in x][-1]
    return json.loads(line.split("parse: ", 1)[1])


@pytest.mark.slow  # ramflow parse in a subprocess
@pytest.mark.parametrize("via", ["stdin", "input_file"])
def test_invalid_utf8_is_replaced_and_counted(cfg, tmp_path, via):
    payload = b"".join(line + b"\n" for line in BAD_LINES)
    cmd = [sys.executable, "-m", "orchestration.cli", "parse"]
    if via == "input_file":
        src = tmp_path / "captions.txt"
        src.write_bytes(payload)
        cmd += ["--input", str(src)]
    r = subprocess.run(cmd, input=payload if via == "stdin" else b"", capture_output=True,
                       cwd=REPO, env=_env(cfg), timeout=300)
    stderr = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 0, stderr
    out = [json.loads(x) for x in r.stdout.decode("utf-8").splitlines()]
    assert len(out) == len(BAD_LINES)  # one output line per input line
    assert out[0] == ["dog", "beach"] and out[2] == []
    assert {"cat", "sofa"} <= set(out[1]) and {"umbrella"} <= set(out[3])
    assert "horse" in out[4]
    stats = _closing_log(stderr)
    assert stats["bad_utf8"] == 2 and stats["captions"] == len(BAD_LINES)


@pytest.mark.slow  # ramflow parse in a subprocess
def test_closing_log_has_time_and_rate(cfg):
    """The stdin-mode log used to print 0 s and a null captions/s."""
    r = subprocess.run([sys.executable, "-m", "orchestration.cli", "parse"],
                       input=b"A dog on a beach\nTwo cats\n", capture_output=True, cwd=REPO,
                       env=_env(cfg), timeout=300)
    assert r.returncode == 0
    stats = _closing_log(r.stderr.decode())
    assert stats["seconds"] > 0 and stats["captions_per_s"] > 0 and stats["bad_utf8"] == 0


@pytest.mark.parametrize("raw, text, bad", [
    (b"plain\n", "plain", False), (b"crlf\r\n", "crlf", False),
    (b"caf\xc3\xa9\n", "caf\u00e9", False), (b"caf\xe9\n", "caf\ufffd", True),
    ("already text\n", "already text", False),
])
def test_decode_line(raw, text, bad):
    assert decode_line(raw) == (text, bad)


class _FailingReader:
    """Yields two lines, then raises as a broken pipe or a strict decoder would."""

    def __iter__(self):
        yield b"A dog on a beach\n"
        yield b"A man riding a horse\n"
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")


@pytest.mark.timeout(300)
def test_reader_failure_is_raised_not_hung(cfg):
    out = io.StringIO()
    with pytest.raises(RuntimeError, match="reading the captions failed"):
        serve_lines(_FailingReader(), out, cfg)
    answered = [json.loads(x) for x in out.getvalue().splitlines()]
    assert answered == [["dog", "beach"], ["man", "horse", "ride"]]  # lines before it answered
