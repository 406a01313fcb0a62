//! Generates the concierge.v1 client/server code and a file descriptor set for reflection.
//! protoc comes from the `protoc-bin-vendored` crate unless PROTOC is set, so a fresh machine
//! needs no system protobuf compiler.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded; nothing else reads the environment yet.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "proto/concierge/v1/common.proto",
        "proto/concierge/v1/embeddings.proto",
        "proto/concierge/v1/knowledge_base.proto",
        "proto/concierge/v1/entities.proto",
        "proto/concierge/v1/intents.proto",
        "proto/concierge/v1/models.proto",
    ];
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("concierge_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
