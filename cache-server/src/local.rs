//! The local socket: a second Unix socket beside the gRPC one that serves
//! the per-request calls of an engine on the same machine (Lookup,
//! Release, Renew, Health) without HTTP/2. On a small VM a gRPC round trip
//! over a Unix socket costs 60–170 µs of task switches and wakeups before
//! the handler runs; a lookup of an 8k-token prompt is ~2 µs of index
//! work. Here each call is one write and one read on a blocking socket.
//!
//! The messages are the contract's own (`radixkv.v1` protobuf), framed:
//!
//! ```text
//! request:  u32 LE body length | u8 call   | body (the call's request message)
//! response: u32 LE body length | u8 status | body (status 0: the response
//!                                                  message; else a UTF-8 error)
//! ```
//!
//! Calls: 0 = authenticate (body: the bearer token, UTF-8; answers an empty
//! body or UNAUTHENTICATED), 1 = Lookup, 2 = Release, 3 = Renew, 4 = Health.
//! Statuses are gRPC codes. Requests are served in order, one at a time per
//! connection, by the same handlers (and limits, tenancy and metrics) as
//! the gRPC calls. A body over the server's `max_message_bytes` or a broken
//! frame closes the connection after its status; an unknown call or a
//! malformed message is answered INVALID_ARGUMENT and the connection goes on.

use crate::client::{
    lookup_reply, lookup_request, ClientError, LeaseHandle, LookupReply, Result, Scope,
};
use prost::Message;
use proto::v1 as pb;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Bytes before a frame's body.
pub const HEADER: usize = 5;

/// The calls, by their byte on the wire.
pub mod call {
    pub const AUTHENTICATE: u8 = 0;
    pub const LOOKUP: u8 = 1;
    pub const RELEASE: u8 = 2;
    pub const RENEW: u8 = 3;
    pub const HEALTH: u8 = 4;
}

/// A frame's header: the body's length and the call (or status) byte.
pub fn header(len: usize, tag: u8) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..4].copy_from_slice(&(len as u32).to_le_bytes());
    h[4] = tag;
    h
}

/// The body length and call (or status) byte of a header.
pub fn parse_header(h: &[u8; HEADER]) -> (usize, u8) {
    (u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize, h[4])
}

/// A blocking client of the local socket: for an engine's hot path, where
/// a lookup per request should cost a socket round trip and nothing more.
/// One call at a time; open one per thread that needs one.
#[derive(Debug)]
pub struct LocalClient {
    stream: UnixStream,
    out: Vec<u8>,
    input: Vec<u8>,
}

impl LocalClient {
    /// Connects to the server's local socket and, with a token,
    /// authenticates the connection (UNAUTHENTICATED if it is unknown).
    pub fn connect(path: impl AsRef<Path>, token: Option<&str>) -> Result<LocalClient> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .map_err(|e| ClientError::Connect(format!("{}: {e}", path.display())))?;
        let mut client = LocalClient {
            stream,
            out: Vec::new(),
            input: Vec::new(),
        };
        if let Some(t) = token {
            client.call(call::AUTHENTICATE, t.as_bytes())?;
        }
        Ok(client)
    }

    /// Bounds how long a call may wait for the server (none by default).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<()> {
        self.stream
            .set_read_timeout(timeout)
            .and_then(|()| self.stream.set_write_timeout(timeout))
            .map_err(|e| ClientError::Connect(e.to_string()))
    }

    /// As [`Client::lookup`](crate::client::Client::lookup).
    pub fn lookup(
        &mut self,
        scope: &Scope,
        tokens: &[u32],
        lease_ms: Option<u64>,
        prefetch: bool,
    ) -> Result<LookupReply> {
        let request = lookup_request(scope, tokens, lease_ms, prefetch).encode_to_vec();
        let body = self.call(call::LOOKUP, &request)?;
        lookup_reply(decode(body)?)
    }

    pub fn release(&mut self, lease: LeaseHandle) -> Result<()> {
        let request = pb::ReleaseRequest { lease_id: lease.id }.encode_to_vec();
        self.call(call::RELEASE, &request)?;
        Ok(())
    }

    /// Extends a lease or pin to `ttl` from now; returns the new expiry.
    pub fn renew(&mut self, id: u64, ttl: Duration) -> Result<u64> {
        let request = pb::RenewRequest {
            lease_id: id,
            ttl_ms: ttl.as_millis() as u64,
        }
        .encode_to_vec();
        let body = self.call(call::RENEW, &request)?;
        Ok(decode::<pb::RenewResponse>(body)?.expires_ms)
    }

    pub fn health(&mut self) -> Result<bool> {
        let body = self.call(call::HEALTH, &[])?;
        Ok(decode::<pb::HealthResponse>(body)?.serving)
    }

    /// One request frame out, one response frame in.
    fn call(&mut self, tag: u8, body: &[u8]) -> Result<&[u8]> {
        let io = |e: std::io::Error| ClientError::Connect(format!("local socket: {e}"));
        self.out.clear();
        self.out.extend_from_slice(&header(body.len(), tag));
        self.out.extend_from_slice(body);
        self.stream.write_all(&self.out).map_err(io)?;
        let mut h = [0u8; HEADER];
        self.stream.read_exact(&mut h).map_err(io)?;
        let (len, status) = parse_header(&h);
        self.input.resize(len, 0);
        self.stream.read_exact(&mut self.input).map_err(io)?;
        if status != 0 {
            return Err(ClientError::Status {
                code: tonic::Code::from_i32(i32::from(status)),
                message: String::from_utf8_lossy(&self.input).into_owned(),
            });
        }
        Ok(&self.input)
    }
}

fn decode<M: Message + Default>(body: &[u8]) -> Result<M> {
    M::decode(body).map_err(|e| ClientError::Protocol(e.to_string()))
}
