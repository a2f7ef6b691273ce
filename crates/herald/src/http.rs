//! The HTTP boundary: the service API, the user API and operations endpoints. With
//! `ws`, the only code that knows axum.

pub mod chat;
pub mod demo;
pub mod error;
pub mod extract;
pub mod members;
pub mod ops;
pub mod publish;

use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::Next;
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
        .merge(members::router())
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

/// Refuses oversized request targets (414) and header sections (431) before any
/// handler parses them.
pub async fn limit_request_size(request: Request, next: Next) -> Response {
    if request.uri().to_string().len() > MAX_URI_BYTES {
        let body =
            serde_json::json!({"error": "uri_too_long", "message": "the request URL is longer than 8 KiB"});
        return (StatusCode::URI_TOO_LONG, axum::Json(body)).into_response();
    }
    let header_bytes: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        let body = serde_json::json!({"error": "headers_too_large", "message": "the request headers are larger than 16 KiB"});
        return (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, axum::Json(body)).into_response();
    }
    next.run(request).await
}
