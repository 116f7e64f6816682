"""The generated gRPC modules match serving/gateway/v2/inference.proto, byte for byte."""

from __future__ import annotations

import shutil
from pathlib import Path

from grpc_tools import protoc

from tests.conftest import REPO

PROTO = Path("serving/gateway/v2/inference.proto")
GENERATED = ("inference_pb2.py", "inference_pb2_grpc.py")


def test_generated_modules_are_in_step_with_the_proto(tmp_path: Path) -> None:
    (tmp_path / PROTO.parent).mkdir(parents=True)
    shutil.copy(REPO / PROTO, tmp_path / PROTO)
    argv = ["protoc", f"-I{tmp_path}", f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}"]
    assert protoc.main([*argv, str(tmp_path / PROTO)]) == 0
    for name in GENERATED:
        fresh = (tmp_path / PROTO.parent / name).read_text()
        committed = (REPO / PROTO.parent / name).read_text()
        assert fresh == committed, f"{name} is stale: regenerate it (see {PROTO})"
