//! Types that can only hold values Heap accepts. Every `parse` returns a [`FieldError`] naming the field at fault,
//! so a rejection always tells the sender which field to fix.

pub mod app_id;
pub mod event_name;
pub mod field_error;
pub mod heap_call;
pub mod idempotency;
pub mod identity;
pub mod properties;
pub mod timestamp;

pub use app_id::{AppId, AppIdPolicy};
pub use event_name::EventName;
pub use field_error::FieldError;
pub use heap_call::{CallKind, HeapCall, TrackEvent, UserProperties, Who};
pub use idempotency::{IdempotencyKey, KeyScheme, Seed};
pub use identity::{Identity, IdentityPolicy, UserId};
pub use properties::{Properties, PropertyLimits};
pub use timestamp::Timestamp;
