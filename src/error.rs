//! One table of error codes and one HTTP body for every error: `{"error": {"code", "message", "field"}}`.
//! 4xx bodies say exactly what is wrong; 5xx bodies say little and the log says everything.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;
use serde_json::json;

macro_rules! error_codes {
    ($($variant:ident => ($code:literal, $status:ident)),* $(,)?) => {
        /// Every error the HTTP API answers with.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum ErrorCode { $($variant),* }

        impl ErrorCode {
            pub fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $code),* }
            }
            pub fn status(self) -> StatusCode {
                match self { $(ErrorCode::$variant => StatusCode::$status),* }
            }
        }
    };
}

error_codes! {
    MalformedJson => ("malformed_json", BAD_REQUEST),
    InvalidUtf8 => ("invalid_utf8", BAD_REQUEST),
    NulCharacter => ("nul_character", BAD_REQUEST),
    LoneSurrogate => ("lone_surrogate", BAD_REQUEST),
    JsonTooDeep => ("json_too_deep", BAD_REQUEST),
    NumberOutOfRange => ("number_out_of_range", BAD_REQUEST),
    DuplicateKey => ("duplicate_key", BAD_REQUEST),
    InvalidBody => ("invalid_body", BAD_REQUEST),
    Unauthorized => ("unauthorized", UNAUTHORIZED),
    NotFound => ("not_found", NOT_FOUND),
    UnknownSource => ("unknown_source", NOT_FOUND),
    UnknownTemplate => ("unknown_template", NOT_FOUND),
    MethodNotAllowed => ("method_not_allowed", METHOD_NOT_ALLOWED),
    RequestTimeout => ("request_timeout", REQUEST_TIMEOUT),
    BodyTooLarge => ("body_too_large", PAYLOAD_TOO_LARGE),
    TooManyItems => ("too_many_items", PAYLOAD_TOO_LARGE),
    UnsupportedMediaType => ("unsupported_media_type", UNSUPPORTED_MEDIA_TYPE),
    NothingAccepted => ("nothing_accepted", UNPROCESSABLE_ENTITY),
    RateLimited => ("rate_limited", TOO_MANY_REQUESTS),
    InvalidQuery => ("invalid_query", BAD_REQUEST),
    StoreFull => ("store_full", SERVICE_UNAVAILABLE),
    NotReady => ("not_ready", SERVICE_UNAVAILABLE),
    Overloaded => ("overloaded", SERVICE_UNAVAILABLE),
    Forbidden => ("forbidden_origin", FORBIDDEN),
    Internal => ("internal", INTERNAL_SERVER_ERROR),
    BatchTooLarge => ("batch_too_large", BAD_REQUEST),
    MessageTooLarge => ("message_too_large", BAD_REQUEST),
    UnknownEnvironment => ("unknown_environment", NOT_FOUND),
    WrongEnvironment => ("wrong_environment", FORBIDDEN),
}

#[derive(thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub field: Option<String>,
    /// Seconds, sent as Retry-After (503 store_full, 429 rate_limited).
    pub retry_after: Option<u64>,
    /// Per-item reasons for 422 nothing_accepted.
    pub rejected: Option<serde_json::Value>,
    /// Answered on a Segment tracking-API route (`/v1/*`): `success`, `code` and `message` also at the top level,
    /// where Segment's and RudderStack's libraries read them.
    pub segment_api: bool,
}

/// A summary, never the whole `rejected` array: a 30 KB body can hold 10,000 reasons, and a log line per request
/// of megabytes is an amplification attack on the log.
impl std::fmt::Debug for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rejected = self.rejected.as_ref().and_then(|r| r.as_array()).map(Vec::len);
        let message: String = self.message.chars().take(300).collect();
        f.debug_struct("ApiError")
            .field("code", &self.code.as_str())
            .field("message", &message)
            .field("field", &self.field)
            .field("rejected_items", &rejected)
            .finish()
    }
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), field: None, retry_after: None, rejected: None, segment_api: false }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// A 500 whose cause goes to the log, not to the client.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(ErrorCode::Internal, "internal error; see the relay's log")
    }
}

#[derive(Serialize)]
struct Body<'a> {
    code: &'static str,
    message: &'a str,
    field: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rejected: Option<&'a serde_json::Value>,
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.code.status()
    }

    fn error_response(&self) -> HttpResponse {
        let mut resp = HttpResponse::build(self.status_code());
        if matches!(
            self.code,
            ErrorCode::RequestTimeout
                | ErrorCode::BodyTooLarge
                | ErrorCode::BatchTooLarge
                | ErrorCode::MessageTooLarge
                | ErrorCode::Overloaded
        ) {
            // The rest of the body is not wanted: close instead of draining it for a client that may never send it.
            resp.force_close();
        }
        if let Some(secs) = self.retry_after {
            resp.insert_header(("Retry-After", secs.to_string()));
        }
        let error = Body {
            code: self.code.as_str(),
            message: &self.message,
            field: self.field.as_deref(),
            rejected: self.rejected.as_ref(),
        };
        if self.segment_api {
            return resp.json(json!({
                "success": false,
                "code": self.code.as_str(),
                "message": &self.message,
                "error": error,
            }));
        }
        resp.json(json!({ "error": error }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_summarises_the_rejected_items_instead_of_listing_them() {
        let mut e = ApiError::new(ErrorCode::NothingAccepted, "none of the 10000 items could be accepted");
        e.rejected = Some(serde_json::Value::Array(vec![json!({"message": "x".repeat(300)}); 10_000]));
        let text = format!("{e:?}");
        assert!(text.len() < 400, "{} bytes", text.len());
        assert!(text.contains("rejected_items: Some(10000)"), "{text}");
    }
}
