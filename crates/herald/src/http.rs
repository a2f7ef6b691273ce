//! The HTTP boundary: the service API, the user API and operations endpoints. With
//! `ws`, the only code that knows axum.

pub mod chat;
pub mod demo;
pub mod error;
pub mod extract;
pub mod members;
pub mod ops;
pub mod presence;
pub mod publish;
pub mod server;
pub mod sse;

#[cfg(test)]
mod fuzz;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::extract::Request;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Router;

use crate::app::AppState;
use crate::config::AllowedOrigins;
use error::ApiError;

/// Every HTTP route but the WebSocket endpoints. The browser-facing ones (the user API
/// and the browser client) answer CORS requests from `origins`; the service API does not.
pub fn router(origins: &AllowedOrigins) -> Router<AppState> {
    Router::new()
        .merge(publish::router())
        .merge(chat::router().layer(cors(origins)))
        .merge(sse::router().layer(cors(origins)))
        .merge(members::router())
        .merge(presence::router())
        .merge(ops::router())
        .merge(demo::router(cors(origins)))
        .fallback(|| async { ApiError::NotFound("no such endpoint".to_owned()).into_response() })
}

/// How long a browser may cache a preflight answer.
const CORS_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(600);

/// CORS for calls a web page makes with a user token: the origins of
/// `HERALD_ALLOWED_ORIGINS` (the same list the WebSocket handshake checks), `GET` and
/// `POST` with `Authorization` and `Content-Type`. No cookies are involved (the token
/// travels in `Authorization`), so credentials are not allowed.
pub fn cors(origins: &AllowedOrigins) -> tower_http::cors::CorsLayer {
    use axum::http::{header, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let origins = origins.clone();
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(move |origin, _| {
            origin.to_str().is_ok_and(|origin| origins.allows(origin))
        }))
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .max_age(CORS_MAX_AGE)
}

/// The longest request target (path and query) accepted.
pub const MAX_URI_BYTES: usize = 8 * 1024;

/// The most header bytes (names and values) accepted in one request.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// The whole HTTP service, as `crate::router` builds it: the routes inside the panic
/// catcher inside the [`Guard`].
pub type App =
    Guard<tower_http::catch_panic::CatchPanic<Router, tower_http::catch_panic::DefaultResponseForPanic>>;

/// The layer every request crosses (`crate::router`, outside the panic catcher):
/// refuses oversized request targets (414) and header sections (431) before any
/// handler parses them, and makes every error answer JSON ([`json_errors`]).
///
/// One hand-written service rather than two `axum::middleware::from_fn`s: each of those
/// boxes a clone of everything below it into a `Next` for every request, about 3,500
/// instructions a request each (callgrind, the unicast benchmark; issue 19).
#[derive(Debug, Clone, Copy, Default)]
pub struct GuardLayer;

impl<S> tower::Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard { inner }
    }
}

/// The service of [`GuardLayer`].
#[derive(Debug, Clone)]
pub struct Guard<S> {
    inner: S,
}

impl<S, B> tower::Service<Request> for Guard<S>
where
    S: tower::Service<Request, Response = axum::http::Response<B>, Error = Infallible>,
    S::Future: Send + 'static,
    B: axum::body::HttpBody<Data = axum::body::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        if let Some(refusal) = oversized(&request) {
            return Box::pin(std::future::ready(Ok(refusal)));
        }
        let answer = self.inner.call(request);
        Box::pin(async move {
            let Ok(response) = answer.await;
            Ok(json_errors(response.map(axum::body::Body::new)).await)
        })
    }
}

/// 414 for a request target over [`MAX_URI_BYTES`], 431 for headers over
/// [`MAX_HEADER_BYTES`].
fn oversized(request: &Request) -> Option<Response> {
    if uri_len(request.uri()) > MAX_URI_BYTES {
        let body =
            serde_json::json!({"error": "uri_too_long", "message": "the request URL is longer than 8 KiB"});
        return Some((StatusCode::URI_TOO_LONG, axum::Json(body)).into_response());
    }
    let header_bytes: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        let body = serde_json::json!({"error": "headers_too_large", "message": "the request headers are larger than 16 KiB"});
        return Some((StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, axum::Json(body)).into_response());
    }
    None
}

/// The length of `uri` as written (as its `Display` writes it: scheme and `://`,
/// authority, path, `?` and query), counted from its parts (every request is checked).
fn uri_len(uri: &axum::http::Uri) -> usize {
    uri.scheme_str().map_or(0, |scheme| scheme.len() + 3)
        + uri.authority().map_or(0, |authority| authority.as_str().len())
        + uri.path().len()
        + uri.query().map_or(0, |query| query.len() + 1)
}

/// The largest plain-text error body carried over as the JSON `message`.
const MAX_CARRIED_MESSAGE: usize = 1024;

/// Makes every error answer JSON `{"error","message"}`, also those made below the
/// handlers: extractor rejections (a path id that is not valid percent-encoded UTF-8,
/// a repeated query parameter), 405 for a wrong method, a panic's 500. A plain-text
/// client-error body becomes the message; a server error's never does.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/json"));
    if is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let carried = if status.is_client_error() {
        axum::body::to_bytes(body, MAX_CARRIED_MESSAGE)
            .await
            .ok()
            .and_then(|bytes| String::from_utf8(bytes.to_vec()).ok())
            .map(|text| text.trim().to_owned())
            .filter(|text| !text.is_empty())
    } else {
        None
    };
    let (code, default) = error_code(status);
    let message = carried.unwrap_or_else(|| default.to_owned());
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    parts.headers.insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    let body = serde_json::json!({"error": code, "message": message}).to_string();
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// The `error` code and a default message for a status no handler chose the body of.
fn error_code(status: StatusCode) -> (&'static str, &'static str) {
    match status {
        StatusCode::BAD_REQUEST => ("bad_request", "the request is malformed"),
        StatusCode::UNAUTHORIZED => ("unauthorized", "authentication is required"),
        StatusCode::FORBIDDEN => ("forbidden", "this request is not allowed"),
        StatusCode::NOT_FOUND => ("not_found", "no such endpoint"),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            "this endpoint does not take this method; see the Allow header",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => ("payload_too_large", "the request body is larger than 64 KiB"),
        StatusCode::URI_TOO_LONG => ("uri_too_long", "the request URL is longer than 8 KiB"),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => (
            "unsupported_media_type",
            "the request body must be JSON (Content-Type: application/json)",
        ),
        StatusCode::TOO_MANY_REQUESTS => ("too_many_requests", "too many requests; retry with backoff"),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => {
            ("headers_too_large", "the request headers are larger than 16 KiB")
        }
        StatusCode::SERVICE_UNAVAILABLE => ("unavailable", "the server cannot answer now; retry shortly"),
        status if status.is_server_error() => ("internal", "internal error"),
        _ => ("bad_request", "the request was refused"),
    }
}

#[cfg(test)]
mod uri_tests {
    #[test]
    fn uri_len_is_the_written_length() {
        for uri in [
            "/",
            "/api/v1/notifications/u1?x=1&y=%20",
            "http://example.com:8080/a/b?c",
            "http://example.com",
            "https://user@example.com/?",
            "example.com:443",
            "/a?",
            "*",
        ] {
            let parsed: axum::http::Uri = uri.parse().unwrap();
            assert_eq!(super::uri_len(&parsed), parsed.to_string().len(), "{uri}");
        }
    }
}
