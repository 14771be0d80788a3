"""Build p2u-onnx-runtime: the device modules of p2u_onnx, the list in p2u_onnx/_device.py."""

from __future__ import annotations

import ast
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def device_modules() -> set[str]:
    """DEVICE_MODULES of p2u_onnx/_device.py, read without importing the package."""
    tree = ast.parse((HERE / "p2u_onnx" / "_device.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "DEVICE_MODULES" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise SystemExit("p2u_onnx/_device.py has no DEVICE_MODULES")


class DeviceBuildPy(build_py):
    """build_py that keeps only the device modules of p2u_onnx."""

    def find_package_modules(self, package, package_dir):  # noqa: ANN001, ANN201
        modules = super().find_package_modules(package, package_dir)
        if package != "p2u_onnx":
            return modules
        keep = device_modules()
        return [m for m in modules if m[1] in keep]


setup(cmdclass={"build_py": DeviceBuildPy})
