//! API errors: one enum, one JSON shape `{"error": "<code>", "message": "…"}`, the
//! statuses docs/protocol.md lists. Internal causes are logged, never sent.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("the request body is larger than 64 KiB")]
    PayloadTooLarge,
    #[error("the request body must be JSON (Content-Type: application/json)")]
    UnsupportedMediaType,
    #[error("{0}")]
    TooManyRequests(String),
    #[error("{0}")]
    Unavailable(String),
    /// A publish call that failed: 503 whose body also says whether the call's messages
    /// may have been stored.
    #[error("{message}")]
    PublishFailed { message: String, outcome: Outcome },
    /// Something failed inside herald; the cause is logged, the client gets a generic
    /// message.
    #[error("internal error")]
    Internal(anyhow::Error),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::TooManyRequests(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) | Self::PublishFailed { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound(_) => "not_found",
            Self::PayloadTooLarge => "payload_too_large",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::TooManyRequests(_) => "too_many_requests",
            Self::Unavailable(_) | Self::PublishFailed { .. } => "unavailable",
            Self::Internal(_) => "internal",
        }
    }
}

/// What a failed publish call may have stored, as its 503 says (docs/protocol.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Some message of the call may have been stored (a command sent without an
    /// answer, or a batch stopped part way): retry with the same `Idempotency-Key`.
    Unknown,
    /// Nothing of the call was stored.
    NotPublished,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::NotPublished => "not_published",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(cause) = &self {
            tracing::error!(error = format!("{cause:#}"), "request failed");
        }
        let mut body = serde_json::json!({"error": self.code(), "message": self.to_string()});
        if let Self::PublishFailed { outcome, .. } = &self {
            body["outcome"] = serde_json::Value::from(outcome.as_str());
        }
        (self.status(), Json(body)).into_response()
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(err: crate::store::StoreError) -> Self {
        Self::Internal(err.into())
    }
}

impl From<crate::broker::BrokerError> for ApiError {
    fn from(err: crate::broker::BrokerError) -> Self {
        Self::Unavailable(err.to_string())
    }
}

impl From<crate::tasks::Unavailable> for ApiError {
    fn from(err: crate::tasks::Unavailable) -> Self {
        Self::Unavailable(err.to_string())
    }
}

impl From<crate::tasks::SubmitError> for ApiError {
    fn from(err: crate::tasks::SubmitError) -> Self {
        use crate::tasks::SubmitError;
        match err {
            SubmitError::TooManyInFlight => Self::TooManyRequests(err.to_string()),
            SubmitError::NoWorkers | SubmitError::ShuttingDown | SubmitError::Unavailable(_) => {
                Self::Unavailable(err.to_string())
            }
        }
    }
}

impl From<crate::compose::Invalid> for ApiError {
    fn from(err: crate::compose::Invalid) -> Self {
        Self::BadRequest(err.0)
    }
}

impl From<crate::ids::InvalidId> for ApiError {
    fn from(err: crate::ids::InvalidId) -> Self {
        Self::BadRequest(err.to_string())
    }
}
