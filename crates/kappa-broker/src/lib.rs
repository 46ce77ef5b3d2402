//! kappa's Kafka wire-protocol layer: frames, headers, request decoding (modern versions
//! through kafka-protocol, pre-KIP-896 versions through hand-written `legacy` codecs),
//! ApiVersions, and a TCP server that feeds decoded requests to a [`Handler`].
//!
//! Invariant: this crate knows bytes on the wire; what a request *does* is the handler's.

pub mod api_versions;
pub mod error;
pub mod frame;
pub mod fuzzing;
pub mod handlers;
pub mod header;
pub mod legacy;
pub mod request;
pub mod server;

pub use api_versions::{API_SUPPORT, ApiRange, ApiSupport};
pub use error::ProtocolError;
pub use handlers::{Broker, BrokerConfig, BrokerStats, COMPRESSED_APPENDS_MAX_DEFAULT};
pub use kafka_protocol;
pub use request::{Request, Response, decode_request, encode_response, expects_response};
pub use server::{BoxFuture, Handler, Limits, Peer, Reply, run};
