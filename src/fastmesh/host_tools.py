"""Running the host's tools for the capture commands (iptables-save and -restore, bpftool, ip,
mount): one timeout for all, the tool's complaint on one line, and a refusal for want of
privilege told apart from any other failure, so that each command can say what to grant."""

from __future__ import annotations

import subprocess

TIMEOUT_SECONDS = 60


class ToolFailed(Exception):
    """A tool that could not run or exited non-zero: `message` is its complaint on one line;
    `denied` says the kernel refused it for want of privilege, `missing` that it is not installed."""

    def __init__(self, message: str, denied: bool = False, missing: bool = False):
        super().__init__(message)
        self.message, self.denied, self.missing = message, denied, missing


def run_tool(argv: list[str], stdin: str | None = None) -> str:
    """The tool's standard output, or ToolFailed."""
    try:
        result = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=TIMEOUT_SECONDS,
                                check=False)
    except FileNotFoundError:
        raise ToolFailed(f"{argv[0]} is not installed", missing=True) from None
    if result.returncode != 0:
        # Some tools (bpftool) say why on stdout.
        message = " ".join((result.stderr or result.stdout).split()) or f"exit status {result.returncode}"
        raise ToolFailed(message, denied="Operation not permitted" in message or "Permission denied" in message)
    return result.stdout
