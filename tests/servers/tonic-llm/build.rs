//! The `llm.Generator` service and client, generated from proto/llm.proto.

fn main() {
    let proto = "proto/llm.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"]).expect("compile llm.proto");
    tonic_prost_build::configure()
        .compile_fds(fds)
        .expect("generate the llm.Generator server and client");
}
