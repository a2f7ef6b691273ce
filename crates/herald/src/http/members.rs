//! Org membership API (docs/protocol.md, service key). Removing a member closes that user's open
//! sockets on the org with 4003, on every node (through `control`).

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::app::AppState;
use crate::broker::BrokerError;
use crate::control::Action;
use crate::http::error::ApiError;
use crate::http::extract::{ApiJson, ServiceKey, MAX_BODY};
use crate::ids::{OrgId, UserId};
use crate::membership::Membership;

/// The role given when a PUT names none.
pub const DEFAULT_ROLE: &str = "member";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/orgs/{org_id}/members", axum::routing::get(list))
        .route("/api/v1/orgs/{org_id}/members/{user_id}", put(add).delete(remove))
}

async fn add(
    State(state): State<AppState>,
    _key: ServiceKey,
    Path((org_id, user_id)): Path<(String, String)>,
    request: Request,
) -> Result<Response, ApiError> {
    let org_id = OrgId::parse(&org_id)?;
    let user_id = UserId::parse(&user_id)?;
    let role = role_from_body(request).await?;
    state
        .store
        .put_member(org_id.as_str(), user_id.as_str(), &role)
        .await?;
    if matches!(&*state.membership, Membership::Webhook(_)) {
        let action = Action::ForgetMembership {
            org_id: org_id.as_str().to_owned(),
            user_id: user_id.as_str().to_owned(),
        };
        state.control.send(action).await.map_err(not_everywhere)?;
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The 503 when the change is made but other nodes could not be told: the call is
/// safe to repeat.
fn not_everywhere(err: BrokerError) -> ApiError {
    tracing::warn!(error = %err, "control action not sent to other nodes");
    ApiError::Unavailable(
        "the membership change is saved, but the other herald nodes could not be told (Redis is unreachable); \
         repeat the call"
            .to_owned(),
    )
}

/// The body is optional: none (or an empty one) gives the default role; otherwise it
/// must be a JSON object with an optional string `role`.
async fn role_from_body(request: Request) -> Result<String, ApiError> {
    let has_body = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|len| len != "0");
    if !has_body || request.headers().get(axum::http::header::CONTENT_TYPE).is_none() {
        let bytes = axum::body::to_bytes(request.into_body(), MAX_BODY)
            .await
            .map_err(|_| ApiError::PayloadTooLarge)?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(DEFAULT_ROLE.to_owned());
        }
        return Err(ApiError::UnsupportedMediaType);
    }
    let ApiJson(body) = <ApiJson as axum::extract::FromRequest<()>>::from_request(request, &()).await?;
    let Value::Object(body) = body else {
        return Err(ApiError::BadRequest(
            "the body must be a JSON object, like {\"role\": \"admin\"}".to_owned(),
        ));
    };
    match body.get("role") {
        None | Some(Value::Null) => Ok(DEFAULT_ROLE.to_owned()),
        Some(Value::String(role)) if !role.is_empty() && role.chars().count() <= 64 => Ok(role.clone()),
        Some(_) => Err(ApiError::BadRequest(
            "role must be a string of 1 to 64 characters".to_owned(),
        )),
    }
}

async fn remove(
    State(state): State<AppState>,
    _key: ServiceKey,
    Path((org_id, user_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let org_id = OrgId::parse(&org_id)?;
    let user_id = UserId::parse(&user_id)?;
    state
        .store
        .remove_member(org_id.as_str(), user_id.as_str())
        .await?;
    let action = Action::RemoveMember {
        org_id: org_id.as_str().to_owned(),
        user_id: user_id.as_str().to_owned(),
    };
    let closed = state.control.send(action).await.map_err(not_everywhere)?;
    tracing::info!(org_id = %org_id, user_id = %user_id, closed, "member removed");
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list(
    State(state): State<AppState>,
    _key: ServiceKey,
    Path(org_id): Path<String>,
) -> Result<Response, ApiError> {
    let org_id = OrgId::parse(&org_id)?;
    let members = state.store.members(org_id.as_str()).await?;
    let members: Vec<Value> = members
        .into_iter()
        .map(|m| json!({"user_id": m.user_id, "role": m.role}))
        .collect();
    Ok(Json(json!({"members": members})).into_response())
}
