"""The pip-installable package: its version, and (LORA_TEST_INSTALLED=1, set by make
check-python-install) that the installed copy is the one imported and that it loads the
library recorded at install time."""
import os
import re
import sys

import pytest

import lora
from lora import _ffi

INSTALLED = bool(os.environ.get("LORA_TEST_INSTALLED"))
HERE = os.path.dirname(os.path.abspath(__file__))


def header_version(header):
    with open(header) as f:
        text = f.read()
    return ".".join(re.search(r"#define LORA_VERSION_%s (\d+)" % k, text).group(1)
                    for k in ("MAJOR", "MINOR", "PATCH"))


@pytest.mark.skipif(INSTALLED, reason="checks the source tree")
def test_pyproject_version_is_the_headers():
    with open(os.path.join(HERE, "..", "pyproject.toml")) as f:
        version = re.search(r'^version = "([^"]+)"', f.read(), re.M).group(1)
    header = os.path.join(HERE, "..", "..", "..", "..", "include", "lora.h")
    assert version == header_version(header)


@pytest.mark.skipif(not INSTALLED, reason="make check-python-install runs it")
def test_installed_package_is_imported_and_loads_the_recorded_library():
    import importlib.metadata
    assert lora.__file__.startswith(sys.prefix), lora.__file__
    assert "LORA_LIBRARY" not in os.environ
    recorded = _ffi._installed_library()
    assert recorded and os.path.isabs(recorded)
    assert lora.library_path == recorded
    assert importlib.metadata.version("liblora") == lora.version()
