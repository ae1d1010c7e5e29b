"""Shared fixtures.  ``report`` collects lines that are printed in pytest's summary, so
end-to-end tests can show their numbers (e.g. MUNBa next to a baseline) in every run."""

import pytest

_REPORT: list[str] = []


@pytest.fixture
def report():
    return _REPORT.append


def pytest_terminal_summary(terminalreporter):
    if _REPORT:
        terminalreporter.section("munba_kernels report")
        for line in _REPORT:
            terminalreporter.write_line(line)
