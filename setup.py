"""Generates the gRPC modules from protos/ as part of every build.

The generated files (legorun/proto/*_pb2*.py) are build products: they are
written into the source tree so that editable installs see them, and are
never committed.
"""
import pathlib

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

HERE = pathlib.Path(__file__).parent.resolve()


def generate_protos() -> None:
    from grpc_tools import protoc
    import grpc_tools

    includes = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    out = HERE / "legorun" / "proto"
    out.mkdir(exist_ok=True)
    for proto in sorted((HERE / "protos").glob("*.proto")):
        args = [
            "grpc_tools.protoc",
            f"-I{includes}",
            f"-Ilegorun/proto={HERE / 'protos'}",
            f"--python_out={HERE}",
            f"--grpc_python_out={HERE}",
            f"legorun/proto/{proto.name}",
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")


class BuildPyWithProtos(build_py):
    def run(self):
        generate_protos()
        super().run()


class OptionalBuildExt(build_ext):
    """The C fast path is an accelerator: without a compiler legorun still
    works (in pure Python, more slowly), so a failed build is not fatal."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # noqa: BLE001 - any compiler trouble
            print(f"warning: legorun's C fast path was not built ({e}); using pure Python")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001
            print(f"warning: {ext.name} was not built ({e}); using pure Python")


setup(
    cmdclass={"build_py": BuildPyWithProtos, "build_ext": OptionalBuildExt},
    ext_modules=[Extension("legorun._ext.fastloop", ["legorun/_ext/fastloop.c"],
                           extra_compile_args=["-O2"]),
                 Extension("legorun._ext.pagecore", ["legorun/_ext/pagecore.c"],
                           extra_compile_args=["-O2"]),
                 Extension("legorun._ext.mstore", ["legorun/_ext/mstore.c"],
                           extra_compile_args=["-O2"]),
                 Extension("legorun._ext.h2stream", ["legorun/_ext/h2stream.c"],
                           extra_compile_args=["-O2", "-pthread"], extra_link_args=["-pthread"])],
)
