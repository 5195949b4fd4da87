"""Logging set-up shared by the commands: text or JSON lines, to stderr or a file, flags on either side."""

from __future__ import annotations

import json
import logging

import pytest
from fedpers.client.__main__ import build_parser
from fedpers.logs import setup_logging


@pytest.fixture(autouse=True)
def _restore_root_logger():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_json_lines_to_a_file_with_the_traceback(tmp_path) -> None:
    path = tmp_path / "sub" / "log.jsonl"
    setup_logging("info", path, "json")
    log = logging.getLogger("fedpers.test")
    log.debug("not shown at INFO")
    log.info("round %d closed", 3)
    try:
        raise KeyError("boom")
    except KeyError:
        log.exception("closing failed")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["message"] for r in records] == ["round 3 closed", "closing failed"]
    assert records[0]["level"] == "INFO" and records[0]["logger"] == "fedpers.test"
    assert records[0]["time"].endswith("Z") and "exception" not in records[0]
    assert "KeyError: 'boom'" in records[1]["exception"]


def test_bad_level_or_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log level 'LOUD'"):
        setup_logging("LOUD")
    with pytest.raises(ValueError, match="log format"):
        setup_logging("INFO", fmt="xml")


def test_client_logging_flags_work_before_and_after_the_subcommand() -> None:
    before = build_parser().parse_args(["--log-level", "DEBUG", "--log-format", "json", "plan", "m.ini"])
    after = build_parser().parse_args(["plan", "m.ini", "--log-level", "DEBUG", "--log-format", "json"])
    neither = build_parser().parse_args(["plan", "m.ini"])
    for ns in (before, after):
        assert ns.log_level == "DEBUG" and ns.log_format == "json" and ns.log_file is None
    assert neither.log_level is None and neither.log_format == "text"
