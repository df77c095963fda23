"""Build: setuptools hands the extension to CMake (CMakeLists.txt owns flags and targets)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        if shutil.which("cmake") is None:
            raise RuntimeError("building dqkernels needs cmake >= 3.18 on PATH")
        ext_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        config = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ext_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('DQK_BUILD_TYPE', 'Release')}",
        ]
        if os.environ.get("DQK_NATIVE") == "1":
            config.append("-DDQK_NATIVE=ON")
        if shutil.which("ninja"):
            config += ["-G", "Ninja"]
        subprocess.run(["cmake", str(ROOT), *config], cwd=build_dir, check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


setup(
    packages=find_packages(include=["dqkernels", "dqkernels.*"]),
    ext_modules=[CMakeExtension("dqkernels.graphcut._C")],
    cmdclass={"build_ext": CMakeBuild},
)
