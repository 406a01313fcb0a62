//! The concierge.v1 gRPC contract, generated from `proto/concierge/v1/*.proto`.
//! The server crate implements these services; clients in Rust (benches, tests) call them.

pub mod v1 {
    tonic::include_proto!("concierge.v1");

    /// Encoded `FileDescriptorSet` of every concierge.v1 file, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("concierge_descriptor");
}
