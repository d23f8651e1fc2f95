"""Build step of the liblora package (metadata is in pyproject.toml): writes
lora/_install.py, the path of liblora.so the installed package loads first."""
import os
import re
import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def abi_major():
    with open(os.path.join(HERE, "lora", "_ffi.py")) as f:
        return int(re.search(r"^ABI_MAJOR = (\d+)", f.read(), re.M).group(1))


def library_to_record():
    """$LORA_LIBRARY, else liblora.so.<major> in pkg-config's libdir of lora, else in the
    lib/ of the checkout being installed; None when none exists (the package then
    searches at import time)."""
    env = os.environ.get("LORA_LIBRARY")
    if env:
        return os.path.abspath(env)
    name = "liblora.so.%d" % abi_major()
    dirs = []
    if shutil.which("pkg-config"):
        r = subprocess.run(["pkg-config", "--variable=libdir", "lora"],
                           capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip():
            dirs.append(r.stdout.strip())
    dirs.append(os.path.normpath(os.path.join(HERE, "..", "..", "..", "lib")))
    for d in dirs:
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    return None


class BuildWithLibraryPath(build_py):
    def run(self):
        super().run()
        path = library_to_record()
        target = os.path.join(self.build_lib, "lora", "_install.py")
        with open(target, "w") as f:
            f.write('"""Written at install time by setup.py."""\n')
            f.write("#: liblora.so found when the package was installed (None: none).\n")
            f.write("LIBRARY = %r\n" % path)


setup(cmdclass={"build_py": BuildWithLibraryPath})
