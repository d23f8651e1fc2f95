"""Makes `import lora` find the package next to this directory, whatever the cwd; with
LORA_TEST_INSTALLED=1 the installed package is tested instead (make
check-python-install)."""
import os
import sys

if not os.environ.get("LORA_TEST_INSTALLED"):
    sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
