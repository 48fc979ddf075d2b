//! Reads a request body with a size limit enforced while streaming, so an oversized body is refused before it
//! is buffered, and a deadline, so a client that trickles its body cannot hold a connection (408).
//! `Content-Encoding: gzip`, `br`, `zstd` and `deflate` bodies are decoded on the way; the limit counts decoded
//! bytes, so a compression bomb stops at the limit too.

use crate::error::{ApiError, ErrorCode};
use actix_web::HttpRequest;
use actix_web::web::Payload;
use futures_util::StreamExt;

pub async fn read_limited(
    req: &HttpRequest,
    payload: Payload,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<Vec<u8>, ApiError> {
    match tokio::time::timeout(timeout, read(req, payload, limit)).await {
        Ok(result) => result,
        Err(_) => Err(ApiError::new(
            ErrorCode::RequestTimeout,
            format!("the body was not received within {} seconds (server.body_read_timeout_secs)", timeout.as_secs()),
        )),
    }
}

async fn read(req: &HttpRequest, payload: Payload, limit: usize) -> Result<Vec<u8>, ApiError> {
    let too_large = || {
        ApiError::new(ErrorCode::BodyTooLarge, format!("the body is larger than {limit} bytes (server.max_body_bytes)"))
    };
    let declared = req
        .headers()
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    let mut payload = actix_web::dev::Decompress::from_headers(payload.into_inner(), req.headers());
    let mut body = Vec::with_capacity(declared.unwrap_or(1024).min(limit));
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::new(ErrorCode::InvalidBody, format!("could not read the body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
