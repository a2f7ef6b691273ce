//! The HTTP boundary: the service API, the user API and operations endpoints. With
//! `ws`, the only code that knows axum.

pub mod error;
pub mod extract;
pub mod members;
pub mod ops;
pub mod publish;

use axum::response::IntoResponse;
use axum::Router;

use crate::app::AppState;
use error::ApiError;

/// Every HTTP route but the WebSocket endpoints.
pub fn router() -> Router<AppState> {
    Router::new()
        .merge(publish::router())
        .merge(members::router())
        .merge(ops::router())
        .fallback(|| async { ApiError::NotFound("no such endpoint".to_owned()).into_response() })
}
