//! Extractors whose rejections come out in the API's error shape: `ApiJson` (64 KiB,
//! JSON only) and `ServiceKey` (the publish/admin API key).

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header;
use axum::http::request::Parts;
use serde_json::Value;

use crate::app::AppState;
use crate::auth::bearer;
use crate::http::error::ApiError;

/// Request bodies larger than this are refused with 413 (docs/protocol.md).
pub const MAX_BODY: usize = 64 * 1024;

/// A JSON body of at most [`MAX_BODY`] bytes with a JSON content type.
pub struct ApiJson(pub Value);

impl<S: Send + Sync> FromRequest<S> for ApiJson {
    type Rejection = ApiError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let is_json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase())
            .is_some_and(|v| {
                v == "application/json" || (v.starts_with("application/") && v.ends_with("+json"))
            });
        if !is_json {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = axum::body::to_bytes(request.into_body(), MAX_BODY)
            .await
            .map_err(|_| ApiError::PayloadTooLarge)?;
        let value = serde_json::from_slice(&bytes)
            .map_err(|err| ApiError::BadRequest(format!("the body is not valid JSON: {err}")))?;
        Ok(ApiJson(value))
    }
}

/// Proof that the request carried a valid service API key.
pub struct ServiceKey;

impl FromRequestParts<AppState> for ServiceKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let Some(key) = bearer(&parts.headers) else {
            state.metrics.auth_failed("missing_api_key");
            return Err(ApiError::Unauthorized(
                "send the service API key as Authorization: Bearer <key>".to_owned(),
            ));
        };
        if !state.api_keys.verify(key) {
            state.metrics.auth_failed("bad_api_key");
            crate::limits::refusal_log("bad_api_key", client_ip(parts), "service API key refused");
            return Err(ApiError::Unauthorized("the API key is not valid".to_owned()));
        }
        Ok(ServiceKey)
    }
}

/// The caller of the user API, from `Authorization: Bearer <user JWT>`.
pub struct User(pub crate::auth::Identity);

impl FromRequestParts<AppState> for User {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let Some(token) = bearer(&parts.headers) else {
            state.metrics.auth_failed("missing");
            return Err(ApiError::Unauthorized(
                "send the user token as Authorization: Bearer <jwt>".to_owned(),
            ));
        };
        match state.auth.authenticate(token).await {
            Ok(identity) => Ok(User(identity)),
            Err(failure) => {
                state.metrics.auth_failed(failure.reason());
                crate::limits::refusal_log("bad_user_token", client_ip(parts), "user token refused");
                Err(ApiError::Unauthorized(failure.to_string()))
            }
        }
    }
}

/// The client's address, for security logs (unspecified when unknown): behind a
/// trusted proxy the forwarded one (`http::server`).
pub fn client_ip(parts: &Parts) -> std::net::IpAddr {
    crate::http::server::Peer::client_ip_of(&parts.extensions)
}

/// The request's `Idempotency-Key`, if it has one; 400 when it is empty, longer than
/// 128 characters, not UTF-8, or given twice.
pub struct IdempotencyKey(pub Option<crate::idempotency::Key>);

/// The header naming a publish's idempotency key.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The header set on an answer replayed for a repeated `Idempotency-Key`.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

impl<S: Send + Sync> FromRequestParts<S> for IdempotencyKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let mut values = parts.headers.get_all(IDEMPOTENCY_KEY).iter();
        let Some(value) = values.next() else {
            return Ok(IdempotencyKey(None));
        };
        if values.next().is_some() {
            return Err(ApiError::BadRequest(
                "send one Idempotency-Key header, not several".to_owned(),
            ));
        }
        crate::idempotency::Key::parse(value.as_bytes())
            .map(|key| IdempotencyKey(Some(key)))
            .map_err(|err| ApiError::BadRequest(err.to_string()))
    }
}

/// A query string's parameters (percent-decoded, invalid UTF-8 replaced); 400 (JSON)
/// when it names a parameter twice (which one would win is a guess).
pub fn query_params(query: Option<&str>) -> Result<std::collections::HashMap<String, String>, ApiError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|_| ApiError::BadRequest("the query string is malformed".to_owned()))?;
    let mut params = std::collections::HashMap::with_capacity(pairs.len());
    for (name, value) in pairs {
        if params.contains_key(&name) {
            return Err(ApiError::BadRequest(format!(
                "the query parameter {name} is given more than once; give it once"
            )));
        }
        params.insert(name, value);
    }
    Ok(params)
}
