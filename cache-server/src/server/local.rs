//! The local socket's server side (the wire format is in
//! [`crate::local`]): one task per connection reads a frame, runs the
//! same handler a gRPC call reaches (so auth, limits, statuses and metrics
//! are the gRPC path's), and writes the answer, with no task hop between.

use super::service::CacheService;
use crate::local::{call, header, parse_header, HEADER};
use prost::Message;
use proto::v1::cache_server::Cache as CacheRpc;
use proto::v1::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::{Code, Request, Status};

/// Accepts connections until `stopped` turns true.
pub(super) async fn serve(
    listener: UnixListener,
    service: CacheService,
    max_message: usize,
    stopped: watch::Receiver<bool>,
) {
    let mut stop = stopped.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(connection(stream, service.clone(), max_message, stopped.clone()));
                }
                Err(e) => {
                    // Out of descriptors, most likely: wait rather than spin.
                    tracing::warn!(error = %e, "local socket: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            () = until_stopped(&mut stop) => return,
        }
    }
}

/// Resolves once the server stops (the guard `wait_for` returns is not
/// `Send`, so it must not live in a `select!` arm's output).
async fn until_stopped(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|s| *s).await;
}

async fn connection(
    mut stream: UnixStream,
    service: CacheService,
    max_message: usize,
    mut stopped: watch::Receiver<bool>,
) {
    let mut auth: Option<MetadataValue<Ascii>> = None;
    let (mut body, mut out) = (Vec::new(), Vec::new());
    loop {
        let mut h = [0u8; HEADER];
        tokio::select! {
            read = stream.read_exact(&mut h) => if read.is_err() { return },
            () = until_stopped(&mut stopped) => return,
        }
        let (len, tag) = parse_header(&h);
        if len > max_message {
            let status = Status::resource_exhausted(format!(
                "a {len}-byte message is over the server's limit of {max_message}"
            ));
            let _ = answer(&mut stream, &mut out, Err(status)).await;
            return;
        }
        body.resize(len, 0);
        if stream.read_exact(&mut body).await.is_err() {
            return;
        }
        let result = handle(&service, &mut auth, tag, &body).await;
        if answer(&mut stream, &mut out, result).await.is_err() {
            return;
        }
    }
}

async fn answer(
    stream: &mut UnixStream,
    out: &mut Vec<u8>,
    result: Result<Vec<u8>, Status>,
) -> std::io::Result<()> {
    out.clear();
    match result {
        Ok(body) => {
            out.extend_from_slice(&header(body.len(), Code::Ok as u8));
            out.extend_from_slice(&body);
        }
        Err(status) => {
            let message = status.message().as_bytes();
            out.extend_from_slice(&header(message.len(), status.code() as u8));
            out.extend_from_slice(message);
        }
    }
    stream.write_all(out).await
}

/// Runs one call; the answer is the response message's bytes.
async fn handle(
    service: &CacheService,
    auth: &mut Option<MetadataValue<Ascii>>,
    tag: u8,
    body: &[u8],
) -> Result<Vec<u8>, Status> {
    fn decode<M: Message + Default>(body: &[u8]) -> Result<M, Status> {
        M::decode(body).map_err(|e| Status::invalid_argument(format!("a malformed message: {e}")))
    }
    fn with_auth<M>(m: M, auth: &Option<MetadataValue<Ascii>>) -> Request<M> {
        let mut r = Request::new(m);
        if let Some(v) = auth {
            r.metadata_mut().insert("authorization", v.clone());
        }
        r
    }
    match tag {
        call::AUTHENTICATE => {
            let token = std::str::from_utf8(body)
                .ok()
                .and_then(|t| format!("Bearer {t}").parse::<MetadataValue<Ascii>>().ok())
                .ok_or_else(|| Status::unauthenticated("a token is printable ASCII"))?;
            let mut probe = Request::new(HealthRequest {});
            probe.metadata_mut().insert("authorization", token.clone());
            service.authenticate(&probe)?;
            *auth = Some(token);
            Ok(Vec::new())
        }
        call::LOOKUP => {
            let r = service
                .lookup(with_auth(decode::<LookupRequest>(body)?, auth))
                .await?;
            Ok(r.into_inner().encode_to_vec())
        }
        call::RELEASE => {
            let r = service
                .release(with_auth(decode::<ReleaseRequest>(body)?, auth))
                .await?;
            Ok(r.into_inner().encode_to_vec())
        }
        call::RENEW => {
            let r = service
                .renew(with_auth(decode::<RenewRequest>(body)?, auth))
                .await?;
            Ok(r.into_inner().encode_to_vec())
        }
        call::HEALTH => {
            let r = service
                .health(with_auth(decode::<HealthRequest>(body)?, auth))
                .await?;
            Ok(r.into_inner().encode_to_vec())
        }
        other => Err(Status::invalid_argument(format!(
            "unknown call {other} on the local socket"
        ))),
    }
}
