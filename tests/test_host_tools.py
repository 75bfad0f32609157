"""host_tools.run_tool: what the capture commands see of the host's tools."""

from __future__ import annotations

import sys

import pytest

from fastmesh.host_tools import ToolFailed, run_tool


def test_a_tools_output_is_returned_and_its_input_given():
    assert run_tool(["cat"], "*nat\nCOMMIT\n") == "*nat\nCOMMIT\n"


def test_a_failure_is_the_tools_complaint_on_one_line():
    with pytest.raises(ToolFailed) as failed:
        run_tool([sys.executable, "-c", "import sys; sys.exit('iptables-restore: line 2\\n  failed')"])
    assert (failed.value.message, failed.value.denied, failed.value.missing) == (
        "iptables-restore: line 2 failed", False, False)


def test_a_tool_that_says_why_only_on_stdout_is_heard():
    with pytest.raises(ToolFailed, match="^Error: bad map$"):
        run_tool([sys.executable, "-c", "print('Error: bad map'); raise SystemExit(255)"])


def test_a_silent_failure_names_its_exit_status():
    with pytest.raises(ToolFailed, match="^exit status 3$"):
        run_tool([sys.executable, "-c", "raise SystemExit(3)"])


@pytest.mark.parametrize("complaint", ["Permission denied (you must be root)", "bpf: Operation not permitted"])
def test_a_refusal_for_want_of_privilege_is_told_apart(complaint):
    with pytest.raises(ToolFailed) as failed:
        run_tool([sys.executable, "-c", f"import sys; sys.exit({complaint!r})"])
    assert failed.value.denied and not failed.value.missing


def test_a_tool_that_is_not_installed_is_named():
    with pytest.raises(ToolFailed) as failed:
        run_tool(["fastmesh-no-such-tool", "-j"])
    assert (failed.value.message, failed.value.missing) == ("fastmesh-no-such-tool is not installed", True)
