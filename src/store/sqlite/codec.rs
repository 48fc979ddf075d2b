//! How the ingest log stores a request: the items rendered from it as one compressed blob, the raw body compressed,
//! and an event's id made from its place in the log (so a lookup by id is a primary-key lookup, with no index of its
//! own on the ingest path).

use crate::domain::CallKind;
use crate::store::{Ingested, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Bits of an event's number that hold its place among the items of its log entry (at most ~1M items per body;
/// `limits.max_items` is far below).
const IDX_BITS: u32 = 20;
const IDX_MASK: i64 = (1 << IDX_BITS) - 1;

/// An event's number: its log entry's sequence number and its place in that entry's items.
pub fn pack(seq: i64, idx: usize) -> i64 {
    (seq << IDX_BITS) | (idx as i64 & IDX_MASK)
}

pub fn unpack(id: i64) -> (i64, usize) {
    (id >> IDX_BITS, (id & IDX_MASK) as usize)
}

/// The first and last event numbers an entry can hold (for range queries over one entry's books).
pub fn entry_range(seq: i64) -> (i64, i64) {
    (seq << IDX_BITS, (seq << IDX_BITS) | IDX_MASK)
}

/// The id operators see: `<seq>-<idx>`.
pub fn event_id(id: i64) -> String {
    let (seq, idx) = unpack(id);
    format!("{seq}-{idx}")
}

pub fn parse_event_id(s: &str) -> Option<i64> {
    let (seq, idx) = s.split_once('-')?;
    let (seq, idx): (i64, usize) = (seq.parse().ok()?, idx.parse().ok()?);
    (seq > 0 && idx as i64 <= IDX_MASK).then(|| pack(seq, idx))
}

/// One item of a log entry: an event to deliver, or an item refused at ingest (kept with its reason).
#[derive(Debug, Serialize, Deserialize)]
pub struct StoredItem {
    /// The item's index in the body (several events can come from one item).
    #[serde(rename = "x")]
    pub item_index: i64,
    #[serde(rename = "e", skip_serializing_if = "Option::is_none", default)]
    pub event: Option<StoredEvent>,
    /// `field: message` of a refusal.
    #[serde(rename = "r", skip_serializing_if = "Option::is_none", default)]
    pub rejected: Option<String>,
    /// The template's load error, for an item held until the template loads.
    #[serde(rename = "h", skip_serializing_if = "Option::is_none", default)]
    pub held: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct StoredEvent {
    #[serde(rename = "k")]
    pub kind: String,
    #[serde(rename = "a")]
    pub app_id: String,
    #[serde(rename = "i")]
    pub identity: String,
    #[serde(rename = "y", skip_serializing_if = "Option::is_none", default)]
    pub idempotency_key: Option<String>,
    /// The element of Heap's bulk array, as JSON text (kept raw: no re-escaping on the way in or out).
    #[serde(rename = "p")]
    pub payload: Box<RawValue>,
}

impl StoredEvent {
    pub fn kind(&self) -> CallKind {
        CallKind::parse(&self.kind).unwrap_or(CallKind::Track)
    }
}

/// The items of an append, in the order events then rejections, with the events that survived the dedupe
/// (`keep`), as the compressed JSON array `decode_items` reads, and how many events and refusals it holds.
///
/// Written by hand rather than through `StoredItem`: an event's payload is JSON that serde_json produced, spliced
/// in as it is instead of being parsed again (this runs once per request on the ingest path).
pub fn encode_items(ing: &Ingested, keep: &[bool]) -> Result<(Vec<u8>, i64, i64), StoreError> {
    fn text(out: &mut Vec<u8>, s: &str) -> Result<(), StoreError> {
        serde_json::to_writer(out, s).map_err(|e| StoreError::Io(std::io::Error::other(e)))
    }
    let size: usize = ing.events.iter().map(|e| e.payload.len() + e.identity.len() + 64).sum();
    let mut out = Vec::with_capacity(size + ing.rejections.len() * 64 + 2);
    out.push(b'[');
    let mut events = 0;
    for (e, _) in ing.events.iter().zip(keep).filter(|(_, k)| **k) {
        if out.len() > 1 {
            out.push(b',');
        }
        out.extend_from_slice(format!("{{\"x\":{},\"e\":{{\"k\":", e.item_index).as_bytes());
        text(&mut out, e.kind.as_str())?;
        out.extend_from_slice(b",\"a\":");
        text(&mut out, &e.app_id)?;
        out.extend_from_slice(b",\"i\":");
        text(&mut out, &e.identity)?;
        if let Some(key) = &e.idempotency_key {
            out.extend_from_slice(b",\"y\":");
            text(&mut out, key)?;
        }
        out.extend_from_slice(b",\"p\":");
        out.extend_from_slice(e.payload.as_bytes());
        out.extend_from_slice(b"}}");
        events += 1;
    }
    for r in &ing.rejections {
        if out.len() > 1 {
            out.push(b',');
        }
        out.extend_from_slice(format!("{{\"x\":{},\"r\":", r.item_index).as_bytes());
        text(&mut out, &format!("{}: {}", r.field, r.message))?;
        out.push(b'}');
    }
    if let Some(held) = &ing.held {
        for i in 0..held.items {
            if out.len() > 1 {
                out.push(b',');
            }
            out.extend_from_slice(format!("{{\"x\":{i},\"h\":").as_bytes());
            text(&mut out, &held.reason)?;
            out.push(b'}');
        }
    }
    out.push(b']');
    Ok((compress(out), events, ing.rejections.len() as i64))
}

pub fn decode_items(blob: &[u8]) -> Result<Vec<StoredItem>, StoreError> {
    let json = decompress(blob.to_vec())?;
    serde_json::from_slice(&json)
        .map_err(|e| StoreError::Io(std::io::Error::other(format!("a log entry is corrupt: {e}"))))
}

/// zstd's frame magic. A JSON body cannot start with it, so bodies stored uncompressed read back as they are.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
/// zstd's fastest kind of level: bodies are small and the CPU is shared with rendering. On the 2.2 KB CleverTap
/// body, level 1 takes 10 µs to reach 42% of the size, level -1 5 µs to reach 53% (it leaves literals without
/// Huffman coding, which is also what makes level 1 slow on small inputs). Any level reads back the same way.
const ZSTD_LEVEL: i32 = -1;

/// Bytes as stored: zstd-compressed when that is smaller, else as they are.
pub fn compress(body: Vec<u8>) -> Vec<u8> {
    thread_local! {
        // One context per thread: creating a zstd context costs more than compressing a 3 KB body (profiled).
        static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
            std::cell::RefCell::new(zstd::bulk::Compressor::new(ZSTD_LEVEL).ok());
    }
    let compressed = COMPRESSOR.with(|c| c.borrow_mut().as_mut().map(|c| c.compress(&body)));
    match compressed {
        Some(Ok(z)) if z.len() < body.len() => z,
        _ => body,
    }
}

/// The most a stored frame may say it holds and still be decompressed in one buffer; a larger or unstated size
/// streams instead. Bodies are bounded far below this at the door (`limits.max_body_bytes`).
const MAX_ONE_SHOT: u64 = 64 << 20;

pub fn decompress(stored: Vec<u8>) -> Result<Vec<u8>, StoreError> {
    thread_local! {
        // One context per thread, as for compression: creating one (a large memset) was 8% of the relay's CPU under
        // load, in the follower reading every entry's items.
        static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            std::cell::RefCell::new(zstd::bulk::Decompressor::new().ok());
    }
    if !stored.starts_with(&ZSTD_MAGIC) {
        return Ok(stored);
    }
    let size = zstd::zstd_safe::get_frame_content_size(&stored).ok().flatten().filter(|n| *n <= MAX_ONE_SHOT);
    if let Some(size) = size {
        let one_shot = DECOMPRESSOR.with(|d| d.borrow_mut().as_mut().map(|d| d.decompress(&stored, size as usize)));
        if let Some(Ok(out)) = one_shot {
            return Ok(out);
        }
    }
    zstd::stream::decode_all(stored.as_slice()).map_err(StoreError::Io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_encoded_by_hand_decode_as_stored_items() {
        use crate::store::{NewEvent, NewRejection};
        let event = |i: i64, key: Option<&str>| NewEvent {
            event_id: String::new(),
            item_index: i,
            kind: CallKind::UserProperties,
            app_id: "11".into(),
            identity: "a\"b\\c\u{1}".into(),
            idempotency_key: key.map(str::to_owned),
            payload: r#"{"identity":"a","properties":{"q":"\"}"}}"#.into(),
            dedupe_key: None,
        };
        let ing = Ingested {
            source: "heap".into(),
            environment: String::new(),
            template: "t".into(),
            body: Vec::new(),
            received_at: 0,
            events: vec![event(0, Some("k")), event(1, None), event(2, None)],
            rejections: vec![NewRejection {
                event_id: String::new(),
                item_index: 3,
                field: "event".into(),
                message: "a \"quoted\" reason".into(),
            }],
            replay_of_raw: None,
            request_key: None,
            template_version: None,
            held: None,
        };
        let (blob, events, rejected) = encode_items(&ing, &[true, false, true]).unwrap();
        assert_eq!((events, rejected), (2, 1));
        let items = decode_items(&blob).unwrap();
        assert_eq!(items.len(), 3);
        let first = items[0].event.as_ref().unwrap();
        assert_eq!((first.kind(), first.identity.as_str()), (CallKind::UserProperties, "a\"b\\c\u{1}"));
        assert_eq!(first.idempotency_key.as_deref(), Some("k"));
        assert_eq!(first.payload.get(), ing.events[0].payload);
        assert_eq!(items[1].item_index, 2, "the item left out by the dedupe is not stored");
        assert_eq!(items[2].rejected.as_deref(), Some("event: a \"quoted\" reason"));
    }

    #[test]
    fn event_numbers_and_ids_round_trip() {
        for (seq, idx) in [(1, 0), (7, 3), (123_456_789, 999_999)] {
            let id = pack(seq, idx);
            assert_eq!(unpack(id), (seq, idx));
            assert_eq!(parse_event_id(&event_id(id)), Some(id));
        }
        assert_eq!(parse_event_id("01a233b8-7dfa-7797-ade7-ab71c5f6f442"), None);
        assert_eq!(parse_event_id("0-1"), None);
        assert_eq!(parse_event_id("5-99999999"), None);
    }

    #[test]
    fn bodies_read_back_as_received_whether_stored_compressed_or_not() {
        let body = br#"{"profiles":[{"identity":"u_1"},{"identity":"u_1"},{"identity":"u_1"}]}"#.repeat(20);
        let stored = compress(body.clone());
        assert!(stored.starts_with(&ZSTD_MAGIC) && stored.len() < body.len());
        assert_eq!(decompress(stored).unwrap(), body);
        let small = br#"{}"#.to_vec();
        assert_eq!(compress(small.clone()), small);
        assert_eq!(decompress(small.clone()).unwrap(), small);
    }
}
