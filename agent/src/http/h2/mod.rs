//! HTTP/2 (cleartext, h2c) and gRPC on the sockets the `http` probes already capture, decoded
//! in userspace: [`frame`] reads each direction's frames from the records, [`hpack`] decodes
//! header blocks with each direction's dynamic table, [`grpc`] counts length-prefixed messages
//! and reads the model from the inference APIs that carry one, and [`conn`] follows every
//! stream of a connection as one exchange.

pub mod conn;
pub mod frame;
pub mod grpc;
pub mod hpack;

pub use conn::Conn;
