"""Regenerates the Python stubs from proto/flashserve/v1/attention.proto (the one command).

    python scripts/gen_proto.py            # write the stubs next to the .proto
    python scripts/gen_proto.py --check    # exit 1 if the committed stubs are stale

The stubs are installed as `flashserve.proto`, so the generated absolute import of the message
module is rewritten to that package name.
"""
import argparse
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
PROTO = "flashserve/v1/attention.proto"
FILES = ("attention_pb2.py", "attention_pb2.pyi", "attention_pb2_grpc.py")


def generate(dest: pathlib.Path, proto_root: pathlib.Path = PROTO_ROOT) -> None:
    from grpc_tools import protoc

    args = ["protoc", f"-I{proto_root}", f"--python_out={dest}", f"--pyi_out={dest}", f"--grpc_python_out={dest}", PROTO]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    grpc_file = dest / "flashserve" / "v1" / "attention_pb2_grpc.py"
    text = grpc_file.read_text()
    grpc_file.write_text(text.replace("from flashserve.v1 import attention_pb2", "from flashserve.proto import attention_pb2"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("--proto-root", type=pathlib.Path, default=PROTO_ROOT, help="folder holding flashserve/v1/")
    opts = parser.parse_args()
    out_dir = opts.proto_root / "flashserve" / "v1"
    with tempfile.TemporaryDirectory() as tmp:
        generate(pathlib.Path(tmp), opts.proto_root)
        stale = []
        for name in FILES:
            fresh = (pathlib.Path(tmp) / "flashserve" / "v1" / name).read_text()
            target = out_dir / name
            if opts.check:
                if not target.exists() or target.read_text() != fresh:
                    stale.append(name)
            else:
                target.write_text(fresh)
    if stale:
        print(f"stale stubs: {', '.join(stale)}; run: python scripts/gen_proto.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
