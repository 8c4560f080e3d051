//! Generates the ONNX messages (`proto/onnx.proto`, ONNX's proto3 schema) for the
//! rust-protobuf runtime, with its pure-Rust parser: no `protoc` is needed.

fn main() {
    protobuf_codegen::Codegen::new()
        .pure()
        .include("proto")
        .input("proto/onnx.proto")
        .cargo_out_dir("onnx_proto")
        .run_from_script();
}
