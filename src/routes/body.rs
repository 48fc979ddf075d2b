//! Reads a request body with a size limit enforced while streaming, so an oversized body is refused before it
//! is buffered, and a deadline, so a client that trickles its body cannot hold a connection (408).
//!
//! `Content-Encoding: gzip`, `deflate`, `br` and `zstd` bodies are decoded here, by decoders that write into a
//! sink which refuses the first byte past the limit: a compression bomb inflates at most `server.max_body_bytes`
//! (plus the decoder's own buffer, tens of KiB) whoever sent it, before any signature is checked. The decoded bytes
//! of every body in flight are also counted against one budget (`server.max_inflight_body_bytes`): past it a
//! request gets 503 `overloaded` with Retry-After instead of more memory. The budget is held until the request
//! is answered (the pipeline's copies of the body live that long).
//!
//! Slow bodies under pressure: while more bodies are being read than half the connection cap, a body that sends
//! nothing for `STALL` gets 408 and its connection is closed, so a flood of slow-body connections cannot keep the
//! cap full for `server.body_read_timeout_secs` and `/healthz` gets a connection within seconds.

use crate::error::{ApiError, ErrorCode};
use actix_web::HttpRequest;
use actix_web::web::Payload;
use futures_util::StreamExt;
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The decoded bytes of every request body in flight, against one limit.
#[derive(Debug)]
pub struct InflightBytes {
    used: AtomicUsize,
    limit: usize,
    /// Bodies being read now.
    readers: AtomicUsize,
    /// Above this many readers, a stalled body is cut after `STALL`.
    pressure_at: usize,
}

/// How long a body may send nothing while the relay is under pressure.
pub const STALL: std::time::Duration = std::time::Duration::from_secs(1);

impl InflightBytes {
    pub fn new(limit: usize) -> Arc<Self> {
        Self::with_pressure(limit, usize::MAX)
    }

    /// `pressure_at`: the number of bodies read at once past which stalled bodies are cut (half the connection
    /// cap).
    pub fn with_pressure(limit: usize, pressure_at: usize) -> Arc<Self> {
        Arc::new(Self { used: AtomicUsize::new(0), limit, readers: AtomicUsize::new(0), pressure_at })
    }

    fn under_pressure(&self) -> bool {
        self.readers.load(Ordering::Relaxed) > self.pressure_at
    }

    /// Bytes currently held by bodies in flight.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| u.checked_add(n).filter(|t| *t <= self.limit))
            .is_ok()
    }
}

/// A share of the in-flight budget, given back when dropped.
#[derive(Debug)]
pub struct Held {
    budget: Arc<InflightBytes>,
    bytes: usize,
}

impl Held {
    fn grow(&mut self, n: usize) -> bool {
        let ok = self.budget.try_take(n);
        if ok {
            self.bytes += n;
        }
        ok
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Counts a body as being read until dropped.
struct Reading<'a>(&'a InflightBytes);

impl Drop for Reading<'_> {
    fn drop(&mut self) {
        self.0.readers.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A decoded body and its share of the in-flight budget (keep it alive until the request is answered).
#[derive(Debug)]
pub struct Body {
    pub bytes: Vec<u8>,
    pub held: Held,
}

/// Why the sink refused more bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Over {
    Limit,
    Budget,
}

/// Where decoded bytes go: a buffer that refuses the first byte past `limit` or past the in-flight budget.
#[derive(Debug)]
struct Sink {
    buf: Vec<u8>,
    limit: usize,
    held: Held,
    over: Option<Over>,
}

impl Write for Sink {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len().saturating_add(data.len()) > self.limit {
            self.over = Some(Over::Limit);
            return Err(std::io::Error::other("body over its limit"));
        }
        let need = (self.buf.len() + data.len()).saturating_sub(self.held.bytes);
        if need > 0 && !self.held.grow(need) {
            self.over = Some(Over::Budget);
            return Err(std::io::Error::other("in-flight body budget spent"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One decoder per supported `Content-Encoding`, each writing into the bounded sink.
enum Decoder {
    Identity(Sink),
    Gzip(flate2::write::MultiGzDecoder<Sink>),
    Deflate(flate2::write::ZlibDecoder<Sink>),
    Brotli(Box<brotli::DecompressorWriter<Sink>>),
    Zstd(zstd::stream::write::Decoder<'static, Sink>),
}

impl Decoder {
    fn new(encoding: Option<&str>, sink: Sink) -> Result<Self, ApiError> {
        Ok(match encoding.map(|e| e.trim().to_ascii_lowercase()).as_deref() {
            None | Some("" | "identity") => Decoder::Identity(sink),
            Some("gzip" | "x-gzip") => Decoder::Gzip(flate2::write::MultiGzDecoder::new(sink)),
            Some("deflate") => Decoder::Deflate(flate2::write::ZlibDecoder::new(sink)),
            Some("br") => Decoder::Brotli(Box::new(brotli::DecompressorWriter::new(sink, 16 * 1024))),
            Some("zstd") => match zstd::stream::write::Decoder::new(sink) {
                Ok(d) => Decoder::Zstd(d),
                Err(e) => return Err(ApiError::internal(&e)),
            },
            Some(other) => {
                let e = ApiError::new(
                    ErrorCode::UnsupportedMediaType,
                    format!("Content-Encoding {other:?} is not supported; send gzip, deflate, br, zstd or none"),
                )
                .with_field("Content-Encoding");
                return Err(e);
            }
        })
    }

    fn sink(&self) -> &Sink {
        match self {
            Decoder::Identity(s) => s,
            Decoder::Gzip(d) => d.get_ref(),
            Decoder::Deflate(d) => d.get_ref(),
            Decoder::Brotli(d) => d.get_ref(),
            Decoder::Zstd(d) => d.get_ref(),
        }
    }

    fn write(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        match self {
            Decoder::Identity(s) => s.write_all(chunk),
            Decoder::Gzip(d) => d.write_all(chunk),
            Decoder::Deflate(d) => d.write_all(chunk),
            Decoder::Brotli(d) => d.write_all(chunk),
            Decoder::Zstd(d) => d.write_all(chunk),
        }
    }

    /// Flushes what the decoder still holds; returns the sink, or the error and the sink's verdict.
    fn finish(self) -> Result<Sink, (std::io::Error, Option<Over>)> {
        match self {
            Decoder::Identity(s) => Ok(s),
            Decoder::Gzip(mut d) => match d.try_finish() {
                Ok(()) => d.finish().map_err(|e| (e, None)),
                Err(e) => Err((e, d.get_ref().over)),
            },
            Decoder::Deflate(mut d) => match d.try_finish() {
                Ok(()) => d.finish().map_err(|e| (e, None)),
                Err(e) => Err((e, d.get_ref().over)),
            },
            Decoder::Brotli(d) => match d.into_inner() {
                Ok(s) => Ok(s),
                Err(s) => {
                    let over = s.over;
                    Err((std::io::Error::other("the brotli stream is incomplete"), over))
                }
            },
            Decoder::Zstd(mut d) => match d.flush() {
                Ok(()) => Ok(d.into_inner()),
                Err(e) => Err((e, d.get_ref().over)),
            },
        }
    }
}

/// An operator's JSON request (`/admin/replay`, `/admin/preview`): read as `read_limited` reads it, then parsed;
/// a body that does not parse is a 400 naming `what` it is and the shape `expected`.
pub async fn read_json<T: serde::de::DeserializeOwned>(
    req: &HttpRequest,
    payload: Payload,
    limit: usize,
    state: &super::AppState,
    what: &str,
    expected: &str,
) -> Result<T, ApiError> {
    let body = read_limited(req, payload, limit, state.body_read_timeout, &state.inflight).await?.bytes;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::new(ErrorCode::InvalidBody, format!("{what} body: {e}; expected {expected}")))
}

pub async fn read_limited(
    req: &HttpRequest,
    payload: Payload,
    limit: usize,
    timeout: std::time::Duration,
    budget: &Arc<InflightBytes>,
) -> Result<Body, ApiError> {
    match tokio::time::timeout(timeout, read(req, payload, limit, budget)).await {
        Ok(result) => result,
        Err(_) => Err(ApiError::new(
            ErrorCode::RequestTimeout,
            format!("the body was not received within {} seconds (server.body_read_timeout_secs)", timeout.as_secs()),
        )),
    }
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(ErrorCode::BodyTooLarge, format!("the body is larger than {limit} bytes (server.max_body_bytes)"))
}

fn overloaded() -> ApiError {
    let mut e = ApiError::new(
        ErrorCode::Overloaded,
        "the relay is reading as many bodies as it may hold at once (server.max_inflight_body_bytes); retry shortly",
    );
    e.retry_after = Some(1);
    e
}

fn verdict(over: Option<Over>, limit: usize, e: &dyn std::fmt::Display) -> ApiError {
    match over {
        Some(Over::Limit) => too_large(limit),
        Some(Over::Budget) => overloaded(),
        None => ApiError::new(ErrorCode::InvalidBody, format!("could not decode the body: {e}"))
            .with_field("Content-Encoding"),
    }
}

async fn read(
    req: &HttpRequest,
    payload: Payload,
    limit: usize,
    budget: &Arc<InflightBytes>,
) -> Result<Body, ApiError> {
    let headers = req.headers();
    let declared = headers
        .get(actix_web::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large(limit));
    }
    let encoding = match headers.get(actix_web::http::header::CONTENT_ENCODING).map(|v| v.to_str()) {
        None => None,
        Some(Ok(v)) => Some(v),
        Some(Err(_)) => {
            return Err(ApiError::new(ErrorCode::UnsupportedMediaType, "Content-Encoding is not ASCII")
                .with_field("Content-Encoding"));
        }
    };
    let held = Held { budget: budget.clone(), bytes: 0 };
    // Reserved from a declared Content-Length only up to 64 KiB: a client that declares the maximum and then sends
    // nothing must not hold the in-flight budget; the buffer grows (and is counted) as bytes arrive.
    let capacity = if encoding.is_none() { declared.unwrap_or(1024).min(limit).min(64 * 1024) } else { 1024 };
    let mut sink = Sink { buf: Vec::new(), limit, held, over: None };
    if !sink.held.grow(capacity) {
        return Err(overloaded());
    }
    sink.buf.reserve_exact(capacity);
    let mut decoder = Decoder::new(encoding, sink)?;
    let mut payload = payload.into_inner();
    budget.readers.fetch_add(1, Ordering::AcqRel);
    let _reading = Reading(budget);
    loop {
        // Waits in steps of STALL, so a body that stalled before the pressure began is cut as well.
        let next = loop {
            match tokio::time::timeout(STALL, payload.next()).await {
                Ok(next) => break next,
                Err(_) if budget.under_pressure() => {
                    return Err(ApiError::new(
                        ErrorCode::RequestTimeout,
                        format!(
                            "the body stalled for {} s while the relay is busy reading many bodies",
                            STALL.as_secs()
                        ),
                    ));
                }
                Err(_) => {}
            }
        };
        let Some(chunk) = next else {
            break;
        };
        let chunk =
            chunk.map_err(|e| ApiError::new(ErrorCode::InvalidBody, format!("could not read the body: {e}")))?;
        if let Err(e) = decoder.write(&chunk) {
            return Err(verdict(decoder.sink().over, limit, &e));
        }
    }
    let sink = decoder.finish().map_err(|(e, over)| verdict(over, limit, &e))?;
    // The reservation made up front counted `capacity` bytes the buffer may not have filled; keep what is held.
    Ok(Body { bytes: sink.buf, held: sink.held })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink(limit: usize, budget: &Arc<InflightBytes>) -> Sink {
        Sink { buf: Vec::new(), limit, held: Held { budget: budget.clone(), bytes: 0 }, over: None }
    }

    fn zstd_bomb(mib: usize) -> Vec<u8> {
        let frame = zstd::encode_all(&vec![0u8; 1 << 20][..], 1).expect("zstd");
        frame.repeat(mib)
    }

    #[test]
    fn a_zstd_bomb_stops_at_the_limit_and_gives_its_budget_back() {
        let budget = InflightBytes::new(64 << 20);
        let bomb = zstd_bomb(1024);
        let mut d = Decoder::new(Some("zstd"), sink(1 << 20, &budget)).unwrap();
        let err = bomb.chunks(16 * 1024).map(|c| d.write(c)).find(Result::is_err);
        assert!(err.is_some(), "the decoder must refuse past the limit");
        assert_eq!(d.sink().over, Some(Over::Limit));
        assert!(d.sink().buf.len() <= 1 << 20);
        drop(d);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn decoded_bytes_of_all_bodies_count_against_one_budget() {
        let budget = InflightBytes::new(1000);
        let mut a = Decoder::new(None, sink(800, &budget)).unwrap();
        let mut b = Decoder::new(None, sink(800, &budget)).unwrap();
        a.write(&[1; 600]).unwrap();
        assert!(b.write(&[1; 600]).is_err());
        assert_eq!(b.sink().over, Some(Over::Budget));
        drop(a);
        let mut c = Decoder::new(None, sink(800, &budget)).unwrap();
        c.write(&[1; 600]).unwrap();
    }

    #[test]
    fn gzip_deflate_brotli_and_zstd_decode() {
        let text = b"{\"hello\": \"world\"}".repeat(100);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&text).unwrap();
        let mut zl = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        zl.write_all(&text).unwrap();
        let mut br = Vec::new();
        {
            let mut w = brotli::CompressorWriter::new(&mut br, 4096, 5, 22);
            w.write_all(&text).unwrap();
        }
        let encoded = [
            ("gzip", gz.finish().unwrap()),
            ("deflate", zl.finish().unwrap()),
            ("br", br),
            ("zstd", zstd::encode_all(&text[..], 1).unwrap()),
        ];
        for (name, bytes) in encoded {
            let budget = InflightBytes::new(1 << 20);
            let mut d = Decoder::new(Some(name), sink(1 << 20, &budget)).unwrap();
            d.write(&bytes).unwrap();
            let s = d.finish().unwrap();
            assert_eq!(s.buf, text, "{name}");
        }
    }
}
