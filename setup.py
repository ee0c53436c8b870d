"""Compiles protos/ to Python (grpc_tools.protoc) whenever the package is built or installed,
editable installs included. The generated rollout/v1/*_pb2*.py files are build outputs: they are
git-ignored and never edited by hand."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent.resolve()


def compile_protos() -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
    for proto in protos:
        args = ["protoc", f"-I{ROOT / 'protos'}", f"-I{include}", f"--python_out={ROOT}",
                f"--pyi_out={ROOT}", f"--grpc_python_out={ROOT}", proto]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on protos/{proto}")


class BuildPyWithProtos(build_py):
    def run(self):
        compile_protos()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
