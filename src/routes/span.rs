//! Each request's root span: method, route, client address (`routes::client_ip`: X-Forwarded-For only from a
//! trusted proxy) and status. Errors are not written out whole here: a refusal's details stay in the answer, and
//! the relay logs its own summary (auth failures rate-limited in `gate`, 5xx causes in `ApiError::internal`).

use actix_web::Error;
use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use tracing::Span;
use tracing_actix_web::{DefaultRootSpanBuilder, RootSpanBuilder};

pub struct RelayRootSpan;

impl RootSpanBuilder for RelayRootSpan {
    fn on_request_start(request: &ServiceRequest) -> Span {
        let client = super::client_ip(request.request()).map(|ip| ip.to_string()).unwrap_or_default();
        let route = request.match_pattern().unwrap_or_else(|| "default".into());
        tracing::info_span!(
            "HTTP request",
            http.method = %request.method(),
            http.route = %route,
            http.client_ip = %client,
            http.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            exception.message = tracing::field::Empty,
        )
    }

    fn on_request_end<B: MessageBody>(span: Span, outcome: &Result<ServiceResponse<B>, Error>) {
        DefaultRootSpanBuilder::on_request_end(span, outcome);
    }
}
