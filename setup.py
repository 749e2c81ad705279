"""Installs ``simprune_torchvision.pth`` next to the package (site-packages root): at interpreter start it
hooks the first ``import torchvision`` so that it works on CPU-only torch (see simprune/compat.py).
Everything else is in pyproject.toml."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "simprune_torchvision.pth"


class BuildWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(str(Path("src") / PTH), str(self._root() / PTH), preserve_mode=0)

    def _root(self) -> Path:
        """The wheel's root: build_lib, or for an editable install (pip install -e) the unpacked wheel."""
        if getattr(self, "editable_mode", False):
            return Path(self.distribution.get_command_obj("install").install_lib)
        return Path(self.build_lib)


setup(cmdclass={"build_py": BuildWithPth})
